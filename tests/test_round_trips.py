"""The orchestrator's store round trips: an item's end and the next start in one call."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from batchtrack import BatchTracker, Item, Orchestrator, ProgressEvent, Status, StoreError
from batchtrack.stores.base import Store, Transition, TransitionResult
from batchtrack.stores.memory import MemoryStore


class RoundTrips(MemoryStore):
    """A memory store that counts the calls that change items (each one round trip on a
    store with a server), and can make each take ``delay`` seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.calls = 0
        self.transitions = 0
        self.delay = delay
        self._count_lock = threading.Lock()

    def _count(self, transitions: int) -> None:
        with self._count_lock:
            self.calls += 1
            self.transitions += transitions
        if self.delay:
            time.sleep(self.delay)

    def apply(self, batch_id: str, transition: Transition) -> TransitionResult:
        self._count(1)
        return super().apply(batch_id, transition)

    def apply_all(self, batch_id: str, transitions: Sequence[Transition]) -> list[TransitionResult]:
        self._count(len(transitions))
        return super().apply_all(batch_id, transitions)


class OneByOne(RoundTrips):
    """A store written before apply_all existed: it keeps the default (apply per
    transition)."""

    def apply_all(self, batch_id: str, transitions: Sequence[Transition]) -> list[TransitionResult]:
        return Store.apply_all(self, batch_id, transitions)


def _run(
    store: RoundTrips, n: int, concurrency: int, processor: object = str
) -> list[ProgressEvent]:
    events: list[ProgressEvent] = []
    tracker = BatchTracker(store)
    with Orchestrator(tracker, processor, concurrency=concurrency) as orch:  # type: ignore[arg-type]
        snap = orch.run([Item(f"{i}.jpg") for i in range(n)], on_progress=events.append)
    assert snap.progress.completed == n
    return events


def _check_events(events: list[ProgressEvent], n: int) -> None:
    finals = [e for e in events if e.item.status.is_final]
    assert sorted(e.progress.completed + e.progress.failed for e in finals) == list(range(1, n + 1))
    # Delivered in the order applied: versions rise; each item starts, then ends, once.
    assert [e.version for e in events] == sorted({e.version for e in events})
    seen: dict[str, list[Status]] = {}
    for e in events:
        seen.setdefault(e.item.id, []).append(e.item.status)
    assert all(statuses == [Status.PROCESSING, Status.COMPLETED] for statuses in seen.values())
    assert len(seen) == n


def test_an_item_end_and_the_next_start_share_one_store_call() -> None:
    """N items run one at a time cost about N store calls, not 2N: each call records an
    item's end together with the next item's start."""
    store = RoundTrips()
    events = _run(store, 30, concurrency=1)
    _check_events(events, 30)
    assert store.transitions == 60
    assert store.calls <= 31


def test_ends_from_several_threads_are_coalesced_into_one_call() -> None:
    """While one store call is under way, the items that end meanwhile (in other worker
    threads) go together in the next call: with a slow store, far fewer calls than items."""
    store = RoundTrips(delay=0.02)
    events = _run(store, 64, concurrency=8, processor=lambda item: time.sleep(0.005))
    _check_events(events, 64)
    assert store.transitions == 128
    assert store.calls <= 64 // 2


def test_a_store_without_apply_all_still_runs_every_item_once() -> None:
    """A store that keeps the default apply_all (apply per transition) runs a batch with
    every guarantee: each item's events once and in order, N final events."""
    store = OneByOne()
    events = _run(store, 40, concurrency=4)
    _check_events(events, 40)
    assert store.transitions == 80
    assert store.calls == 80


def test_a_failed_item_and_the_next_start_share_one_call() -> None:
    """A failure is recorded with its error in the same call as the next start."""

    def processor(item: Item) -> None:
        if item.filename.startswith("bad"):
            raise ValueError("no good")

    store = RoundTrips()
    tracker = BatchTracker(store)
    events: list[ProgressEvent] = []
    with Orchestrator(tracker, processor, concurrency=1) as orch:
        snap = orch.run([Item("bad.jpg"), Item("good.jpg")], on_progress=events.append)
    assert [i.status for i in snap.items] == [Status.FAILED, Status.COMPLETED]
    assert snap.items[0].error == "ValueError: no good"
    assert [e.item.status for e in events] == [
        Status.PROCESSING,
        Status.FAILED,
        Status.PROCESSING,
        Status.COMPLETED,
    ]
    assert store.calls == 3


def test_metrics_count_each_transition_once_and_keep_the_single_round_trip() -> None:
    """Through an InstrumentedStore the combined call reaches the wrapped store as one
    call (not one per transition), and every start and end is counted exactly once."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from batchtrack.metrics import InstrumentedStore, Metrics

    registry = prometheus_client.CollectorRegistry()
    inner = RoundTrips()
    store = InstrumentedStore(inner, Metrics(registry))
    tracker = BatchTracker(store)
    with Orchestrator(tracker, str, concurrency=1) as orch:
        snap = orch.run([Item(f"{i}.jpg") for i in range(20)])
    assert snap.progress.completed == 20
    assert inner.transitions == 40
    assert inner.calls <= 21
    assert registry.get_sample_value("batchtrack_items_started_total") == 20
    finished = registry.get_sample_value(
        "batchtrack_items_finished_total", {"outcome": "completed"}
    )
    assert finished == 20


class LosingAnswers(MemoryStore):
    """A memory store whose combined calls apply but then fail (the answer is lost, as
    when a connection drops after the server ran the call) while ``down`` is set."""

    down = False

    def apply_all(self, batch_id: str, transitions: Sequence[Transition]) -> list[TransitionResult]:
        results = super().apply_all(batch_id, transitions)
        if self.down:
            raise StoreError("the answer was lost")
        return results


@pytest.mark.parametrize("concurrency", [1, 4])
def test_events_whose_answer_was_lost_are_still_delivered_once(concurrency: int) -> None:
    """When a combined call applied but its answer was lost, the retry finds the items
    already moved: each item's start and end still reach on_progress, once each."""
    store = LosingAnswers()
    store.down = True
    threading.Timer(0.3, lambda: setattr(store, "down", False)).start()
    events: list[ProgressEvent] = []
    tracker = BatchTracker(store)
    with Orchestrator(tracker, str, concurrency=concurrency, store_retry=10) as orch:
        snap = orch.run([Item(f"{i}.jpg") for i in range(6)], on_progress=events.append)
    assert snap.progress.completed == 6
    assert snap.version == 12
    seen: dict[str, list[Status]] = {}
    for e in events:
        seen.setdefault(e.item.id, []).append(e.item.status)
    assert seen == {i.id: [Status.PROCESSING, Status.COMPLETED] for i in snap.items}
