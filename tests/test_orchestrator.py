"""Orchestrator: bounded concurrency, events, failures, cancellation, pools, closing."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from batchtrack import (
    BatchNotFound,
    BatchSnapshot,
    BatchTracker,
    InputsGone,
    Item,
    MemoryStore,
    Orchestrator,
    OrchestratorClosed,
    ProcessingError,
    ProgressEvent,
    SQLiteStore,
    Status,
    ValidationError,
)
from batchtrack._orchestrator import INPUT_NOT_KEPT_ERROR, error_message
from batchtrack._tracker import INPUT_NOT_KEPT


def upper(item: Item) -> str:
    """A picklable processor: fails items whose name starts with 'bad'."""
    if item.filename.startswith("bad"):
        raise ValueError(f"cannot read /srv/secret/{item.filename}")
    return item.filename.upper()


class Gate:
    """A processor that blocks until released, recording how many run at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.started: list[str] = []
        self.release = threading.Event()

    def __call__(self, item: Item) -> None:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.started.append(item.filename)
        try:
            self.release.wait(10)
        finally:
            with self.lock:
                self.running -= 1


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def orchestrator(tracker: BatchTracker) -> Iterator[Callable[..., Orchestrator]]:
    """Makes orchestrators on the store-parametrized tracker and closes them after."""
    made: list[Orchestrator] = []

    def make(processor: Callable[[Item], Any], **kwargs: Any) -> Orchestrator:
        orch = Orchestrator(tracker, processor, **kwargs)
        made.append(orch)
        return orch

    yield make
    for orch in made:
        orch.close(cancel_pending=True)


def test_run_completes_items_and_fails_the_ones_that_raise(
    orchestrator: Callable[..., Orchestrator],
) -> None:
    """Returning completes an item; raising fails it with a one-line message."""
    snap = orchestrator(upper).run(["a.jpg", "bad.jpg", "c.jpg"])
    assert snap.status is Status.COMPLETED
    assert [i.status for i in snap.items] == [Status.COMPLETED, Status.FAILED, Status.COMPLETED]
    assert snap.items[1].error == "ValueError: cannot read bad.jpg"


def test_submit_returns_the_pending_batch_at_once(
    orchestrator: Callable[..., Orchestrator],
) -> None:
    """submit() returns before any item has finished, with the batch pending."""
    gate = Gate()
    orch = orchestrator(gate, concurrency=2)
    snap = orch.submit(["a.jpg", "b.jpg", "c.jpg"])
    assert snap.status is Status.PENDING
    assert snap.progress.pending == 3
    gate.release.set()
    assert orch.wait(snap.batch_id).progress.completed == 3


def test_concurrency_bound_is_observed_and_items_start_in_order(
    orchestrator: Callable[..., Orchestrator],
) -> None:
    """Never more than `concurrency` items run at once; they start in the order given."""
    gate = Gate()
    orch = orchestrator(gate, concurrency=3)
    names = [f"{i:02d}.jpg" for i in range(12)]
    snap = orch.submit(names)
    _wait_until(lambda: gate.running == 3)
    time.sleep(0.05)  # give a fourth item every chance to start, wrongly
    assert gate.running == 3
    gate.release.set()
    orch.wait(snap.batch_id)
    assert gate.peak == 3
    assert gate.started[:3] == names[:3]
    assert sorted(gate.started) == names


def test_one_event_per_transition_with_monotonic_final_counts(
    orchestrator: Callable[..., Orchestrator],
) -> None:
    """Each item yields a start and a final event; the N final events carry 1..N."""
    events: list[ProgressEvent] = []
    snap = orchestrator(upper, concurrency=4).run(
        [f"{i}.jpg" for i in range(30)] + ["bad-1.jpg", "bad-2.jpg"], on_progress=events.append
    )
    assert len(events) == 2 * 32
    finals = [e for e in events if e.item.status.is_final]
    # In the order the store applied them, even when items finish at the same moment.
    assert [e.progress.completed + e.progress.failed for e in finals] == list(range(1, 33))
    assert [e.version for e in events] == list(range(1, 65))
    assert {e.item.id for e in finals} == {i.id for i in snap.items}
    assert all(e.batch_id == snap.batch_id for e in events)
    last = max(finals, key=lambda e: e.progress.completed + e.progress.failed)
    assert last.estimated_time_remaining == 0


