"""Orchestrator: run a processor over the items of a batch, keeping the tracker current."""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import queue
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import CancelledError, Executor, Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool, ProcessPoolExecutor
from typing import Any, TypeVar, Union

import attrs

from . import _report
from ._closing import Closing
from ._models import BatchSnapshot, Item, ProgressEvent, Status
from ._tracker import _COMPLETE, _FAIL, _START, CANCELLED, INPUT_NOT_KEPT, BatchTracker
from ._watch import subscribe
from .exceptions import (
    BatchNotFound,
    BatchtrackError,
    FileStorageError,
    InvalidTransition,
    OrchestratorClosed,
    ProcessingError,
    StoreError,
    ValidationError,
)

__all__ = ["CANCELLED", "Orchestrator"]

log = logging.getLogger("batchtrack")

_T = TypeVar("_T")
ItemLike = Union[Item, str, "os.PathLike[str]"]
_MAX_MESSAGE = 300
_FINISHED_KEPT = 4096  # batches whose run here ended, remembered for wait()
_WAIT_POLL = 0.5  # seconds between reads of a batch run elsewhere, on a store that cannot listen
_WAIT_CHECK = 60.0  # ... on one that can: a read now and then all the same, for expiry
# A path starts after a space, quote or bracket: never inside a URL (s3://bucket/key).
_PATH = re.compile(r"(?<![\w:/\\])(?:[A-Za-z]:)?(?:[\\/][^\s\\/'\"():,;]+)+[\\/]?")


def _as_item(value: object, position: int) -> Item:
    if isinstance(value, Item):
        if not isinstance(value.filename, str) or not value.filename.strip():
            raise ValidationError(f"item {position}: filename must be a non-empty string")
        return value
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not isinstance(path, str):
            raise ValidationError(f"item {position}: paths must be text, not bytes")
        name = os.path.basename(path.rstrip("/\\"))
        if not name:
            raise ValidationError(f"item {position}: {path!r} names no file")
        return Item(name, source=value)
    raise ValidationError(
        f"item {position}: expected an Item or a path, not {type(value).__name__}"
    )


