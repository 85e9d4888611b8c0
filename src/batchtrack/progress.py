"""A batch's live progress bar in a terminal: the bar of ``batchtrack process``.

Needs tqdm: ``pip install 'batchtrack[cli]'``.

For a script with a tracker and no web page, :func:`show` draws a batch's bar until the
batch finishes, whoever runs it::

    snap = orchestrator.submit(paths)
    show(tracker, snap.batch_id)

:class:`ProgressBar` is the bar itself, to pass as ``on_progress=`` to
:meth:`Orchestrator.submit <batchtrack.Orchestrator.submit>`. The bar shows how many
items are done of how many, the rate, and the counts with the ETA and its 80% range:
``12/40 [00:09, 1.31img/s, 11 ok, 1 failed, ETA 21s (15s–30s)]``.
"""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import IO

try:
    from tqdm import tqdm
except ImportError as exc:  # pragma: no cover - depends on the environment
    from ._extras import missing

    raise ImportError(missing("batchtrack.progress", "tqdm", "cli")) from exc

from ._models import BatchSnapshot, Progress, ProgressEvent
from ._tracker import BatchTracker
from ._watch import subscribe

__all__ = ["ProgressBar", "describe", "duration", "show"]

_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"
_GAP = 0.1  # seconds between two reads of the batch by show(), however often it changes
_CHECK = 5.0  # seconds between reads by show() while the store reports every change


def duration(seconds: int, rounding: str = "nearest") -> str:
    """``45s``, ``3m``, ``1h 05m``: as precise as a person needs.

    Seconds under a minute, whole minutes from a minute on, hours and minutes from an
    hour and a half. ``rounding`` is how seconds become minutes: ``"nearest"`` for an
    estimate, ``"down"`` and ``"up"`` for the ends of a range (which then still holds
    every time it held).
    """
    if seconds < 60:
        return f"{seconds}s"
    if rounding == "down":
        minutes = seconds // 60
    elif rounding == "up":
        minutes = -(-seconds // 60)
    else:
        minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _span(low: int, high: int) -> str:
    """A range as shown: its low end rounded down, its high end up, and never a point
    (``5s–5s``, ``2m–2m``): ends that read the same are shown one unit apart."""
    shown_low, shown_high = duration(low, "down"), duration(high, "up")
    if shown_low == shown_high:
        shown_high = duration(high + 1 if high < 60 else (high // 60 + 1) * 60, "up")
    return f"{shown_low}–{shown_high}"


def describe(
    progress: Progress, eta: int | None = None, eta_range: tuple[int, int] | None = None
) -> str:
    """The bar's counts and ETA: ``3 ok, 1 failed, ETA 2m (1m–3m)`` (and ``, 2
    cancelled`` when some were); no ETA once nothing is left to wait for.

    The range is widened to hold the estimate if it did not, and shown by
    :func:`duration` with its ends rounded outwards, never as a point.
    """
    text = f"{progress.completed} ok, {progress.failed} failed"
    if progress.cancelled:
        text += f", {progress.cancelled} cancelled"
    if eta is None or progress.pending + progress.processing == 0:
        return text
    text += f", ETA {duration(eta)}"
    if eta_range is not None:
        low, high = eta_range
        text += f" ({_span(min(low, eta), max(high, eta))})"
    return text


class ProgressBar:
    """A progress bar of one batch, fed by its progress events or snapshots.

    Pass it as ``on_progress=`` (it is a :class:`~batchtrack.typing.ProgressCallback`),
    or call :meth:`update` with snapshots; close it when the batch is over (or use it as
    a context manager). Each update sets the bar to the batch's counts, so events may be
    missed or repeated.

    Args:
        total: The number of items, when known before the first update.
        file: Where the bar is drawn. None: standard error, and only when it is a
            terminal (a script's log stays clean); a file given is always drawn to.
        unit: What an item is called in the rate (``img`` gives ``1.31img/s``).
        description: Text before the bar.
    """

    def __init__(
        self,
        total: int | None = None,
        *,
        file: IO[str] | None = None,
        unit: str = "it",
        description: str | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._file = sys.stderr if file is None else file
        self._bar = tqdm(
            total=total,
            desc=description,
            unit=unit,
            file=self._file,
            dynamic_ncols=file is None,
            bar_format=_FORMAT,
            disable=None if file is None else False,  # None: drawn on a terminal only
        )

    def __call__(self, event: ProgressEvent) -> None:
        """Show the counts and ETA of a progress event."""
        self._show(event.progress, event.estimated_time_remaining, event.eta_range)

    def update(self, snapshot: BatchSnapshot) -> None:
        """Show the counts and ETA of a batch snapshot (one read with ``items=False``
        is enough)."""
        self._show(snapshot.progress, snapshot.estimated_time_remaining, snapshot.eta_range)

    def _show(self, progress: Progress, eta: int | None, eta_range: tuple[int, int] | None) -> None:
        with self._lock:
            bar = self._bar
            if bar.total != progress.total:
                bar.total = progress.total
            bar.set_postfix_str(describe(progress, eta, eta_range), refresh=False)
            done = progress.finished  # cancelled items too: the bar ends full
            if done != bar.n:
                bar.update(done - bar.n)
            else:
                bar.refresh()

    def write(self, text: str) -> None:
        """Print a line above the bar (on its file, even where the bar is not drawn)."""
        with self._lock:
            self._bar.write(text, file=self._file)

    def close(self) -> None:
        """Leave the bar as it is on screen and stop drawing it; closing twice is fine."""
        with self._lock:
            self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def show(
    tracker: BatchTracker,
    batch_id: str,
    *,
    owner: str | None = None,
    file: IO[str] | None = None,
    interval: float = 0.5,
) -> BatchSnapshot:
    """Draw a batch's live progress bar until the batch finishes; return its final snapshot.

    The batch may run anywhere (an :class:`~batchtrack.Orchestrator` in this process,
    another process, Celery workers): the bar reads the tracker whenever its store reports
    a change of the batch (memory and Redis stores), at most ten times a second, or every
    ``interval`` seconds when the store cannot report changes (SQLite).
    Ctrl-C stops showing (the ``KeyboardInterrupt`` goes on), not the batch.

    Args:
        tracker: The tracker of the batch.
        batch_id: The batch.
        owner: The caller's identity, checked as by :meth:`BatchTracker.get`.
        file: Where the bar is drawn (see :class:`ProgressBar`): None draws it on
            standard error when that is a terminal.
        interval: Seconds between two reads of a store that cannot report changes.

    Returns:
        The finished batch with all its items.

    Raises:
        BatchNotFound: The batch is unknown, expired or deleted meanwhile, or someone
            else's.
    """
    woken = threading.Event()
    subscription = subscribe(tracker.store, batch_id, woken.set)
    try:
        with ProgressBar(file=file, unit="item") as bar:
            while True:
                woken.clear()  # before the read: a change during it wakes the next wait
                head = tracker.get(batch_id, owner=owner, items=False)
                bar.update(head)
                if head.status.is_final:
                    break
                live = subscription is not None and subscription.live
                woken.wait(_CHECK if live else interval)
                time.sleep(_GAP)  # a busy batch's changes are read together
        return tracker.get(batch_id, owner=owner)
    finally:
        if subscription is not None:
            subscription.close()