class CountingPool(ThreadPoolExecutor):
    """A thread pool that counts what it is handed."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self.submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def _run_counting(
    store: Any, n: int, *, owned: bool = True, **kwargs: Any
) -> tuple[BatchSnapshot, list[ProgressEvent], int, list[str]]:
    """Run ``n`` items (every 7th fails) with concurrency 4 on ``store``; answer the
    batch, its events, how many calls the pool was handed and each item's thread."""
    tracker = BatchTracker(store)
    pool = CountingPool(4)
    threads: list[str] = []

    def work(item: Item) -> None:
        threads.append(threading.current_thread().name)
        if int(item.filename.split(".")[0]) % 7 == 6:
            raise ProcessingError("no")

    orch = Orchestrator(
        tracker, work, concurrency=4, **kwargs, **({} if owned else {"executor": pool})
    )
    if owned:
        orch.executor.shutdown()
        orch.executor = pool  # the owned pool, counted
    events: list[ProgressEvent] = []
    try:
        snap = orch.run([f"{i}.jpg" for i in range(n)], on_progress=events.append)
    finally:
        orch.close()
        pool.shutdown()
        store.close()
    return snap, events, pool.submitted, threads


def test_an_owned_pool_on_the_memory_store_runs_items_back_to_back(tmp_path: Path) -> None:
    """On the memory store the owned pool's threads run item after item (each end and the
    next start recorded together by the thread that ran the item), not one executor call
    per item; every guarantee holds: each item's start and end event once, in order, the
    N final events counting 1..N, the concurrency bound."""
    n = 120
    snap, events, submitted, threads = _run_counting(MemoryStore(), n)
    assert submitted <= 16  # about one per slot (4), not one per item (120)
    assert len(set(threads)) <= 4
    assert snap.progress.completed + snap.progress.failed == n
    assert snap.progress.failed == n // 7
    assert len(events) == 2 * n
    assert [e.version for e in events] == list(range(1, 2 * n + 1))
    finals = [e for e in events if e.item.status.is_final]
    assert [e.progress.completed + e.progress.failed for e in finals] == list(range(1, n + 1))
    assert all(e.progress.processing <= 4 for e in events)
    seen: dict[str, list[Status]] = {}
    for e in events:
        seen.setdefault(e.item.id, []).append(e.item.status)
    assert all(
        statuses[0] is Status.PROCESSING and statuses[1].is_final for statuses in seen.values()
    )
    assert all(len(statuses) == 2 for statuses in seen.values())


def test_a_processor_raising_a_base_exception_fails_only_its_item(
    orchestrator: Callable[..., Orchestrator],
) -> None:
    """An item whose processor raises SystemExit or KeyboardInterrupt fails (as through an
    executor's future); the items after it in the same thread still run."""

    def work(item: Item) -> None:
        if item.filename == "3.jpg":
            raise SystemExit(3)
        if item.filename == "5.jpg":
            raise KeyboardInterrupt

    snap = orchestrator(work, concurrency=2).run([f"{i}.jpg" for i in range(12)])
    by_name = {item.filename: item for item in snap.items}
    assert by_name["3.jpg"].status is Status.FAILED
    assert by_name["5.jpg"].status is Status.FAILED
    assert snap.progress.completed == 10


@pytest.mark.parametrize("setting", ["sqlite", "time limit", "own executor"])
def test_elsewhere_each_item_is_one_executor_call(setting: str, tmp_path: Path) -> None:
    """With a store whose calls cost a round trip (SQLite), a time limit, or an executor
    of the caller's, every item is one call handed to the executor, as before."""
    store: Any = SQLiteStore(tmp_path / "b.db") if setting == "sqlite" else MemoryStore()
    kwargs: dict[str, Any] = {"item_timeout": 30.0} if setting == "time limit" else {}
    if setting == "time limit":
        tracker = BatchTracker(store)
        orch = Orchestrator(tracker, lambda item: None, concurrency=4, **kwargs)
        try:
            snap = orch.run([f"{i}.jpg" for i in range(30)])
        finally:
            orch.close()
        assert not orch._chains
        assert snap.progress.completed == 30
        return
    snap, events, submitted, _ = _run_counting(store, 30, owned=setting != "own executor")
    assert submitted == 30
    assert snap.progress.completed + snap.progress.failed == 30
    assert len(events) == 60


