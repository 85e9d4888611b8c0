"""Run batches on Celery workers: a tracked task for the workers, a runner for the web tier.

Needs Celery: ``pip install 'batchtrack[celery]'``.

The web tier creates a batch and sends one message per item, ``(batch_id, item_id)``;
a worker that receives one starts the item in the tracker, reads its source from there,
runs the processor and records the outcome. Every guarantee rests on two facts: the
tracker's transitions are atomic and repeating one is a no-op, and the task is
acknowledged only after it ran (``acks_late``), so a message whose worker died is
delivered again.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any

try:
    from celery import Celery  # type: ignore[import-untyped]
    from celery.exceptions import (  # type: ignore[import-untyped]
        Reject,
        SoftTimeLimitExceeded,
        TimeLimitExceeded,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    from ._extras import missing

    raise ImportError(missing("batchtrack.celery", "Celery", "celery")) from exc

import attrs

from . import _report
from ._models import BatchSnapshot, Item, ProgressEvent, Status
from ._orchestrator import INPUT_NOT_KEPT_ERROR, ItemLike, _as_item, error_message
from ._sweeper import Sweeper
from ._tracker import INPUT_NOT_KEPT, BatchTracker
from .exceptions import (
    BatchNotFound,
    BatchPaused,
    InvalidTransition,
    ItemNotFound,
    ProcessingError,
    StoreError,
    ValidationError,
)

__all__ = [
    "DEFAULT_TASK_NAME",
    "HARD_TIME_LIMIT_GRACE",
    "MAX_BACKOFF",
    "CeleryRunner",
    "retry_delay",
    "tracked_task",
]

log = logging.getLogger("batchtrack")

DEFAULT_TASK_NAME = "batchtrack.process_item"
"""The name :func:`tracked_task` registers its task under when given no ``name``."""

MAX_BACKOFF = 60.0
"""No retry waits longer than this many seconds."""

HARD_TIME_LIMIT_GRACE = 5.0
"""Seconds past a task's ``time_limit`` until Celery kills a process whose processor did
not stop at the soft limit."""

_STORE_BACKOFF_FLOOR = 0.5  # a store outage is never retried in a tight loop


def retry_delay(
    retry_backoff: float, retries: int, *, rng: Callable[[], float] = random.random
) -> float:
    """Seconds to wait before the next retry, after ``retries`` retries so far.

    The wait doubles from ``retry_backoff`` with every retry and is capped at
    :data:`MAX_BACKOFF`; then it is drawn uniformly from the upper half of that
    ("equal jitter": between half and all of it), so that items failing together do not
    come back together.

    Args:
        retry_backoff: The wait before the first retry, before jitter.
        retries: How many retries happened already (0 before the first).
        rng: A source of floats in [0, 1), like :func:`random.random`.
    """
    ceiling = min(MAX_BACKOFF, retry_backoff * 2.0 ** min(retries, 64))
    return ceiling * (0.5 + 0.5 * rng())


def _check_seconds(value: object, what: str, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"{what} must be a number of seconds, not {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        kind = "a finite number >= 0" if allow_zero else "a positive finite number"
        raise ValidationError(f"{what} must be {kind} of seconds, not {value!r}")
    return float(value)


@attrs.frozen
class _Job:
    """What a tracked task does with one message: everything but the Celery plumbing."""

    tracker: BatchTracker
    processor: Callable[[Item], Any]
    max_retries: int
    retry_backoff: float
    lease: float | None
    time_limit: float | None = None  # as given: it is said in the error

    @property
    def heartbeat_interval(self) -> float:
        return (self.tracker.lease if self.lease is None else self.lease) / 3

    @property
    def timed_out(self) -> str:
        return f"timed out after {self.time_limit} s"

    def on_failure(self, exc: BaseException, args: Sequence[Any]) -> None:
        """Celery's failure hook: after a hard time limit killed the process running the
        task (called in the worker's main process), fail its item."""
        if self.time_limit is None or not isinstance(exc, TimeLimitExceeded) or len(args) < 2:
            return
        batch_id, item_id = args[0], args[1]
        try:
            self.tracker.fail_item(batch_id, item_id, self.timed_out)
        except (InvalidTransition, BatchNotFound, ItemNotFound):
            pass  # finished meanwhile, or gone
        except Exception:
            log.exception("batchtrack: could not fail item %s, which timed out", item_id)

    def run(
        self, task: Any, batch_id: str, item_id: str, failures: int, done: bool, error: str | None
    ) -> str | None:
        if done:  # processed before; only the outcome is left to record
            return self._record(task, batch_id, item_id, failures, error)
        try:
            item = self._begin(batch_id, item_id)
        except StoreError as exc:
            raise self._retry_store(task, exc, batch_id, item_id, failures) from None
        if item is None:
            return None
        deadline = None if self.time_limit is None else time.monotonic() + self.time_limit
        try:
            with self._heartbeats(batch_id, item_id, deadline):
                # batchtrack.report_progress() in the processor reports on this item.
                reporter = _report.ItemReporter(self.tracker, batch_id, item_id)
                _report.run_reporting(reporter, self.processor, item)
        except SoftTimeLimitExceeded:
            # Celery's soft time limit interrupted the processor: no retry (it would
            # take as long again).
            log.warning("batchtrack: item %s of batch %s %s", item_id, batch_id, self.timed_out)
            error = self.timed_out
        except Exception as exc:
            if failures < self.max_retries and not isinstance(exc, ProcessingError):
                countdown = retry_delay(self.retry_backoff, failures)
                log.warning(
                    "batchtrack: item %s of batch %s failed (%s: %s); retry %d of %d in %.1f s",
                    item_id,
                    batch_id,
                    type(exc).__name__,
                    exc,
                    failures + 1,
                    self.max_retries,
                    countdown,
                )
                self._hold(batch_id, item_id, countdown)
                raise self._retry(
                    task, exc, countdown, batch_id, item_id, failures=failures + 1
                ) from None
            if not isinstance(exc, ProcessingError):
                log.error(
                    "batchtrack: item %s (%s) of batch %s failed",
                    item_id,
                    item.filename,
                    batch_id,
                    exc_info=exc,
                )
            error = error_message(exc, item)
        return self._record(task, batch_id, item_id, failures, error)

    def _begin(self, batch_id: str, item_id: str) -> Item | None:
        """Start the item and take its lease; None when it is not to be processed."""
        try:
            event = self.tracker.start_item(batch_id, item_id, lease=self.lease)
            if not event.changed:
                # Already processing: a redelivery after its worker died, or a retry of
                # ours. Starting again was a no-op; the lease is this worker's now.
                event = self.tracker.heartbeat(batch_id, item_id, lease=self.lease)
        except BatchPaused:
            # The item stays pending; unpausing resumes the batch, which sends it again.
            log.info("batchtrack: batch %s is paused; item %s skipped", batch_id, item_id)
            return None
        except InvalidTransition as exc:
            # Final: completed by an earlier delivery, failed, or cancelled.
            log.info(
                "batchtrack: item %s of batch %s is %s; skipped", item_id, batch_id, exc.current
            )
            return None
        except (BatchNotFound, ItemNotFound):
            log.warning("batchtrack: item %s of batch %s is gone; skipped", item_id, batch_id)
            return None
        snap = event.item
        if snap.source == INPUT_NOT_KEPT:
            # Submitted elsewhere with bytes or a file object: nothing here can read it,
            # and its filename could name another file.
            with suppress(InvalidTransition, BatchNotFound, ItemNotFound):
                self.tracker.fail_item(batch_id, item_id, INPUT_NOT_KEPT_ERROR)
            return None
        return Item(snap.filename, source=snap.source, id=item_id, batch_id=batch_id)

    @contextmanager
    def _heartbeats(
        self, batch_id: str, item_id: str, deadline: float | None = None
    ) -> Iterator[None]:
        """Renew the item's lease from a background thread while the block runs; at the
        ``deadline`` (``time.monotonic()``), fail the item as timed out and stop."""
        stop = threading.Event()

        def beat() -> None:
            while True:
                wait = self.heartbeat_interval
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                if stop.wait(max(wait, 0.0)):
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    # Recorded here, whatever the processor does with Celery's soft
                    # limit (and where Celery enforces no limit: a threads pool).
                    self.on_failure(TimeLimitExceeded(self.time_limit), (batch_id, item_id))
                    return
                try:
                    self.tracker.heartbeat(batch_id, item_id, lease=self.lease)
                except (InvalidTransition, BatchNotFound, ItemNotFound) as exc:
                    # Reclaimed, settled elsewhere or gone: the lease is no longer ours.
                    log.warning(
                        "batchtrack: heartbeats stop for item %s of batch %s: %s",
                        item_id,
                        batch_id,
                        exc,
                    )
                    return
                except Exception as exc:  # a store hiccup; the next beat may get through
                    log.warning(
                        "batchtrack: heartbeat for item %s of batch %s failed: %s",
                        item_id,
                        batch_id,
                        exc,
                    )

        thread = threading.Thread(target=beat, name="batchtrack-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _hold(self, batch_id: str, item_id: str, countdown: float) -> None:
        """Extend the lease over the wait before a retry, so the item is not lost meanwhile."""
        lease = self.tracker.lease if self.lease is None else self.lease
        try:
            self.tracker.heartbeat(batch_id, item_id, lease=countdown + lease)
        except Exception as exc:  # the retry still happens; the lease may run out meanwhile
            log.warning(
                "batchtrack: could not hold item %s of batch %s for its retry: %s",
                item_id,
                batch_id,
                exc,
            )

    def _record(
        self, task: Any, batch_id: str, item_id: str, failures: int, error: str | None
    ) -> str | None:
        """Record the outcome: completed when ``error`` is None, else failed with it."""
        try:
            if error is None:
                event = self._complete(batch_id, item_id)
            else:
                event = self.tracker.fail_item(batch_id, item_id, error)
        except StoreError as exc:
            raise self._retry_store(
                task, exc, batch_id, item_id, failures, done=True, error=error
            ) from None
        except InvalidTransition as exc:
            log.warning(
                "batchtrack: item %s of batch %s is %s already; its outcome here is dropped",
                item_id,
                batch_id,
                exc.current,
            )
            return None
        except (BatchNotFound, ItemNotFound):
            log.warning(
                "batchtrack: item %s of batch %s is gone; outcome dropped", item_id, batch_id
            )
            return None
        return event.item.status.value

    def _complete(self, batch_id: str, item_id: str) -> ProgressEvent:
        try:
            return self.tracker.complete_item(batch_id, item_id)
        except InvalidTransition as exc:
            if exc.current != Status.PENDING:
                raise
            # Reclaimed while we worked (our lease ran out), yet the work is done:
            # record it rather than leave the item to run again.
            self.tracker.start_item(batch_id, item_id, lease=self.lease)
            return self.tracker.complete_item(batch_id, item_id)

    def _retry_store(
        self,
        task: Any,
        exc: StoreError,
        batch_id: str,
        item_id: str,
        failures: int,
        *,
        done: bool = False,
        error: str | None = None,
    ) -> BaseException:
        # A store outage is waited out, however long: nothing can be recorded meanwhile,
        # and it says nothing about the item, so it spends none of its retries.
        countdown = retry_delay(
            max(self.retry_backoff, _STORE_BACKOFF_FLOOR), task.request.retries or 0
        )
        log.warning(
            "batchtrack: the store failed for item %s of batch %s (%s); trying again in %.1f s",
            item_id,
            batch_id,
            exc,
            countdown,
        )
        return self._retry(
            task, exc, countdown, batch_id, item_id, failures=failures, done=done, error=error
        )

    @staticmethod
    def _retry(
        task: Any, exc: Exception, countdown: float, batch_id: str, item_id: str, **kwargs: Any
    ) -> BaseException:
        """Send the retry message; what is returned is raised by the caller."""
        outcome: BaseException
        try:
            outcome = task.retry(
                args=(batch_id, item_id), kwargs=kwargs, exc=exc, countdown=countdown, throw=False
            )
        except Reject:
            # The retry could not be sent (the broker is down too). Celery would drop
            # the message; put it back instead: a broker that stays down keeps it unacked
            # and hands it out again after the visibility timeout.
            outcome = Reject(f"could not send the retry: {exc}", requeue=True)
        return outcome


def tracked_task(
    celery_app: Any,
    tracker: BatchTracker,
    processor: Callable[[Item], Any],
    *,
    name: str | None = None,
    max_retries: int = 3,
    retry_backoff: float = 1.0,
    lease: float | None = None,
    time_limit: float | None = None,
) -> Any:
    """Register a Celery task that processes one item of a batch, keeping the tracker current.

    The task takes ``(batch_id, item_id)``. It is acknowledged late and rejected when its
    worker process is lost, so a message whose worker died is delivered again. It starts
    the item with a lease and renews the lease from a background thread every third of
    it while ``processor`` runs; it acknowledges and skips an item that is already final
    (a redelivery after completion, or a cancelled item). An exception is retried up to
    ``max_retries`` times, ``retry_backoff`` seconds after the first failure and twice
    as long after each next one (at most :data:`MAX_BACKOFF`, with jitter: see
    :func:`retry_delay`); then the item fails with a one-line message.
    :class:`~batchtrack.exceptions.ProcessingError` fails the item at once, with its
    message: it says the input is bad, which no retry changes. A failing store
    (:class:`~batchtrack.StoreError`) is retried with the same back-off for as long as
    it fails, without spending the item's retries; no item is ever counted twice.

    Call it where both the web tier and the workers import it, with the same ``name``,
    so that the messages the web tier sends find the task in the workers; and after
    configuring ``celery_app``, since a task takes defaults such as its serializer from
    the configuration when it is created.

    Args:
        celery_app: The :class:`celery.Celery` application to register the task with.
        tracker: Where progress is recorded; its store must be shared by every worker
            and the web tier (Redis or SQLite).
        processor: Called with each :class:`~batchtrack.Item` (``id``, ``batch_id`` and
            the stored ``source`` set); returning completes the item, raising fails it
            (see :class:`batchtrack.typing.Processor`).
        name: The task's name; None for :data:`DEFAULT_TASK_NAME`. Give each tracked
            task of one app its own.
        max_retries: How many times a failing item is tried again (0: never).
        retry_backoff: Seconds before the first retry (before jitter); 0 retries at once.
        lease: Seconds an item stays leased to its worker between heartbeats; None for
            the tracker's ``lease``.
        time_limit: Seconds the processor may run on one item; None: no limit. Past it
            the item fails with the error ``"timed out after N s"``, with no retry.
            It becomes the task's ``soft_time_limit`` (Celery raises
            :class:`~celery.exceptions.SoftTimeLimitExceeded` in the processor) and,
            :data:`HARD_TIME_LIMIT_GRACE` seconds later, its ``time_limit`` (Celery kills
            the process of a processor that went on anyway; the message is
            acknowledged, not delivered again). The task's heartbeat thread fails the
            item at the limit itself too, so it ends failed even in a pool where
            Celery enforces no time limits (threads, solo).

    Returns:
        The Celery task: ``task.delay(batch_id, item_id)`` sends a message; pass it to
        :class:`CeleryRunner`. It returns the item's final status (``"completed"`` or
        ``"failed"``), or None when it skipped the item.

    Raises:
        ValidationError: A bad argument, or ``name`` is taken in ``celery_app``.
    """
    if not isinstance(celery_app, Celery):
        raise ValidationError(
            f"celery_app must be a celery.Celery application, not {type(celery_app).__name__}"
        )
    if not isinstance(tracker, BatchTracker):
        raise ValidationError(f"tracker must be a BatchTracker, not {type(tracker).__name__}")
    if not callable(processor):
        raise ValidationError("processor must be callable with one Item")
    if name is None:
        name = DEFAULT_TASK_NAME
    if not isinstance(name, str) or not name.strip():
        raise ValidationError(f"name must be a non-empty string, not {name!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValidationError(f"max_retries must be a whole number >= 0, not {max_retries!r}")
    backoff = _check_seconds(retry_backoff, "retry_backoff", allow_zero=True)
    if lease is not None:
        lease = _check_seconds(lease, "lease", allow_zero=False)
    limits: dict[str, Any] = {}
    if time_limit is not None:
        _check_seconds(time_limit, "time_limit", allow_zero=False)
        limits = {
            "soft_time_limit": float(time_limit),
            "time_limit": float(time_limit) + HARD_TIME_LIMIT_GRACE,
            # Acknowledged at a hard limit whatever the app's default: the item is
            # failed, and a redelivery would only be skipped.
            "acks_on_timeout": True,
        }
    # Reading the registry directly: ``celery_app.tasks`` would finalize the app.
    if name in celery_app._tasks:
        raise ValidationError(
            f"celery_app has a task named {name!r} already; give this one another name="
        )
    job = _Job(tracker, processor, max_retries, backoff, lease, time_limit)

    def process_item(
        self: Any,
        batch_id: str,
        item_id: str,
        *,
        failures: int = 0,
        done: bool = False,
        error: str | None = None,
    ) -> str | None:
        """Process one item of a batch (batchtrack): start, run the processor, record."""
        return job.run(self, batch_id, item_id, failures, done, error)

    def on_failure(
        self: Any, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        job.on_failure(exc, args if isinstance(args, (list, tuple)) else ())

    task = celery_app.task(
        bind=True,
        name=name,
        shared=False,
        lazy=False,
        acks_late=True,
        reject_on_worker_lost=True,
        # Retries are counted here, per cause (see _Job.run); Celery must not cap them.
        max_retries=None,
        ignore_result=True,
        on_failure=on_failure,
        **limits,
    )(process_item)
    task.batchtrack_job = job
    return task


def _check_task(task: object) -> Any:
    if not isinstance(getattr(task, "batchtrack_job", None), _Job):
        raise ValidationError(
            f"task must be a task made by batchtrack.celery.tracked_task, not {type(task).__name__}"
        )
    return task


@attrs.frozen
class CeleryRunner:
    """Runs batches on Celery workers: a runner for ``create_app`` and your own code.

    It creates batches and sends one message per item to the workers, which run the
    task made by :func:`tracked_task`. It satisfies :class:`batchtrack.typing.Runner`.

    Args:
        tracker: Where batches are created; the same store as the task's tracker.
        task: The task made by :func:`tracked_task`.
        stalled_after: Seconds a batch may go without any change, with items pending and
            none running, before :meth:`reclaim` sends its pending items new messages (a
            message can be lost: a broker without persistence restarting, or a worker
            that took it off the queue just as the broker went down). Keep it above the
            longest a message may wait in the queue; a message sent twice does no harm,
            the second finds its item started or final.

    Raises:
        ValidationError: A bad argument.
    """

    tracker: BatchTracker
    task: Any = attrs.field(converter=_check_task)
    stalled_after: float = attrs.field(default=300.0, kw_only=True)
    # batch id -> when this process last sent its stalled items again
    _resent: dict[str, float] = attrs.field(factory=dict, init=False, repr=False, eq=False)
    _sweeper: Sweeper = attrs.field(
        factory=lambda: Sweeper("batchtrack-sweeper"), init=False, repr=False, eq=False
    )

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.tracker, BatchTracker):
            raise ValidationError(
                f"tracker must be a BatchTracker, not {type(self.tracker).__name__}"
            )
        stalled = self.stalled_after
        if isinstance(stalled, bool) or not isinstance(stalled, (int, float)) or not stalled > 0:
            raise ValidationError(
                f"stalled_after must be a positive number of seconds, not {stalled!r}"
            )

    @property
    def processor(self) -> Callable[[Item], Any]:
        """The task's processor (the HTTP API finds an ``output_dir`` on it for results)."""
        job: _Job = self.task.batchtrack_job
        return job.processor

    def submit(
        self,
        items: Iterable[ItemLike],
        *,
        owner: str | None = None,
        key: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> BatchSnapshot:
        """Create a batch of ``items`` and send one message per item to the workers.

        Args:
            items: :class:`~batchtrack.Item` values, or paths (the filename is the base
                name, the source the path). A source must be a path or a string the
                workers can resolve (a shared path, a URL, a key in your storage): it is
                stored with the item, and workers read it from there.
            owner: Who owns the batch (see :meth:`BatchTracker.get`).
            key: An idempotency key (see :meth:`BatchTracker.create_batch`): a submit
                with a key that names a batch already sends nothing and returns that
                batch as it is now.

            metadata: String pairs kept and shown with the batch (see
                :meth:`BatchTracker.create_batch`).

        Returns:
            The new batch, all pending (or the batch ``key`` named).

        Raises:
            ValidationError: No items, a bad item, duplicate ids, a malformed key or one
                that names other items, bad metadata.
            Exception: The broker refused a message (as raised by Celery). The batch is
                then cancelled, so that no item waits for a message that never comes.
        """
        if isinstance(items, (str, bytes, os.PathLike)) or not isinstance(items, Iterable):
            raise ValidationError("items must be an iterable of Items or paths")
        prepared = [_as_item(value, n) for n, value in enumerate(items)]
        if key is None and metadata is None:
            snap = self.tracker.create_batch(prepared, owner=owner)
        else:
            snap, created = self.tracker._create_batch(prepared, owner, key, metadata)
            if not created:
                return snap
        try:
            self._send(snap.batch_id, [item.id for item in snap.items])
        except Exception:
            try:
                self.tracker.cancel(snap.batch_id)
            except Exception:
                log.exception("batchtrack: could not cancel batch %s", snap.batch_id)
            raise
        return snap

    def resume(self, batch_id: str) -> BatchSnapshot:
        """Send a message for every pending item of the batch (after a retry or a reclaim).

        Items that already have a message on its way are sent again; the second message
        finds the item started or final and changes nothing.

        Returns:
            The batch as it was before the messages went out.

        Raises:
            BatchNotFound: Unknown or expired batch.
            Exception: The broker refused a message (as raised by Celery); the items not
                sent stay pending: resume again.
        """
        snap = self.tracker.get(batch_id)
        self._send(batch_id, [item.id for item in snap.items if item.status is Status.PENDING])
        return snap

    def cancel(self, batch_id: str) -> bool:
        """Cancel every pending item (status ``cancelled``); True if any was.

        Items being processed finish as they will. Messages already sent for cancelled
        items are acknowledged and skipped by the workers. False for an unknown or
        finished batch.
        """
        try:
            return self.tracker.cancel(batch_id) > 0
        except BatchNotFound:
            return False

    def reclaim(self) -> int:
        """Take back lost items (see :meth:`BatchTracker.reclaim`) and send them again,
        and send new messages for the pending items of stalled batches.

        Lost items that went back to pending get a new message; those that ran out of
        attempts fail. A batch is stalled when it has pending items, none running, and
        no change for ``stalled_after`` seconds: its messages were lost. Run it now and
        then (:meth:`start_sweeper`, a Celery beat task, a cron job).

        Returns:
            How many lost items were moved.
        """
        moved = self.tracker.reclaim_items()
        again: dict[str, list[str]] = {}
        for batch_id, item_id, status in moved:
            if status is Status.PENDING:
                again.setdefault(batch_id, []).append(item_id)
        for batch_id, item_ids in again.items():
            self._send(batch_id, item_ids)
        self._resend_stalled(set(again))
        return len(moved)

    def _resend_stalled(self, sent: set[str]) -> None:
        now = self.tracker.clock()
        open_batches = self.tracker.open_batches()
        for batch_id in set(self._resent) - set(open_batches):
            del self._resent[batch_id]
        for batch_id in open_batches:
            if batch_id in sent or now - self._resent.get(batch_id, -math.inf) < self.stalled_after:
                continue
            try:
                snap = self.tracker.get(batch_id, items=False)
            except BatchNotFound:
                continue
            idle = now - snap.updated_at.timestamp()
            if (
                snap.progress.pending
                and not snap.progress.processing
                and snap.status is not Status.PAUSED  # held on purpose, not lost
                and idle >= self.stalled_after
            ):
                log.warning(
                    "batchtrack: batch %s has had no change for %.0f s with %d items pending "
                    "and none running; sending their messages again",
                    batch_id,
                    idle,
                    snap.progress.pending,
                )
                self.resume(batch_id)
                self._resent[batch_id] = now

    def start_sweeper(self, interval: float = 60.0) -> None:
        """Run :meth:`reclaim` and the tracker's :meth:`~BatchTracker.cleanup` every
        ``interval`` seconds in a daemon thread (instead of the tracker's own sweeper).

        Raises:
            ValidationError: ``interval`` is not a positive number.
            RuntimeError: A sweeper is already running.
        """
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval > 0:
            raise ValidationError(f"interval must be a positive number, not {interval!r}")
        self._sweeper.start(
            interval, [("reclaimed lost items", self.reclaim), ("removed", self.tracker.cleanup)]
        )

    def stop_sweeper(self) -> None:
        """Stop the sweeper thread and wait for it; does nothing when none runs."""
        self._sweeper.stop()

    def _send(self, batch_id: str, item_ids: Sequence[str]) -> None:
        if not item_ids:
            return
        with self.task.app.producer_or_acquire() as producer:
            for item_id in item_ids:
                self.task.apply_async((batch_id, item_id), producer=producer)
