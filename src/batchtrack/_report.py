"""Progress inside an item: the rules of a report, and the reporter a processor calls.

:meth:`BatchTracker.report <batchtrack.BatchTracker.report>` writes every call to the
store. Processors report through :func:`report_progress` instead, which the runners tie
to the item they run (a context variable, set in the thread that calls the processor):
it coalesces, writing at most once per :data:`MIN_INTERVAL` seconds or
:data:`MIN_STEP` of change (a new stage always), and the runner writes the last report
before the item ends.
"""

from __future__ import annotations

import contextvars
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .exceptions import BatchNotFound, InvalidTransition, ValidationError

if TYPE_CHECKING:
    from ._tracker import BatchTracker

__all__ = ["MAX_STAGE_LENGTH", "ItemReporter", "check_report", "report_progress"]

log = logging.getLogger("batchtrack")

MIN_INTERVAL = 0.5
"""Seconds between two writes of one item's reports, unless it moved by MIN_STEP."""
MIN_STEP = 0.01
MAX_STAGE_LENGTH = 100

_current: contextvars.ContextVar[ItemReporter | None] = contextvars.ContextVar(
    "batchtrack_item_reporter", default=None
)


def check_report(fraction: object, stage: object) -> tuple[float, str | None]:
    """``(fraction, stage)`` if they make a report.

    Raises:
        ValidationError: ``fraction`` is not a number in [0, 1], or ``stage`` is not None
            or a string of up to 100 characters without line breaks or NUL.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValidationError(f"fraction must be a number in [0, 1], not {fraction!r}")
    value = float(fraction)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValidationError(f"fraction must be a number in [0, 1], not {fraction!r}")
    if stage is not None:
        if not isinstance(stage, str):
            raise ValidationError(f"stage must be a string or None, not {type(stage).__name__}")
        if len(stage) > MAX_STAGE_LENGTH:
            raise ValidationError(f"stage is longer than {MAX_STAGE_LENGTH} characters")
        if any(ch in stage for ch in "\x00\r\n"):
            raise ValidationError(f"stage must not contain NUL or line breaks: {stage!r}")
    return value, stage


class ItemReporter:
    """Reports of one running item, coalesced; safe to call from any thread."""

    def __init__(self, tracker: BatchTracker, batch_id: str, item_id: str) -> None:
        self.tracker = tracker
        self.batch_id = batch_id
        self.item_id = item_id
        self._lock = threading.Lock()
        self._written: tuple[float, float, str | None] | None = None  # (when, fraction, stage)
        self._pending: tuple[float, str | None] | None = None

    def __call__(self, fraction: object, stage: object = None) -> None:
        value, label = check_report(fraction, stage)
        now = time.monotonic()
        with self._lock:
            last = self._written
            if (
                last is not None
                and label == last[2]
                and now - last[0] < MIN_INTERVAL
                and abs(value - last[1]) < MIN_STEP
            ):
                self._pending = (value, label)
                return
            self._pending = None
            self._written = (now, value, label)
        self._write(value, label)

    def flush(self) -> None:
        """Write the last report if it was held back (the runner calls it before the item
        ends)."""
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is not None:
                self._written = (time.monotonic(), *pending)
        if pending is not None:
            self._write(*pending)

    def _write(self, fraction: float, stage: str | None) -> None:
        try:
            self.tracker.report(self.batch_id, self.item_id, fraction, stage=stage)
        except (InvalidTransition, BatchNotFound) as exc:
            # Timed out, cancelled or gone meanwhile: the processor's report is moot.
            log.debug("batchtrack: report of %s not kept: %s", self.item_id, exc)
        except Exception:
            # A store that cannot keep reports, or a passing failure: progress is
            # best effort, and never fails the item it describes.
            log.warning("batchtrack: report of %s not kept", self.item_id, exc_info=True)


def report_progress(fraction: float, *, stage: str | None = None) -> bool:
    """Report how far the item the calling processor runs is (``fraction`` in [0, 1]).

    Call it from a processor run by an :class:`~batchtrack.Orchestrator` (in its own
    threads or a :class:`~concurrent.futures.ThreadPoolExecutor` given to it) or a
    :func:`batchtrack.celery.tracked_task`: the item's JSON then carries
    ``"progress"`` (and ``"stage"``) while it runs. Reports are coalesced (at most one
    store write per item per half second or per 1 % change; a new stage is written at
    once; the last one before the item ends).

    Returns:
        True if the report was taken; False when the caller runs no item (outside a
        runner, or under another executor, such as a process pool or a Dask client,
        where the item's tracker is not at hand).

    Raises:
        ValidationError: ``fraction`` outside [0, 1], or a bad ``stage``.
    """
    reporter = _current.get()
    if reporter is None:
        check_report(fraction, stage)
        return False
    reporter(fraction, stage)
    return True


def run_reporting(reporter: ItemReporter, processor: Callable[[Any], Any], item: Any) -> Any:
    """Call ``processor(item)`` with ``reporter`` as the current item's reporter, and
    write its last report before returning (or raising)."""
    token = _current.set(reporter)
    try:
        return processor(item)
    finally:
        _current.reset(token)
        reporter.flush()