def test_a_raising_callback_is_logged_and_the_batch_goes_on(
    orchestrator: Callable[..., Orchestrator], caplog: pytest.LogCaptureFixture
) -> None:
    """A callback that raises every time does not stop the batch; each raise is logged."""

    def broken(event: ProgressEvent) -> None:
        raise RuntimeError("callback bug")

    snap = orchestrator(upper).run([f"{i}.jpg" for i in range(5)], on_progress=broken)
    assert snap.progress.completed == 5
    assert caplog.text.count("on_progress callback raised") == 10


def test_a_slow_callback_does_not_slow_the_workers(
    orchestrator: Callable[..., Orchestrator],
) -> None:
    """Items keep being processed while the callback is still busy with the first event."""
    stuck = threading.Event()

    def slow(event: ProgressEvent) -> None:
        stuck.wait(10)

    orch = orchestrator(upper, concurrency=2)
    snap = orch.submit([f"{i}.jpg" for i in range(20)], on_progress=slow)
    tracker = orch.tracker
    _wait_until(lambda: tracker.get(snap.batch_id).progress.completed == 20)
    stuck.set()
    orch.wait(snap.batch_id)


def test_tracebacks_go_to_the_log_not_to_users(
    orchestrator: Callable[..., Orchestrator], caplog: pytest.LogCaptureFixture
) -> None:
    """The error users see is one line; the traceback is logged under 'batchtrack'."""
    with caplog.at_level(logging.ERROR, logger="batchtrack"):
        snap = orchestrator(upper).run(["bad.jpg"])
    assert "Traceback" not in (snap.items[0].error or "")
    assert "\n" not in (snap.items[0].error or "")
    assert "Traceback" in caplog.text
    assert "/srv/secret/bad.jpg" in caplog.text


def test_processing_error_message_is_shown_as_it_is() -> None:
    """A ProcessingError's message reaches users unchanged, without the type name."""
    item = Item("a.jpg", source="/data/uploads/123")
    assert error_message(ProcessingError("not an image"), item) == "not an image"
    assert error_message(OSError("boom at /data/uploads/123"), item) == "OSError: boom at a.jpg"
    assert error_message(KeyError(), item) == "KeyError"
    assert error_message(ValueError("x\ny"), item) == "ValueError: x"
    long = error_message(ValueError("z" * 1000), item)
    assert len(long) == 300
    assert long.endswith("…")


def test_cancel_cancels_pending_items_and_lets_running_ones_finish(
    orchestrator: Callable[..., Orchestrator],
) -> None:
    """cancel() moves items not started to cancelled; the running ones complete."""
    gate = Gate()
    orch = orchestrator(gate, concurrency=2)
    snap = orch.submit([f"{i}.jpg" for i in range(10)])
    _wait_until(lambda: gate.running == 2)
    assert orch.cancel(snap.batch_id) is True
    gate.release.set()
    final = orch.wait(snap.batch_id)
    assert final.progress.completed == 2
    assert final.progress.cancelled == 8
    assert final.status is Status.CANCELLED
    assert {i.error for i in final.items if i.status is Status.CANCELLED} == {None}
    assert orch.cancel(snap.batch_id) is False  # finished
    assert orch.cancel("no-such-batch") is False


def test_close_waits_for_submitted_work_and_refuses_more(tracker: BatchTracker) -> None:
    """close() lets submitted batches finish; later submits raise OrchestratorClosed."""
    orch = Orchestrator(tracker, upper, concurrency=2)
    snap = orch.submit([f"{i}.jpg" for i in range(10)])
    orch.close()
    orch.close()  # twice is fine
    assert tracker.get(snap.batch_id).progress.completed == 10
    with pytest.raises(OrchestratorClosed):
        orch.submit(["a.jpg"])


def test_close_can_cancel_what_has_not_started(tracker: BatchTracker) -> None:
    """close(cancel_pending=True) cancels items not started and waits for running ones."""
    gate = Gate()
    orch = Orchestrator(tracker, gate, concurrency=1)
    snap = orch.submit([f"{i}.jpg" for i in range(5)])
    _wait_until(lambda: gate.running == 1)
    closer = threading.Thread(target=orch.close, kwargs={"cancel_pending": True})
    closer.start()
    _wait_until(lambda: tracker.get(snap.batch_id).progress.cancelled == 4)
    gate.release.set()
    closer.join(10)
    assert not closer.is_alive()
    final = tracker.get(snap.batch_id)
    assert (final.progress.completed, final.progress.cancelled) == (1, 4)