def error_message(exc: BaseException, item: Item) -> str:
    """One line for users: the message of a ProcessingError, else ``Type: message``.

    Server paths never reach users: the item's own source becomes its filename and any
    other absolute path its last component. A file storage that could not be reached is
    said in plain words, without its address (the log has it).
    """
    if isinstance(exc, FileStorageError):
        return "the file storage could not be reached; retry later"
    try:
        text = str(exc).strip()
    except Exception:  # a broken __str__: the type name says enough
        text = ""
    text = text.splitlines()[0] if text else ""
    if isinstance(item.source, (str, os.PathLike)):
        source = os.fspath(item.source)
        if isinstance(source, str) and source:
            text = text.replace(source, item.filename)
    text = _PATH.sub(lambda m: os.path.basename(m.group(0).rstrip("/\\")) or "/", text)
    if not isinstance(exc, ProcessingError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    text = text or "processing failed"
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


@attrs.define(eq=False)
class _Run:
    """One submitted batch: what is left to start, what runs, and who to tell."""

    batch_id: str
    pending: collections.deque[Item]
    on_progress: Callable[[ProgressEvent], Any] | None
    ids: set[str] = attrs.Factory(set)  # items queued or running here
    running: int = 0
    settled: bool = False  # nothing left to run; its last event is queued
    done: threading.Event = attrs.field(factory=threading.Event)  # ... and delivered
    # Held from a tracker call until its event is queued, so that events are delivered
    # in the order the store applied the transitions.
    order: threading.Lock = attrs.field(factory=threading.Lock)

    @property
    def idle(self) -> bool:
        return not self.pending and not self.running


@attrs.define(eq=False)
class _Call:
    """One call of the processor handed to an executor: its deadline and whether its
    outcome still counts (it stops counting once recorded, or once the item timed out)."""

    run: _Run
    item: Item
    executor: Executor
    deadline: float  # time.monotonic(); inf without a time limit
    over: bool = False  # its outcome was taken (or it timed out): a late one is ignored
    timed_out: bool = False
    stuck: bool = False  # timed out in a thread of the owned pool, which still runs it


class _DaemonThreads(Executor):
    """The pool of an orchestrator with a time limit: a thread per call running at once.

    A thread stuck in a call that timed out cannot be killed; the orchestrator counts it
    as stuck and the next call gets a new thread. Its threads are daemons, so a call that
    never returns does not keep the interpreter from exiting (a
    :class:`~concurrent.futures.ThreadPoolExecutor` joins its threads at exit).
    """

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None]
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._threads: set[threading.Thread] = set()
        self._shutdown = False
        self._made = 0

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        future: Future[_T] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._queue.put((future, lambda: fn(*args, **kwargs)))
            if self._idle:
                self._idle -= 1
            else:
                self._made += 1
                thread = threading.Thread(
                    target=self._work, name=f"{self._prefix}_{self._made}", daemon=True
                )
                self._threads.add(thread)
                thread.start()
        return future

    def _work(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                break
            future, call = task
            del task
            if future.set_running_or_notify_cancel():
                try:
                    result = call()
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del future, call
            with self._lock:
                if self._shutdown:
                    break
                self._idle += 1
        with self._lock:
            self._threads.discard(threading.current_thread())

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Idle threads end now, busy ones after their call; ``wait`` joins the threads
        that are not stuck (a stuck call may never return)."""
        with self._lock:
            self._shutdown = True
            for _ in range(self._idle):
                self._queue.put(None)
            self._idle = 0
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()


@attrs.define(eq=False, init=False)
class Orchestrator(Closing):
    """Runs a processor over batches with bounded concurrency; the tracker follows along.

    Args:
        tracker: Where progress is recorded.
        processor: Called with each :class:`~batchtrack.Item` (``id`` and ``batch_id``
            set); returning completes the item, raising fails it (see
            :class:`batchtrack.typing.Processor`).
        concurrency: At most this many items run at once, over all batches.
        executor: Where processors run: any :class:`concurrent.futures.Executor` (a
            process pool, a distributed engine's executor). None: a thread pool of
            ``concurrency`` threads owned (and shut down) by the orchestrator. Tracker
            updates always happen in this process.
        store_retry: Seconds to keep retrying a tracker call that failed with a
            :class:`~batchtrack.StoreError` (a store outage, SQLite's "database is
            locked" beyond its busy timeout), waiting 0.05 s, then twice as long each time
            up to 2 s. An item whose start could not be recorded is never processed; once
            the store answers again the batch goes on. Past this time the item is given up
            here, as it stands in the store (its lease runs out and it is reclaimed); 0
            gives up at once.
        item_timeout: Seconds an item may run (from when it is handed to the executor);
            None: no limit. An item running longer fails with the error
            ``"timed out after N s"``, its lease is no longer renewed, and what its call
            returns or raises later is ignored; its slot goes to the next item at once.
            A thread cannot be killed: in the orchestrator's own pool a new thread
            takes the stuck one's place, and at most ``concurrency`` stuck threads are
            replaced (past that, the next items wait until a stuck call returns). A
            :class:`~concurrent.futures.ProcessPoolExecutor` is replaced by a new one
            like it (the orchestrator then owns and closes it) and the old one's
            processes are killed; the other items they were running start over in the
            new pool. Another executor keeps its worker busy until the call returns.

    Raises:
        ValidationError: A bad argument.
    """

    tracker: BatchTracker
    processor: Callable[[Item], Any]
    concurrency: int
    executor: Executor
    store_retry: float
    item_timeout: float | None
    _owns_executor: bool
    # Reentrant: a chain (see _chain) holds it around a whole step, whose parts take it too.
    _lock: threading.RLock
    _runs: dict[str, _Run]
    _order: collections.deque[_Run]
    _running: int
    _closed: bool
    _events: queue.SimpleQueue[tuple[_Run, ProgressEvent | None]]
    _dispatcher: threading.Thread | None
    _dispatcher_lock: threading.Lock
    _registering: threading.Lock
    _leased: dict[tuple[str, str], None]  # running items whose lease we renew
    _beater: threading.Thread | None
    _stop_beating: threading.Event
    _finished: dict[str, None]  # batches whose run here ended lately, for wait()
    _calls: dict[_Call, None]  # calls with a deadline, not over yet
    _stuck: int  # calls that timed out in the owned thread pool and still run
    _watchdog: threading.Thread | None
    _watch_wake: threading.Event
    _retired: weakref.WeakSet[Executor]  # process pools replaced after a timeout
    # Items whose call ended, waiting for the writer to record them (with the error).
    _writes: list[tuple[_Run, Item, BaseException | None]]
    _want_starts: bool  # slots may be free: the writer should start what fits
    _writer: threading.Thread | None
    _wake_writer: threading.Condition  # on _lock
    _stop_writing: bool
    # Items run in chains (see _chain): an owned thread pool, no time limit, a store whose
    # calls cost little (the memory store's in-process several-event call).
    _chains: bool

    def __init__(
        self,
        tracker: BatchTracker,
        processor: Callable[[Item], Any],
        *,
        concurrency: int = 4,
        executor: Executor | None = None,
        store_retry: float = 60.0,
        item_timeout: float | None = None,
    ) -> None:
        if not isinstance(tracker, BatchTracker):
            raise ValidationError(f"tracker must be a BatchTracker, not {type(tracker).__name__}")
        if not callable(processor):
            raise ValidationError("processor must be callable with one Item")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValidationError(f"concurrency must be a whole number >= 1, not {concurrency!r}")
        if executor is not None and not isinstance(executor, Executor):
            raise ValidationError(
                f"executor must be a concurrent.futures.Executor, not {type(executor).__name__}"
            )
        if (
            isinstance(store_retry, bool)
            or not isinstance(store_retry, (int, float))
            or not 0 <= store_retry < float("inf")
        ):
            raise ValidationError(
                f"store_retry must be a finite number of seconds >= 0, not {store_retry!r}"
            )
        if item_timeout is not None and (
            isinstance(item_timeout, bool)
            or not isinstance(item_timeout, (int, float))
            or not math.isfinite(item_timeout)
            or item_timeout <= 0
        ):
            raise ValidationError(
                "item_timeout must be a positive finite number of seconds or None, "
                f"not {item_timeout!r}"
            )
        owns = executor is None
        if executor is None and item_timeout is not None:
            executor = _DaemonThreads("batchtrack-worker")
        elif executor is None:
            executor = ThreadPoolExecutor(concurrency, thread_name_prefix="batchtrack-worker")
        lock = threading.RLock()
        self.__attrs_init__(
            tracker,
            processor,
            concurrency,
            executor,
            float(store_retry),
            item_timeout,
            owns,
            lock,
            {},
            collections.deque(),
            0,
            False,
            queue.SimpleQueue(),
            None,
            threading.Lock(),
            threading.Lock(),
            {},
            None,
            threading.Event(),
            {},
            {},
            0,
            None,
            threading.Event(),
            weakref.WeakSet(),
            [],
            False,
            None,
            threading.Condition(lock),
            False,
            owns
            and item_timeout is None
            and getattr(type(tracker.store), "_apply_steps", None) is not None,
        )

    # -- public ---------------------------------------------------------------------------

    def submit(
        self,
        items: Iterable[ItemLike],
        *,
        owner: str | None = None,
        key: str | None = None,
        on_progress: Callable[[ProgressEvent], Any] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> BatchSnapshot:
        """Create a batch of ``items`` and start running it in the background.

        Args:
            items: :class:`~batchtrack.Item` objects, or paths (the filename is the base
                name, the source the path). Items start in this order.
            owner: Who owns the batch (see :meth:`BatchTracker.get`).
            key: An idempotency key (see :meth:`BatchTracker.create_batch`): a submit
                with a key that names a batch already runs nothing and returns that
                batch as it is now.
            on_progress: Called after every transition of this batch (see
                :class:`batchtrack.typing.ProgressCallback`).
            metadata: String pairs kept and shown with the batch (see
                :meth:`BatchTracker.create_batch`).

        Returns:
            The new batch, all pending (or the batch ``key`` named, as it is now).

        Raises:
            ValidationError: No items, a bad item, duplicate ids, a non-callable
                ``on_progress``, a malformed key or one that names other items, bad
                metadata.
            OrchestratorClosed: :meth:`close` was called.
        """
        if on_progress is not None and not callable(on_progress):
            raise ValidationError("on_progress must be callable with one ProgressEvent")
        if isinstance(items, (str, bytes, os.PathLike)) or not isinstance(items, Iterable):
            raise ValidationError("items must be an iterable of Items or paths")
        prepared = [_as_item(value, n) for n, value in enumerate(items)]
        fresh = iter(_uuid4s(sum(1 for item in prepared if item.id is None)))
        ids = [next(fresh) if item.id is None else item.id for item in prepared]
        if self._closed:
            raise OrchestratorClosed("the orchestrator is closed; create a new one")
        # Held from creating the batch until its run is registered, so that a resume of
        # the new batch (a recovery loop sees every open batch) joins this run.
        with self._registering:
            # (id, filename) says what Item(filename, id=id) says, for less.
            stored: list[Item | tuple[str, str]] = []
            for i, item in zip(ids, prepared, strict=True):
                source = None if item.source is None else _stored_source(item.source)
                stored.append(
                    (i, item.filename) if source is None else Item(item.filename, source, i)
                )
            if key is None and metadata is None:
                snap = self.tracker.create_batch(stored, owner=owner)
            else:
                snap, created = self.tracker._create_batch(stored, owner, key, metadata)
                if not created:
                    return snap
            batch_id = snap.batch_id
            self._enqueue(
                batch_id,
                [
                    # What the processor gets: the item with its id and batch id.
                    Item(item.filename, item.source, i, batch_id)
                    if type(item) is Item
                    else attrs.evolve(item, id=i, batch_id=batch_id)
                    for i, item in zip(ids, prepared, strict=True)
                ],
                on_progress,
                fail_if_closed=True,
            )
        return snap

    def resume(
        self, batch_id: str, *, on_progress: Callable[[ProgressEvent], Any] | None = None
    ) -> BatchSnapshot:
        """Run the batch's pending items, from the sources stored with them.

        For a batch that was retried (:meth:`BatchTracker.retry`), whose lost items were
        reclaimed (:meth:`BatchTracker.reclaim`), or that a process now gone had started:
        any orchestrator on the same store can resume it. Items already queued or running
        here are not queued twice; an item that another worker starts first is skipped.
        Each item's processor gets ``Item(filename, source, id, batch_id)`` with the
        stored source (None when the item was given none: its filename is its input).
        An item whose input was not kept (bytes or a file object given to
        :meth:`submit`) is never run from a guess: it fails with the error
        ``"its input was not kept: submit it again"``.

        Args:
            batch_id: The batch.
            on_progress: Called after every transition this orchestrator makes for the
                batch (see :class:`batchtrack.typing.ProgressCallback`); None keeps the
                callback of a run still going here.

        Returns:
            The batch as it was when its pending items were queued.

        Raises:
            BatchNotFound: Unknown or expired batch.
            OrchestratorClosed: :meth:`close` was called.
        """
        if on_progress is not None and not callable(on_progress):
            raise ValidationError("on_progress must be callable with one ProgressEvent")
        if self._closed:
            raise OrchestratorClosed("the orchestrator is closed; create a new one")
        snap = self.tracker.get(batch_id)
        items = [
            Item(
                i.filename,
                source=_UNKEPT if i.source == INPUT_NOT_KEPT else i.source,
                id=i.id,
                batch_id=batch_id,
            )
            for i in snap.items
            if i.status is Status.PENDING
        ]
        with self._registering:
            self._enqueue(batch_id, items, on_progress, fail_if_closed=False)
        return snap

    def _enqueue(
        self,
        batch_id: str,
        items: list[Item],
        on_progress: Callable[[ProgressEvent], Any] | None,
        *,
        fail_if_closed: bool,
    ) -> None:
        """Queue the items of a batch on its run here (a new run unless one is going),
        skipping those already queued or running, and start what fits."""
        with self._lock:
            run = self._runs.get(batch_id)
            if run is None or run.settled:
                run = _Run(batch_id, collections.deque(), on_progress)
                self._runs[batch_id] = run
            elif on_progress is not None:
                run.on_progress = on_progress
            for item in items:
                item_id = item.id
                assert item_id is not None
                if item_id not in run.ids:
                    run.pending.append(
                        item if item.batch_id == batch_id else attrs.evolve(item, batch_id=batch_id)
                    )
                    run.ids.add(item_id)
            if self._closed:
                # Closed meanwhile: nothing more may run. A new batch's items fail; a
                # resumed batch's stay pending for another orchestrator.
                if fail_if_closed:
                    self._fail_pending_locked(run)
                else:
                    run.pending.clear()
                    run.ids.clear()
                self._settle_locked(run)
                raise OrchestratorClosed("the orchestrator is closed; create a new one")
            if run not in self._order:
                self._order.append(run)
            self._settle_locked(run)  # nothing to do at all: done at once
        self._pump()

    def wait(self, batch_id: str, timeout: float | None = None) -> BatchSnapshot:
        """Wait until a batch is finished and, for one submitted here, every callback has
        run.

        A batch not running here (run by another process, another orchestrator, a Celery
        worker) is waited for through the store: woken by it when it can listen
        (:attr:`Store.can_listen <batchtrack.stores.base.Store.can_listen>`: memory,
        Redis), else reading it every 0.5 s. Nothing may ever run it: give a ``timeout``.

        Returns:
            The final snapshot; for a batch whose run here ended without finishing it
            (its items were left to a store outage, or to another worker), the
            snapshot as it is.

        Raises:
            BatchNotFound: The batch does not exist, has expired, or was deleted while
                waiting.
            TimeoutError: It did not finish within ``timeout`` seconds.
        """
        run = self._runs.get(batch_id)
        if run is None and batch_id not in self._finished:
            return self._wait_elsewhere(batch_id, timeout)
        if run is not None and not run.done.wait(timeout):
            raise TimeoutError(f"batch {batch_id!r} did not finish within {timeout} s")
        return self._retrying(f"reading batch {batch_id}", lambda: self.tracker.get(batch_id))

    def _wait_elsewhere(self, batch_id: str, timeout: float | None) -> BatchSnapshot:
        """:meth:`wait` for a batch that runs elsewhere: its header is read whenever the
        store reports a change of it (at the latest every :data:`_WAIT_CHECK` s, for an
        expiry nobody reports), or every :data:`_WAIT_POLL` s while the store cannot."""
        deadline = None if timeout is None else time.monotonic() + timeout
        woken = threading.Event()
        subscription = subscribe(self.tracker.store, batch_id, woken.set)
        what = f"reading batch {batch_id}"
        try:
            while True:
                woken.clear()  # before the read: a change during it wakes the next wait
                head = self._retrying(what, lambda: self.tracker.get(batch_id, items=False))
                if head.status.is_final:
                    return self._retrying(what, lambda: self.tracker.get(batch_id))
                pause = (
                    _WAIT_CHECK if subscription is not None and subscription.live else _WAIT_POLL
                )
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"batch {batch_id!r} did not finish within {timeout} s")
                    pause = min(pause, left)
                woken.wait(pause)
        finally:
            if subscription is not None:
                subscription.close()

    def run(
        self,
        items: Iterable[ItemLike],
        *,
        owner: str | None = None,
        on_progress: Callable[[ProgressEvent], Any] | None = None,
    ) -> BatchSnapshot:
        """:meth:`submit` and :meth:`wait`: run a batch to the end; return its snapshot."""
        snap = self.submit(items, owner=owner, on_progress=on_progress)
        return self.wait(snap.batch_id)

    def cancel(self, batch_id: str) -> bool:
        """Cancel every item of the batch not yet started (status ``cancelled``).

        Items queued here are cancelled one by one (each with its progress event);
        pending items queued nowhere here (another process's, or left by a restart) are
        cancelled through :meth:`BatchTracker.cancel`. Running items finish normally.

        Returns:
            True if any item was cancelled; False for a finished batch, and for one the
            tracker does not know.
        """
        cancelled = False
        with self._lock:
            run = self._runs.get(batch_id)
            if run is not None and not run.settled:
                cancelled = self._fail_pending_locked(run) > 0
                self._settle_locked(run)
        with contextlib.suppress(BatchNotFound):
            cancelled = self.tracker.cancel(batch_id) > 0 or cancelled
        return cancelled

    def close(self, *, cancel_pending: bool = False, reason: str = CANCELLED) -> None:
        """Stop accepting batches and wait for the submitted ones; closing twice is fine.

        Args:
            cancel_pending: Stop items not yet started instead of running them: cancel
                them (the default ``reason``), or fail them with ``reason`` as their
                error. Running items always finish.
            reason: ``"cancelled"``, or the error for those items (``"interrupted"``
                when a server stops).
        """
        with self._lock:
            self._closed = True
            if cancel_pending:
                for run in list(self._order):
                    self._fail_pending_locked(run, reason)
                    self._settle_locked(run)
            runs = list(self._runs.values())
        for run in runs:
            run.done.wait()
        with self._lock:
            self._stop_writing = True
            self._wake_writer.notify()
            writer = self._writer
        if writer is not None and writer is not threading.current_thread():
            writer.join()
        self._stop_beating.set()
        self._watch_wake.set()
        if self._beater is not None:
            self._beater.join()
        if self._watchdog is not None:
            self._watchdog.join()
        if self._owns_executor:
            # Every call that counts has ended; stuck ones (owned threads) may never.
            self.executor.shutdown(wait=not isinstance(self.executor, _DaemonThreads))
        with self._dispatcher_lock:
            dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            self._events.put((_STOP, None))
            dispatcher.join()

    # -- machinery -------------------------------------------------------------------------

    def _pump(self) -> None:
        """Have the writer start items while slots are free, oldest batch first, items in
        order."""
        with self._lock:
            self._want_starts = True
            self._wake_writer_locked()

    def _wake_writer_locked(self) -> None:
        """Wake the writer thread, starting it first if none runs."""
        if self._writer is None:
            if self._stop_writing:
                return
            self._writer = threading.Thread(
                target=self._write, name="batchtrack-writer", daemon=True
            )
            self._writer.start()
        self._wake_writer.notify()

    def _take_starts_locked(self, finishing: int) -> list[tuple[_Run, Item]]:
        """The items to start now: as many as slots are free, counting those of the
        ``finishing`` items (their calls ended; their end is being recorded)."""
        taken: list[tuple[_Run, Item]] = []
        while True:
            # Stuck threads past the bound hold their slots (see item_timeout).
            busy = self._running - finishing + max(0, self._stuck - self.concurrency)
            if busy >= self.concurrency:
                return taken
            while self._order and not self._order[0].pending:
                self._order.popleft()
            if not self._order:
                return taken
            run = self._order[0]
            item = run.pending.popleft()
            run.running += 1
            self._running += 1
            taken.append((run, item))

    def _write(self) -> None:
        """Record every item that ended and start what fits, from one thread.

        What piled up while the last store call was under way goes in the next one: per
        batch, the ends of the items that finished and the starts of the items taking
        their slots, in one store round trip (:meth:`BatchTracker._apply_events`). Under
        load that is several items per call; when idle, one call per end, at once.
        """
        while True:
            with self._lock:
                while not self._writes and not self._want_starts:
                    if self._stop_writing:
                        self._writer = None
                        return
                    self._wake_writer.wait()
                ended, self._writes = self._writes, []
                self._want_starts = False
                starts = self._take_starts_locked(len(ended))
            self._write_all(ended, starts, keep=False)

    def _write_all(
        self,
        ended: list[tuple[_Run, Item, BaseException | None]],
        starts: list[tuple[_Run, Item]],
        *,
        keep: bool,
    ) -> tuple[_Run, Item] | None:
        """Record the ``ended`` items and the ``starts`` (one store call per batch), then
        hand the started items to the executor: all of them, or all but the first when
        ``keep``, which is returned for the calling thread to run itself."""
        groups: dict[_Run, list[tuple[Item, BaseException | None, bool]]] = {}
        for run, item, exc in ended:
            groups.setdefault(run, []).append((item, exc, False))
        for run, item in starts:
            if item.source is _UNKEPT:
                # Its input lived only in the process that submitted it: fail it rather
                # than hand the processor a guess (its filename could name another file).
                error = ProcessingError(INPUT_NOT_KEPT_ERROR)
                groups.setdefault(run, []).append((item, error, False))
            else:
                groups.setdefault(run, []).append((item, None, True))
        kept = None
        for run, group in groups.items():
            try:
                for item in self._write_run(run, group):
                    if keep and kept is None:
                        kept = (run, item)
                    else:
                        self._call(run, item)
            except Exception:  # a bug; the writer must go on for the other batches
                log.exception("batchtrack: recording items of batch %s", run.batch_id)
        return kept

    def _write_run(
        self, run: _Run, group: list[tuple[Item, BaseException | None, bool]]
    ) -> list[Item]:
        """Record the ends and starts of one batch's items in one store call and deliver
        their events in the order applied; answer the started items, to be run."""
        steps: list[tuple[str, tuple[Status, frozenset[Status]], str | None, float | None]] = []
        lease = self.tracker.lease
        for item, exc, start in group:
            assert item.id is not None
            if start:
                steps.append((item.id, _START, None, lease))
            elif exc is None:
                steps.append((item.id, _COMPLETE, None, None))
            else:
                steps.append((item.id, _FAIL, error_message(exc, item), None))
        failed: list[bool] = []
        with run.order:
            answers = self._record(run.batch_id, steps, failed)
            for (_, exc, start), answer in zip(group, answers, strict=True):
                if run.on_progress is None:
                    break  # nobody to tell: _emit would queue nothing
                if not isinstance(answer, ProgressEvent):
                    continue
                if answer.changed:
                    self._emit(run, answer)
                elif failed and answer.item.status is _target(start, exc):
                    # A try whose answer was lost did apply this step (the retry found
                    # it done): its event is still ours to deliver, once.
                    self._emit(run, answer)
        ended: list[str] = []
        running: list[Item] = []
        for (item, _, start), answer in zip(group, answers, strict=True):
            assert item.id is not None
            if start:
                # (Unchanged after a failed try: that try's answer was lost but it did
                # apply.)
                if isinstance(answer, ProgressEvent) and (answer.changed or failed):
                    running.append(item)
                else:
                    self._started(run, item, answer)
                continue
            if not isinstance(answer, ProgressEvent):
                log.error(
                    "batchtrack: could not record item %s of batch %s",
                    item.id,
                    run.batch_id,
                    exc_info=answer,
                )
            ended.append(item.id)
        if ended or running:
            batch_id = run.batch_id
            with self._lock:
                leased = self._leased
                for item_id in ended:
                    leased.pop((batch_id, item_id), None)
                    run.ids.discard(item_id)
                run.running -= len(ended)
                self._running -= len(ended)
                self._settle_locked(run)
                for item in running:
                    leased[batch_id, item.id] = None  # type: ignore[index]
                if running and self._beater is None:
                    self._lease_locked(batch_id, running[0].id)  # type: ignore[arg-type]
        return running

    def _record(
        self,
        batch_id: str,
        steps: list[tuple[str, tuple[Status, frozenset[Status]], str | None, float | None]],
        failed: list[bool],
    ) -> list[ProgressEvent | BaseException]:
        """The answer to each step: its event, or why it could not be recorded."""
        what = f"recording {len(steps)} item(s) of batch {batch_id}"
        tracker = self.tracker
        deadline = time.monotonic() + self.store_retry
        try:
            answers: list[ProgressEvent | BaseException] = []
            if len(steps) == 1:
                answers += self._retrying(
                    what, lambda: tracker._apply_events(batch_id, steps), failed, deadline
                )
            else:
                answers += tracker._apply_events(batch_id, steps)
            return answers
        except StoreError as exc:
            if len(steps) == 1:
                return [exc]
            # A store that fails now and then per transition (one whose apply_all applies
            # them one by one) would almost never take a call of many whole: each step on
            # its own from now on, all within the one retry deadline. Some may have
            # applied already; the retries find them done (``failed`` says so).
            failed.append(True)
        except Exception as exc:
            if len(steps) == 1:
                return [exc]
        # The store failed, the batch went, an item is not in it, or the store refused
        # the call as a whole: each step on its own, for an answer of its own.
        answers = []
        for step in steps:

            def one(step: Any = step) -> list[ProgressEvent | BatchtrackError]:
                return tracker._apply_events(batch_id, [step])

            try:
                answers += self._retrying(what, one, failed, deadline)
            except Exception as exc:
                answers.append(exc)
        return answers

    def _started(self, run: _Run, item: Item, answer: ProgressEvent | BaseException) -> None:
        """Let go of an item whose start did not apply: it will not run here."""
        assert item.id is not None
        batch_id = run.batch_id
        if isinstance(answer, ProgressEvent):  # another worker started it first: theirs
            self._release(run, item)
        elif isinstance(answer, (InvalidTransition, BatchNotFound)):
            # Cancelled, finished or gone meanwhile (maybe by another process): skip it.
            log.info("batchtrack: skipping item %s of batch %s: %s", item.id, batch_id, answer)
            self._release(run, item)
        elif isinstance(answer, StoreError):
            # Never process an item whose start is not recorded; it stays as the store has
            # it (pending, or processing until its lease runs out) for a later resume.
            log.error(
                "batchtrack: giving up item %s of batch %s: the store stayed unavailable",
                item.id,
                batch_id,
                exc_info=answer,
            )
            self._release(run, item)
        else:  # the tracker refused
            log.error(
                "batchtrack: could not start item %s of batch %s",
                item.id,
                batch_id,
                exc_info=answer,
            )
            self._finish(run, item, answer)

    def _retrying(
        self,
        what: str,
        call: Callable[[], _T],
        failed: list[bool] | None = None,
        deadline: float | None = None,
    ) -> _T:
        """``call()``, retried with back-off while the store fails, for ``store_retry`` s
        (or until ``deadline``, by :func:`time.monotonic`).

        ``failed`` gets True appended when a try failed (its answer, not necessarily its
        effect, was lost).
        """
        if deadline is None:
            deadline = time.monotonic() + self.store_retry
        delay = 0.05
        while True:
            try:
                return call()
            except StoreError as exc:
                if failed is not None:
                    failed.append(True)
                if time.monotonic() + delay > deadline:
                    raise
                log.log(
                    logging.WARNING if delay == 0.05 else logging.DEBUG,
                    "batchtrack: %s failed (%s); retrying for up to %.0f s",
                    what,
                    exc,
                    self.store_retry,
                )
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _call(self, run: _Run, item: Item) -> None:
        """Hand the started item to the executor, under its time limit if any."""
        if self._chains:
            try:
                future = self.executor.submit(self._chain, run, item)
            except BaseException as exc:  # the executor refused (shut down)
                log.exception(
                    "batchtrack: could not run item %s of batch %s", item.id, run.batch_id
                )
                self._finish(run, item, exc)
                return
            future.add_done_callback(lambda f: self._chain_ended(f, run, item))
            return
        if self.item_timeout is None:
            # Without a time limit the executor is never replaced: no lock to read it.
            executor = self.executor
            call = _Call(run, item, executor, math.inf)
        else:
            with self._lock:
                executor = self.executor
                call = _Call(run, item, executor, time.monotonic() + self.item_timeout)
                self._calls[call] = None
                self._watch_locked()
        try:
            if isinstance(executor, (ThreadPoolExecutor, _DaemonThreads)):
                assert item.id is not None
                reporter = _report.ItemReporter(self.tracker, run.batch_id, item.id)
                future = executor.submit(_report.run_reporting, reporter, self.processor, item)
            else:
                # Process pools, Dask clients and other executors run the processor
                # where this tracker is not (and a context variable does not go).
                future = executor.submit(self.processor, item)
        except BaseException as exc:  # the executor refused
            with self._lock:
                self._calls.pop(call, None)
                taken, call.over = call.over, True
            if not taken:
                log.exception(
                    "batchtrack: could not run item %s of batch %s", item.id, run.batch_id
                )
                self._finish(run, item, exc)
            return
        future.add_done_callback(lambda f: self._done(call, f))

    def _chain(self, run: _Run, item: Item) -> None:
        """Run ``item`` in this thread of the owned pool; then record its end together
        with the start of the item taking its slot, and run that one here too, while
        items are left to start.

        What the writer thread and the executor would do per item, without their two
        hops (a wake of the writer, a wake of a worker through the executor's queue, a
        future and its callbacks): for stores whose calls cost little (``_chains``),
        where those hops cost more than the calls they batch. Each item's start is
        recorded before it runs, its end after; concurrency, events, leases, pause and
        cancel go through the same code as the writer's.

        A step (taking the next item, the store call, the bookkeeping) holds the
        orchestrator's lock throughout, as the store's calls cost little: chains of quick
        items would otherwise, under the GIL, hand the orchestrator's, the run's and the
        store's locks back and forth between threads, each handoff a thread switch.
        """
        while True:
            assert item.id is not None
            reporter = _report.ItemReporter(self.tracker, run.batch_id, item.id)
            exc: BaseException | None = None
            try:
                _report.run_reporting(reporter, self.processor, item)
            except BaseException as error:  # what the executor's future would have held
                exc = error
            self._log_failure(run, item, exc)
            with self._lock:
                starts = self._take_starts_locked(1)  # this item's slot is free
                kept = self._write_all([(run, item, exc)], starts, keep=True)
            if kept is None:
                if self._order:
                    self._pump()  # slots freed by other threads meanwhile: the writer
                return
            run, item = kept

    def _chain_ended(self, future: Future[Any], run: _Run, item: Item) -> None:
        """A chain never started (its future was cancelled: its first item fails, as
        :meth:`_done` has it), or stopped on a bug (logged; its items' own outcomes are
        caught and recorded)."""
        if future.cancelled():
            self._finish(run, item, CancelledError())
            return
        exc = future.exception()
        if exc is not None:
            log.error("batchtrack: a worker's chain of items stopped", exc_info=exc)

    def _release(self, run: _Run, item: Item) -> None:
        """Forget an item that will not run here."""
        assert item.id is not None
        with self._lock:
            run.ids.discard(item.id)
            run.running -= 1
            self._running -= 1
            self._settle_locked(run)
        self._pump()

    # -- leases ----------------------------------------------------------------------------

    def _lease_locked(self, batch_id: str, item_id: str) -> None:
        """Keep renewing the lease of a running item until it finishes."""
        self._leased[batch_id, item_id] = None
        if self._beater is None:
            self._beater = threading.Thread(
                target=self._beat, name="batchtrack-heartbeat", daemon=True
            )
            self._beater.start()

    def _beat(self) -> None:
        """Heartbeat every running item three times per lease, from one thread."""
        while not self._stop_beating.wait(self.tracker.lease / 3):
            with self._lock:
                leased = list(self._leased)
            for batch_id, item_id in leased:
                try:
                    self.tracker.heartbeat(batch_id, item_id)
                except (InvalidTransition, BatchNotFound) as exc:
                    # Finished meanwhile, or reclaimed after a long stall: stop renewing.
                    log.debug("batchtrack: no more heartbeats for %s: %s", item_id, exc)
                    with self._lock:
                        self._leased.pop((batch_id, item_id), None)
                except Exception:  # a passing store failure: try again next round
                    log.warning("batchtrack: heartbeat of %s failed", item_id, exc_info=True)

    def _done(self, call: _Call, future: Future[Any]) -> None:
        try:
            exc = future.exception()
        except BaseException as cancelled:  # the executor cancelled the future
            exc = cancelled
        run, item = call.run, call.item
        with self._lock:
            late, call.over = call.over, True
            if exc is None and not late:
                # The common end, recorded under this one lock (what _finish does).
                self._calls.pop(call, None)
                self._writes.append((run, item, None))
                self._wake_writer_locked()
                return
            self._calls.pop(call, None)
            if late and call.stuck:
                self._stuck -= 1
            again = (
                not late
                and isinstance(exc, (BrokenProcessPool, CancelledError))
                and call.executor in self._retired
            )
        if late:
            if call.timed_out:
                self._late(call, exc)
                self._pump()  # a stuck thread past the bound freed its slot
            return
        if again:
            # Its process pool was replaced after another item timed out: start over.
            log.info(
                "batchtrack: item %s of batch %s starts over in a new process pool",
                item.id,
                run.batch_id,
            )
            self._call(run, item)
            return
        self._finish(run, item, exc)

    # -- time limits ----------------------------------------------------------------------

    def _watch_locked(self) -> None:
        """Start the watchdog if needed, and wake it for a new deadline."""
        if self._watchdog is None:
            self._watchdog = threading.Thread(
                target=self._watch, name="batchtrack-timeouts", daemon=True
            )
            self._watchdog.start()
        self._watch_wake.set()

    def _watch(self) -> None:
        """Fail the items that run past their deadline, from one thread."""
        while not self._stop_beating.is_set():
            now = time.monotonic()
            with self._lock:
                # A call in a process pool replaced meanwhile is not judged: killing the
                # pool ended it, and it starts over in the new one (see _done).
                live = [call for call in self._calls if call.executor not in self._retired]
                expired = sorted(
                    (call for call in live if call.deadline <= now), key=lambda c: c.deadline
                )
                next_deadline = min(
                    (call.deadline for call in live if call.deadline > now), default=math.inf
                )
                self._watch_wake.clear()
            for call in expired:
                with self._lock:
                    # One time-out may replace a pool that others of these ran in.
                    if call not in self._calls or call.executor in self._retired:
                        continue
                    del self._calls[call]
                    call.over = call.timed_out = True
                self._time_out(call)
            if not expired:
                self._watch_wake.wait(min(next_deadline - now, 60.0))

    def _time_out(self, call: _Call) -> None:
        """The call ran too long: fail its item, let its slot go, replace its worker."""
        run, item = call.run, call.item
        assert item.id is not None
        log.warning(
            "batchtrack: item %s (%s) of batch %s timed out after %s s",
            item.id,
            item.filename,
            run.batch_id,
            self.item_timeout,
        )
        with self._lock:
            self._leased.pop((run.batch_id, item.id), None)
            if isinstance(call.executor, _DaemonThreads):
                call.stuck = True
                self._stuck += 1
                if self._stuck > self.concurrency:
                    log.warning(
                        "batchtrack: %d threads are stuck in calls that timed out; no more "
                        "are replaced until one returns",
                        self._stuck,
                    )
            replace = (
                isinstance(call.executor, ProcessPoolExecutor)
                and call.executor is self.executor
                and not self._closed_pool_locked()
            )
        if replace:
            self._replace_pool(call.executor)  # type: ignore[arg-type]
        self._finish(run, item, ProcessingError(f"timed out after {self.item_timeout} s"))

    def _closed_pool_locked(self) -> bool:
        return bool(getattr(self.executor, "_shutdown_thread", False))

    def _replace_pool(self, old: ProcessPoolExecutor) -> None:
        """Swap in a process pool like ``old`` and kill ``old``'s processes (one stuck
        process breaks the whole pool anyway); its other calls start over in the new one."""
        options: dict[str, Any] = {
            "max_workers": getattr(old, "_max_workers", self.concurrency),
            "mp_context": getattr(old, "_mp_context", None),
            "initializer": getattr(old, "_initializer", None),
            "initargs": getattr(old, "_initargs", ()),
        }
        per_child = getattr(old, "_max_tasks_per_child", None)
        if per_child is not None:
            options["max_tasks_per_child"] = per_child
        new = ProcessPoolExecutor(**options)
        with self._lock:
            self._retired.add(old)
            self.executor = new
            self._owns_executor = True
        processes = dict(getattr(old, "_processes", None) or {})
        for process in processes.values():
            with contextlib.suppress(Exception):
                process.kill()
        log.warning(
            "batchtrack: a process stuck in an item that timed out was killed; "
            "the process pool was replaced"
        )
        old.shutdown(wait=False, cancel_futures=True)

    def _late(self, call: _Call, exc: BaseException | None) -> None:
        """The call of an item that timed out returned after all: its outcome is
        ignored, and a result it wrote is removed while the item stays failed."""
        run, item = call.run, call.item
        assert item.id is not None
        log.info(
            "batchtrack: item %s of batch %s returned after it timed out (%s); ignored",
            item.id,
            run.batch_id,
            "an error" if exc is not None else "a result",
        )
        remove = getattr(self.processor, "remove_results", None)
        if exc is not None or not callable(remove):
            return
        try:
            snap = self.tracker.get(run.batch_id, status=Status.FAILED)
            if any(i.id == item.id for i in snap.items):
                remove(run.batch_id, [item.id])
        except Exception:
            log.warning(
                "batchtrack: could not remove the late result of item %s", item.id, exc_info=True
            )

    def _finish(self, run: _Run, item: Item, exc: BaseException | None) -> None:
        """An item's call ended (``exc``: how it failed): the writer records it."""
        self._log_failure(run, item, exc)
        with self._lock:
            self._writes.append((run, item, exc))
            self._wake_writer_locked()

    @staticmethod
    def _log_failure(run: _Run, item: Item, exc: BaseException | None) -> None:
        """Log the traceback of an item that failed otherwise than by a ProcessingError."""
        if exc is not None and not isinstance(exc, ProcessingError):
            log.error(
                "batchtrack: item %s (%s) of batch %s failed",
                item.id,
                item.filename,
                run.batch_id,
                exc_info=exc,
            )

    def _fail_pending_locked(self, run: _Run, reason: str = CANCELLED) -> int:
        """Cancel the run's queued items (fail them, unless ``reason`` is
        ``"cancelled"``); return how many this call stopped."""
        failed = 0
        while run.pending:
            item = run.pending.popleft()
            assert item.id is not None
            run.ids.discard(item.id)
            try:
                with run.order:
                    event = (
                        self.tracker._cancel_item(run.batch_id, item.id)
                        if reason == CANCELLED
                        else self.tracker.fail_item(run.batch_id, item.id, reason)
                    )
                    if event.changed:
                        failed += 1
                        self._emit(run, event)
            except InvalidTransition:
                pass  # it finished meanwhile (another worker ran it)
            except BatchtrackError:
                log.exception("batchtrack: could not cancel item %s", item.id)
        return failed

    def _settle_locked(self, run: _Run) -> None:
        """Once a run has nothing left, let the dispatcher close it after its events."""
        if run.idle and not run.settled:
            run.settled = True
            self._queue(run, None)

    def _emit(self, run: _Run, event: ProgressEvent) -> None:
        if run.on_progress is not None:
            self._queue(run, event)

    def _queue(self, run: _Run, event: ProgressEvent | None) -> None:
        self._events.put((run, event))
        with self._dispatcher_lock:
            if self._dispatcher is None:
                self._dispatcher = threading.Thread(
                    target=self._dispatch, name="batchtrack-events", daemon=True
                )
                self._dispatcher.start()

    def _dispatch(self) -> None:
        """Deliver events from one thread, so a slow callback slows no worker."""
        while True:
            run, event = self._events.get()
            if run is _STOP:
                return
            if event is None:
                with self._lock:
                    if self._runs.get(run.batch_id) is run:
                        del self._runs[run.batch_id]
                    # wait() may come after the run ended (it had nothing to do, or its
                    # items were given up): it still answers for the batch.
                    if len(self._finished) >= _FINISHED_KEPT:
                        del self._finished[next(iter(self._finished))]
                    self._finished[run.batch_id] = None
                run.done.set()
                continue
            assert run.on_progress is not None
            try:
                run.on_progress(event)
            except Exception:
                log.exception("batchtrack: on_progress callback raised; the batch goes on")


def _target(start: bool, exc: BaseException | None) -> Status:
    """The status a writer step moves its item to."""
    if start:
        return Status.PROCESSING
    return Status.COMPLETED if exc is None else Status.FAILED


def _uuid4s(count: int) -> list[str]:
    """``count`` random ids, each ``str(uuid.uuid4())`` would be one (version 4, RFC 4122
    variant, from :func:`os.urandom`), made together for a third of the time."""
    raw = os.urandom(16 * count)
    ids = []
    for start in range(0, 16 * count, 16):
        value = int.from_bytes(raw[start : start + 16], "big") & _UUID_KEPT | _UUID_SET
        text = f"{value:032x}"
        ids.append(f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}")
    return ids


# uuid.UUID(version=4): the version field (bits 76-79) is 4, the variant's two top bits
# (62-63) are 10.
_UUID_KEPT = ~((0xF000 << 64) | (0xC000 << 48))
_UUID_SET = (4 << 76) | (0x8000 << 48)


def _stored_source(source: object) -> str | None:
    """What the tracker keeps of an item's source: None for none (the filename is the
    input), the path or string itself, or :data:`INPUT_NOT_KEPT` for an input that
    exists only in this process (bytes, a file object, a path that is not UTF-8)."""
    if source is None:
        return None
    stored = _storable(source)
    return INPUT_NOT_KEPT if stored is None else stored


def _storable(source: object) -> str | None:
    """The part of an item's source the tracker can keep: paths and strings of text."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or "\x00" in source:
        return None
    try:
        source.encode("utf-8")
    except UnicodeEncodeError:  # a path that is not valid UTF-8 (surrogate escapes)
        return None
    return source


_STOP: Any = object()
_UNKEPT: Any = object()  # the source of a resumed item whose input was not kept
INPUT_NOT_KEPT_ERROR = "its input was not kept: submit it again"
"""The error of a resumed item whose input (bytes, a file object) was not kept."""
