"""Core benchmarks: the cost of an event, of reading counts, and of a full snapshot."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from batchtrack import BatchSnapshot, BatchTracker
from batchtrack.stores.base import Store
from harness import Comparison, compare

StoreMaker = Callable[[], Store]


class _DictUnderLock:
    """The baseline: a dict of item statuses and counters under one lock.

    It does the same bookkeeping as a tracker event: check the item's status, set the
    new one, move one count, stamp the time.
    """

    def __init__(self, n: int) -> None:
        self.lock = threading.Lock()
        self.batches: dict[str, dict[str, Any]] = {
            "b": {
                "items": {str(i): "pending" for i in range(n)},
                "counts": {"pending": n, "processing": 0, "completed": 0, "failed": 0},
                "updated_at": 0.0,
            }
        }

    def update(self, batch_id: str, item_id: str, source: str, target: str) -> None:
        with self.lock:
            batch = self.batches[batch_id]
            items = batch["items"]
            if items[item_id] != source:
                raise ValueError(item_id)
            items[item_id] = target
            counts = batch["counts"]
            counts[source] -= 1
            counts[target] += 1
            batch["updated_at"] = time.time()


def tracker_events(make_store: StoreMaker, n: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """(setup, run): a fresh n-item batch per round; run starts and completes every item."""
    state: dict[str, Any] = {}
    ids = [str(i) for i in range(n)]

    def setup() -> None:
        tracker = BatchTracker(state.get("store") or make_store())
        state["store"] = tracker.store
        state["tracker"] = tracker
        state["batch"] = tracker.create_batch([(i, f"{i}.jpg") for i in ids]).batch_id

    def run() -> None:
        tracker, batch = state["tracker"], state["batch"]
        for i in ids:
            tracker.start_item(batch, i)
            tracker.complete_item(batch, i)

    return setup, run


def event_cost(make_store: StoreMaker, name: str, *, goal: float, n: int = 2000) -> Comparison:
    """start+complete per item through the tracker vs the dict-under-a-lock baseline."""
    setup_ours, ours = tracker_events(make_store, n)
    base: dict[str, _DictUnderLock] = {}
    ids = [str(i) for i in range(n)]

    def setup() -> None:
        setup_ours()
        base["b"] = _DictUnderLock(n)

    def baseline() -> None:
        table = base["b"]
        for i in ids:
            table.update("b", i, "pending", "processing")
            table.update("b", i, "processing", "completed")

    return compare(
        f"{name}: start+complete event vs dict-under-a-lock",
        ours,
        baseline,
        goal=goal,
        setup=setup,
        rounds=9,
    )


def _noop(item: object) -> None:
    return None


def orchestrator_vs_pool(
    make_store: StoreMaker, name: str, *, goal: float, n: int = 2000, concurrency: int = 8
) -> Comparison:
    """A batch of ``n`` no-op items through an Orchestrator (``concurrency`` threads,
    every start and end recorded) vs a bare ``ThreadPoolExecutor(concurrency).map`` of
    the same no-op; both pools are made once and reused each round. ``goal`` is the
    largest acceptable ours/pool ratio (0.3x the pool's speed is a ratio of 3.33)."""
    from concurrent.futures import ThreadPoolExecutor

    from batchtrack import Item, Orchestrator

    tracker = BatchTracker(make_store())
    orch = Orchestrator(tracker, _noop, concurrency=concurrency)
    pool = ThreadPoolExecutor(concurrency)
    items = [Item(f"{i}.jpg") for i in range(n)]
    numbers = range(n)

    def ours() -> None:
        snap = orch.run(items)
        assert snap.progress.completed == n

    def baseline() -> None:
        for _ in pool.map(_noop, numbers):
            pass

    try:
        return compare(
            f"{name}: Orchestrator({concurrency}) of no-op items vs ThreadPoolExecutor.map",
            ours,
            baseline,
            goal=goal,
            rounds=7,
        )
    finally:
        orch.close()
        pool.shutdown()


def counts_read(make_store: StoreMaker, name: str, *, reads: int = 2000) -> Comparison:
    """Reading counts (get with items=False) of a 100,000-item batch vs a 10-item one."""
    tracker = BatchTracker(make_store())
    big = tracker.create_batch([f"{i}.jpg" for i in range(100_000)]).batch_id
    small = tracker.create_batch([f"{i}.jpg" for i in range(10)]).batch_id

    def read(batch_id: str) -> Callable[[], None]:
        def run() -> None:
            for _ in range(reads):
                tracker.get(batch_id, items=False)

        return run

    return compare(
        f"{name}: read counts, 100,000 items vs 10 items",
        read(big),
        read(small),
        goal=1.2,
    )


def report_cost(
    make_store: StoreMaker, name: str, *, coalesced: bool, goal: float, n: int = 2000
) -> Comparison:
    """``n`` progress reports on running items vs ``n`` events (a start each).

    Direct: :meth:`BatchTracker.report`, one store write each. Coalesced: what a processor
    calling ``report_progress`` costs, a report per 0.05 % of one item in a tight loop
    (the reporter writes one in 20, or one per half second).
    """
    from batchtrack._report import ItemReporter

    ids = [str(i) for i in range(n)]
    state: dict[str, Any] = {}

    def setup() -> None:
        tracker = BatchTracker(make_store())
        reported = tracker.create_batch([(i, f"{i}.jpg") for i in ids]).batch_id
        started = tracker.create_batch([(i, f"{i}.jpg") for i in ids]).batch_id
        for i in ids:
            tracker.start_item(reported, i)
        state.update(tracker=tracker, reported=reported, started=started)

    def ours() -> None:
        tracker, batch = state["tracker"], state["reported"]
        if coalesced:
            reporter = ItemReporter(tracker, batch, ids[0])
            for k in range(n):
                reporter(k / n)
        else:
            for k, i in enumerate(ids):
                tracker.report(batch, i, k / n)

    def baseline() -> None:
        tracker, batch = state["tracker"], state["started"]
        for i in ids:
            tracker.start_item(batch, i)

    kind = "report_progress (coalesced)" if coalesced else "tracker.report"
    return compare(
        f"{name}: {kind} vs a start event", ours, baseline, goal=goal, setup=setup, rounds=9
    )


def half_done_batch(store: Store, n: int) -> tuple[BatchTracker, BatchSnapshot]:
    """A batch of ``n`` images, half of them done: nine in ten processed, one failed."""
    tracker = BatchTracker(store)
    snap = tracker.create_batch([f"image{i}.jpg" for i in range(n)])
    for k, item in enumerate(snap.items[: n // 2]):
        tracker.start_item(snap.batch_id, item.id)
        if k % 10:
            tracker.complete_item(snap.batch_id, item.id)
        else:
            tracker.fail_item(snap.batch_id, item.id, "not an image")
    return tracker, snap


def snapshot_json(
    make_store: StoreMaker, name: str, *, goal: float, n: int = 10_000
) -> tuple[Comparison, Callable[[], None]]:
    """Full snapshot + json.dumps of a 10,000-item batch vs copying dicts under a lock."""
    tracker, snap = half_done_batch(make_store(), n)
    lock = threading.Lock()
    rows = [item.to_dict() for item in tracker.get(snap.batch_id).items]

    def ours() -> None:
        json.dumps(tracker.get(snap.batch_id).to_dict())

    def baseline() -> None:
        with lock:
            copied = [dict(row) for row in rows]
        json.dumps({"batchId": snap.batch_id, "images": copied})

    return compare(
        f"{name}: snapshot + json.dumps, {n:,} items vs dict copies",
        ours,
        baseline,
        goal=goal,
    ), ours


def run(quick: bool = False) -> list[Comparison]:
    """The core issue's three figures, on the memory store."""
    from batchtrack import MemoryStore

    results = [
        event_cost(MemoryStore, "memory", goal=3.0, n=500 if quick else 2000),
        orchestrator_vs_pool(MemoryStore, "memory", goal=1 / 0.3, n=500 if quick else 2000),
        counts_read(MemoryStore, "memory"),
        snapshot_json(MemoryStore, "memory", goal=2.0)[0],
        report_cost(MemoryStore, "memory", coalesced=False, goal=1.5, n=500 if quick else 2000),
        report_cost(MemoryStore, "memory", coalesced=True, goal=0.5, n=500 if quick else 2000),
    ]
    return results