def test_paths_become_items_named_by_their_base_name(
    orchestrator: Callable[..., Orchestrator], tmp_path: Path
) -> None:
    """A path item is named by its base name and the processor gets the path as source."""
    seen: list[Item] = []
    orch = orchestrator(seen.append)
    snap = orch.run([tmp_path / "x" / "photo.jpg", "/tmp/other.png", Item("given.gif", b"data")])
    assert [i.filename for i in snap.items] == ["photo.jpg", "other.png", "given.gif"]
    by_name = {item.filename: item for item in seen}
    assert by_name["photo.jpg"].source == tmp_path / "x" / "photo.jpg"
    assert by_name["given.gif"].source == b"data"
    assert all(item.batch_id == snap.batch_id and item.id for item in seen)


def test_items_keep_the_ids_they_were_given(orchestrator: Callable[..., Orchestrator]) -> None:
    """An Item with an id keeps it in the batch and in the processor."""
    seen: list[str | None] = []
    snap = orchestrator(lambda item: seen.append(item.id)).run([Item("a.jpg", id="upload-7")])
    assert snap.items[0].id == "upload-7"
    assert seen == ["upload-7"]


def test_items_without_an_id_get_distinct_random_uuid4_ids(
    orchestrator: Callable[..., Orchestrator],
) -> None:
    """Items given without an id get distinct canonical UUID4 strings (version 4, RFC 4122
    variant), every random bit of them random, in the batch and in the processor alike."""
    seen: dict[str, str | None] = {}
    orch = orchestrator(lambda item: seen.__setitem__(item.filename, item.id))
    snap = orch.run([Item(f"{n}.jpg") for n in range(600)] + [Item("mine.jpg", id="kept")])
    ids = [item.id for item in snap.items]
    assert seen == {item.filename: item.id for item in snap.items}
    assert ids[-1] == "kept"
    assert len(set(ids)) == len(ids)
    values = [uuid.UUID(i) for i in ids[:-1]]
    assert all(
        str(u) == i and u.version == 4 and u.variant == uuid.RFC_4122
        for u, i in zip(values, ids, strict=False)
    )
    fixed = (0xF000 << 64) | (0xC000 << 48)  # the version and variant bits
    ones = zeros = 0
    for u in values:
        ones |= u.int
        zeros |= ~u.int & (2**128 - 1)
    assert ones & ~fixed == zeros & ~fixed == (2**128 - 1) & ~fixed


class TaggedItem(Item):
    """A user's own kind of Item."""


def test_a_subclass_of_item_reaches_the_processor_as_itself(
    orchestrator: Callable[..., Orchestrator],
) -> None:
    """An Item subclass is handed to the processor as an instance of that subclass, with
    its id and batch id set; plain Items and paths come as Items."""
    seen: list[Item] = []
    snap = orchestrator(seen.append).run([TaggedItem("t.jpg", source="s3://b/t"), Item("p.jpg")])
    by_name = {item.filename: item for item in seen}
    assert type(by_name["t.jpg"]) is TaggedItem
    assert type(by_name["p.jpg"]) is Item
    assert by_name["t.jpg"].source == "s3://b/t"
    assert {(i.id, i.batch_id) for i in seen} == {(i.id, snap.batch_id) for i in snap.items}
    assert snap.items[0].source == "s3://b/t"


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([], "at least one item"),
        ([42], "expected an Item or a path"),
        ([Item("")], "filename"),
        ("a.jpg", "iterable"),
        ([Item("a", id="x"), Item("b", id="x")], "more than once"),
        (["/"], "names no file"),
        ([Item("a\rb.jpg")], "NUL or line breaks"),
        ([Item("a\x00.jpg")], "NUL or line breaks"),
        ([Item("a.jpg", id="x\ny")], "item 0 id must not contain NUL or line breaks"),
        ([Item("a.jpg"), Item("b.jpg", id=" ")], "item 1 id must not be empty"),
        ([Item("a.jpg", source="s3://k", id=7)], "item 0 id must be a string"),  # type: ignore[arg-type]
    ],
)
def test_bad_items_are_rejected_before_anything_runs(
    orchestrator: Callable[..., Orchestrator], items: Any, message: str
) -> None:
    """Bad item lists raise ValidationError and start nothing."""
    calls: list[Item] = []
    orch = orchestrator(calls.append)
    with pytest.raises(ValidationError, match=message):
        orch.submit(items)
    assert calls == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": 2.5}, "concurrency"),
        ({"executor": "pool"}, "executor"),
    ],
)
def test_bad_settings_are_rejected(
    tracker: BatchTracker, kwargs: dict[str, Any], message: str
) -> None:
    """concurrency must be a positive int and executor an Executor."""
    with pytest.raises(ValidationError, match=message):
        Orchestrator(tracker, upper, **kwargs)
    with pytest.raises(ValidationError, match="processor"):
        Orchestrator(tracker, "not callable")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="tracker"):
        Orchestrator("tracker", upper)  # type: ignore[arg-type]


def test_non_callable_on_progress_is_rejected(orchestrator: Callable[..., Orchestrator]) -> None:
    """on_progress must be callable."""
    with pytest.raises(ValidationError, match="on_progress"):
        orchestrator(upper).submit(["a.jpg"], on_progress=5)


def test_wait_for_a_batch_never_submitted_here(
    orchestrator: Callable[..., Orchestrator], tracker: BatchTracker
) -> None:
    """wait() on an unfinished batch from elsewhere waits for it, up to its timeout; an
    unknown batch raises BatchNotFound; a batch of its own that is late, TimeoutError."""
    orch = orchestrator(upper)
    other = tracker.create_batch(["x.jpg"])
    with pytest.raises(TimeoutError):
        orch.wait(other.batch_id, timeout=0.05)
    with pytest.raises(BatchNotFound):
        orch.wait(str(uuid.uuid4()), timeout=5)
    gate = Gate()
    slow = orchestrator(gate)
    snap = slow.submit(["a.jpg"])
    with pytest.raises(TimeoutError):
        slow.wait(snap.batch_id, timeout=0.05)
    gate.release.set()


def test_process_pool_runs_items_and_updates_here(tracker: BatchTracker) -> None:
    """With a ProcessPoolExecutor, items run in other processes; the tracker is updated here."""
    events: list[ProgressEvent] = []
    with (
        ProcessPoolExecutor(2) as pool,
        Orchestrator(tracker, upper, concurrency=2, executor=pool) as orch,
    ):
        snap = orch.run(["a.jpg", "b.jpg", "bad.jpg"], on_progress=events.append)
    assert (snap.progress.completed, snap.progress.failed) == (2, 1)
    assert snap.items[2].error == "ValueError: cannot read bad.jpg"
    assert len(events) == 6


def test_several_batches_share_the_concurrency(orchestrator: Callable[..., Orchestrator]) -> None:
    """Two batches submitted together both finish and never exceed the bound together."""
    gate = Gate()
    orch = orchestrator(gate, concurrency=2)
    first = orch.submit([f"a{i}.jpg" for i in range(4)])
    second = orch.submit([f"b{i}.jpg" for i in range(4)])
    _wait_until(lambda: gate.running == 2)
    gate.release.set()
    assert orch.wait(first.batch_id).progress.completed == 4
    assert orch.wait(second.batch_id).progress.completed == 4
    assert gate.peak == 2


# -- resume, heartbeats, cancel from elsewhere -----------------------------------------------


class Flaky:
    """Fails the sources listed in ``bad``; records every source it was called with."""

    def __init__(self, bad: set[str]) -> None:
        self.bad = bad
        self.seen: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, item: Item) -> None:
        with self.lock:
            self.seen.append(item.source)
        if item.source in self.bad:
            raise ProcessingError(f"{item.filename} is broken")


def test_resume_reruns_retried_items_from_their_stored_sources(
    orchestrator: Callable[..., Orchestrator], tracker: BatchTracker
) -> None:
    """After retry(), resume() runs only the retried items, each with its stored source."""
    flaky = Flaky({"src-1", "src-3"})
    orch = orchestrator(flaky, concurrency=2)
    items = [Item(f"{i}.jpg", source=f"src-{i}") for i in range(5)]
    first = orch.run(items)
    assert (first.progress.completed, first.progress.failed) == (3, 2)
    assert [i.source for i in first.items] == [f"src-{i}" for i in range(5)]
    flaky.bad.clear()
    flaky.seen.clear()
    assert tracker.retry(first.batch_id) == 2
    events: list[ProgressEvent] = []
    orch.resume(first.batch_id, on_progress=events.append)
    final = orch.wait(first.batch_id)
    assert final.status is Status.COMPLETED
    assert sorted(flaky.seen) == ["src-1", "src-3"]
    assert [e.progress.completed for e in events if e.item.status.is_final] == [4, 5]


def test_resume_finishes_what_a_dead_worker_left(
    orchestrator: Callable[..., Orchestrator], tracker: BatchTracker, clock: Any
) -> None:
    """A batch half-run by a process that died finishes after reclaim() and resume()."""
    snap = tracker.create_batch([Item(f"{i}.jpg", source=f"src-{i}") for i in range(4)])
    dead = snap.items[0].id
    tracker.start_item(snap.batch_id, dead)  # the worker that started it is gone
    clock.advance(tracker.lease + 1)
    assert tracker.reclaim() == 1
    flaky = Flaky(set())
    orch = orchestrator(flaky, concurrency=2)
    orch.resume(snap.batch_id)
    final = orch.wait(snap.batch_id)
    assert final.progress.completed == 4
    assert sorted(flaky.seen) == [f"src-{i}" for i in range(4)]
    assert [i.attempts for i in final.items] == [2, 1, 1, 1]
    assert final.to_dict()["images"][0]["attempts"] == 2


def test_two_orchestrators_resuming_one_batch_run_each_item_once(tracker: BatchTracker) -> None:
    """Orchestrators racing to resume the same batch never run an item twice."""
    snap = tracker.create_batch([Item(f"{i}.jpg", source=f"src-{i}") for i in range(30)])
    flaky = Flaky(set())
    orchs = [Orchestrator(tracker, flaky, concurrency=3) for _ in range(2)]
    try:
        for orch in orchs:
            orch.resume(snap.batch_id)
        for orch in orchs:
            orch.wait(snap.batch_id)
    finally:
        for orch in orchs:
            orch.close()
    assert sorted(flaky.seen) == sorted(f"src-{i}" for i in range(30))
    assert tracker.get(snap.batch_id).progress.completed == 30


def test_resume_does_not_queue_an_item_twice(orchestrator: Callable[..., Orchestrator]) -> None:
    """Resuming a batch that is still running here adds nothing already queued."""
    gate = Gate()
    orch = orchestrator(gate, concurrency=1)
    snap = orch.submit([f"{i}.jpg" for i in range(4)])
    _wait_until(lambda: gate.running == 1)
    orch.resume(snap.batch_id)
    gate.release.set()
    final = orch.wait(snap.batch_id)
    assert final.progress.completed == 4
    assert sorted(gate.started) == [f"{i}.jpg" for i in range(4)]


def test_resume_of_an_unknown_batch_is_not_found(orchestrator: Callable[..., Orchestrator]) -> None:
    """resume() raises BatchNotFound for a batch the tracker does not know."""
    with pytest.raises(BatchNotFound):
        orchestrator(upper).resume("no-such-batch")


def test_items_cancelled_through_the_tracker_are_skipped(
    orchestrator: Callable[..., Orchestrator], tracker: BatchTracker
) -> None:
    """Items cancelled by tracker.cancel (another process) never start here."""
    gate = Gate()
    orch = orchestrator(gate, concurrency=1)
    snap = orch.submit([f"{i}.jpg" for i in range(5)])
    _wait_until(lambda: gate.running == 1)
    assert tracker.cancel(snap.batch_id) == 4
    gate.release.set()
    final = orch.wait(snap.batch_id)
    assert (final.progress.completed, final.progress.cancelled) == (1, 4)
    assert gate.started == ["0.jpg"]


def test_running_items_are_heartbeated_and_never_lost(store_factory: Any) -> None:
    """An item running for several leases keeps its lease: reclaim() never takes it."""
    tracker = BatchTracker(store_factory(), lease=0.3)
    release = threading.Event()
    orch = Orchestrator(tracker, lambda item: release.wait(10), concurrency=1)
    try:
        snap = orch.submit(["slow.jpg"])
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            assert tracker.reclaim() == 0
            time.sleep(0.05)
        release.set()
        final = orch.wait(snap.batch_id, timeout=10)
    finally:
        release.set()
        orch.close()
    assert final.status is Status.COMPLETED
    assert final.items[0].attempts == 1


def test_without_heartbeats_a_stalled_item_is_reclaimed(store_factory: Any) -> None:
    """The same stall with a worker that never heartbeats loses the item to reclaim()."""
    tracker = BatchTracker(store_factory(), lease=0.3)
    snap = tracker.create_batch(["slow.jpg"])
    tracker.start_item(snap.batch_id, snap.items[0].id)
    time.sleep(0.4)
    assert tracker.reclaim() == 1


def test_a_source_that_is_not_text_runs_but_is_not_stored(
    orchestrator: Callable[..., Orchestrator],
) -> None:
    """Bytes and non-UTF-8 path sources reach the processor but are not kept for resume."""
    seen: list[object] = []
    orch = orchestrator(lambda item: seen.append(item.source))
    final = orch.run([Item("a.jpg", source=b"raw bytes"), Item("b.jpg", source="/x/b\udcff")])
    assert final.progress.completed == 2
    assert sorted(map(repr, seen)) == sorted([repr(b"raw bytes"), repr("/x/b\udcff")])
    assert [i.source for i in final.items] == [INPUT_NOT_KEPT, INPUT_NOT_KEPT]


def _decoy(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Work in ``folder``, which holds a ``cat.jpg`` that is not the item's input."""
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"an unrelated file that happens to be called cat.jpg")
    monkeypatch.chdir(folder)


def test_a_retried_item_whose_input_was_bytes_is_refused_not_guessed(
    orchestrator: Callable[..., Orchestrator],
    tracker: BatchTracker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """retry() refuses an item whose bytes input was not kept, instead of letting a runner
    read whatever file in the working directory has its name."""
    _decoy(tmp_path / "cwd", monkeypatch)
    seen: list[object] = []

    def reads(item: Item) -> None:
        seen.append(item.source)
        if isinstance(item.source, bytes):
            raise ProcessingError("not an image")

    orch = orchestrator(reads)
    first = orch.run([Item("cat.jpg", source=b"not an image")])
    assert first.status is Status.FAILED
    with pytest.raises(InputsGone) as caught:
        tracker.retry(first.batch_id)
    assert caught.value.item_ids == (first.items[0].id,)
    assert "submit it again" in str(caught.value)
    with pytest.raises(InputsGone):
        tracker.retry(first.batch_id, [first.items[0].id])
    orch.resume(first.batch_id)
    final = orch.wait(first.batch_id)
    assert final.items[0].status is Status.FAILED
    assert final.items[0].error == "not an image"  # unchanged: nothing was retried
    assert seen == [b"not an image"]


def test_resume_fails_an_item_whose_input_was_not_kept(
    orchestrator: Callable[..., Orchestrator],
    tracker: BatchTracker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An item put back to pending (a reclaim) whose input was bytes fails with a clear
    error on resume; the processor never gets its filename as a guess."""
    _decoy(tmp_path / "cwd", monkeypatch)
    gate = Gate()
    first = orchestrator(gate)
    snap = first.submit([Item("cat.jpg", source=b"\xff\xd8 the real bytes")])
    _wait_until(lambda: gate.running == 1)
    assert tracker.get(snap.batch_id).items[0].source == INPUT_NOT_KEPT
    # The process that held the bytes is gone: its item comes back to pending.
    tracker.clock.advance(tracker.lease + 1)  # type: ignore[attr-defined]
    assert tracker.reclaim() == 1
    seen: list[object] = []
    second = orchestrator(lambda item: seen.append((item.filename, item.source)))
    second.resume(snap.batch_id)
    final = second.wait(snap.batch_id, timeout=10)
    gate.release.set()
    assert seen == []
    assert final.items[0].status is Status.FAILED
    assert final.items[0].error == INPUT_NOT_KEPT_ERROR == "its input was not kept: submit it again"


def test_an_item_given_without_a_source_still_resumes_from_its_filename(
    orchestrator: Callable[..., Orchestrator], tracker: BatchTracker
) -> None:
    """An Item with no source means its filename is the input, before and after a resume."""
    snap = tracker.create_batch([Item("named.jpg")])
    tracker.start_item(snap.batch_id, snap.items[0].id)
    tracker.clock.advance(tracker.lease + 1)  # type: ignore[attr-defined]
    assert tracker.reclaim() == 1
    seen: list[object] = []
    orch = orchestrator(lambda item: seen.append((item.filename, item.source)))
    orch.resume(snap.batch_id)
    assert orch.wait(snap.batch_id, timeout=10).status is Status.COMPLETED
    assert seen == [("named.jpg", None)]


def test_a_resume_racing_a_submit_joins_its_run(tracker: BatchTracker) -> None:
    """A recovery loop resuming a batch while submit() sets it up never splits the run."""
    resumed: list[Any] = []
    threads: list[threading.Thread] = []

    class EagerTracker(BatchTracker):
        def create_batch(self, *args: Any, **kwargs: Any) -> Any:
            snap = super().create_batch(*args, **kwargs)
            # Another thread (serve's recovery loop) resumes the new batch at once.
            thread = threading.Thread(target=lambda: resumed.append(orch.resume(snap.batch_id)))
            threads.append(thread)
            thread.start()
            thread.join(0.2)
            return snap

    racing = EagerTracker(tracker.store, clock=tracker.clock)
    events: list[ProgressEvent] = []
    orch = Orchestrator(racing, upper, concurrency=2)
    try:
        final = orch.run([f"{i}.jpg" for i in range(6)], on_progress=events.append)
        threads[0].join(10)
    finally:
        orch.close()
    assert resumed
    assert final.progress.completed == 6
    finals = [e.progress.finished for e in events if e.item.status.is_final]
    assert finals == [1, 2, 3, 4, 5, 6]


def test_a_resume_after_the_run_settles_starts_a_new_run(
    orchestrator: Callable[..., Orchestrator], tracker: BatchTracker
) -> None:
    """Items retried right after a run finished go to a new run that wait() follows."""
    flaky = Flaky({"src-0"})
    orch = orchestrator(flaky, concurrency=1)
    snap = orch.run([Item("0.jpg", source="src-0"), Item("1.jpg", source="src-1")])
    assert snap.progress.failed == 1
    flaky.bad.clear()
    assert tracker.retry(snap.batch_id) == 1
    orch.resume(snap.batch_id)
    final = orch.wait(snap.batch_id, timeout=10)
    assert final.status is Status.COMPLETED
    assert flaky.seen == ["src-0", "src-1", "src-0"]


def test_wait_after_a_resume_that_found_nothing_to_do(
    orchestrator: Callable[..., Orchestrator], tracker: BatchTracker
) -> None:
    """A resume whose items another worker already runs ends here at once; wait() still
    answers for the batch (as it stands) however late it is called, instead of taking it
    for a batch never submitted here."""
    snap = tracker.create_batch([Item("a.jpg", source="a")])
    tracker.start_item(snap.batch_id, snap.items[0].id)  # another worker has it
    orch = orchestrator(upper)
    orch.resume(snap.batch_id)
    deadline = time.monotonic() + 10
    while snap.batch_id in orch._runs and time.monotonic() < deadline:
        time.sleep(0.01)  # the run has ended and is gone
    got = orch.wait(snap.batch_id, timeout=5)
    assert got.progress.processing == 1


class _Unprintable(Exception):
    """An exception whose message cannot be made: str() raises."""

    def __str__(self) -> str:
        raise RuntimeError("no message")


def _unprintable_on_3(item: Item) -> None:
    if item.filename.startswith("3"):
        raise _Unprintable()


def test_an_exception_that_cannot_be_printed_fails_its_item_and_the_batch_ends(
    tracker: BatchTracker,
) -> None:
    """A processor raising an exception whose str() raises fails that item with its type
    name, and the other items (recorded alongside it) still run and finish."""
    orch = Orchestrator(tracker, _unprintable_on_3, concurrency=4)
    snap = orch.submit([f"{i}.jpg" for i in range(10)])
    final = orch.wait(snap.batch_id, timeout=10)  # (it hung: the writer lost the item)
    orch.close()
    assert (final.progress.completed, final.progress.failed) == (9, 1)
    (failed,) = [i for i in final.items if i.status is Status.FAILED]
    assert failed.error == "_Unprintable"
