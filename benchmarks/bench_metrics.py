"""Metrics benchmarks: what Prometheus metrics add to an event, and what a scrape costs."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry

from batchtrack import BatchTracker, MemoryStore, SQLiteStore
from batchtrack.metrics import InstrumentedStore, Metrics
from batchtrack.stores.base import Store
from bench_core import tracker_events
from harness import Comparison, compare


def event_with_metrics(name: str, make: type[Store], *, n: int, goal: float) -> Comparison:
    """start+complete per item with metrics (an InstrumentedStore) vs the same without."""
    metrics = Metrics(CollectorRegistry())
    bare = make()
    counted = InstrumentedStore(make(), metrics)
    setup_ours, ours = tracker_events(lambda: counted, n)
    setup_base, baseline = tracker_events(lambda: bare, n)

    def setup() -> None:
        setup_ours()
        setup_base()

    result = compare(
        f"{name}: start+complete event, with metrics vs without",
        ours,
        baseline,
        goal=goal,
        setup=setup,
        rounds=9,
    )
    counted.close()
    bare.close()
    return result


def scrape_vs_event(*, batches: int) -> Comparison:
    """A scrape of /metrics's body (the store read for the gauges included), with
    ``batches`` open batches, vs one start+complete event: how many events a scrape is."""
    metrics = Metrics(CollectorRegistry())
    tracker = metrics.instrument(BatchTracker())
    ids = [tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")]).batch_id for _ in range(batches)]
    for batch in ids:
        tracker.start_item(batch, "a")
    batch = tracker.create_batch([(str(i), f"{i}.jpg") for i in range(100_000)]).batch_id
    items = iter(range(100_000))

    def event() -> None:
        item = str(next(items))
        tracker.start_item(batch, item)
        tracker.complete_item(batch, item)

    return compare(
        f"memory: one scrape ({batches} open batches) vs one event",
        metrics.exposition,
        event,
        goal=1000,
        rounds=31,
    )


def run(quick: bool = False) -> list[Comparison]:
    """The metrics issue's figures: the cost per event, on the memory and SQLite stores."""
    n = 500 if quick else 2000
    results = [event_with_metrics("memory", MemoryStore, n=n, goal=2.0)]
    with tempfile.TemporaryDirectory() as tmp:
        made = iter(range(1_000))

        def sqlite() -> SQLiteStore:
            return SQLiteStore(Path(tmp) / f"s{next(made)}.db")

        results.append(
            event_with_metrics("sqlite", sqlite, n=n // 5, goal=1.2)  # type: ignore[arg-type]
        )
    results.append(scrape_vs_event(batches=10 if quick else 100))
    return results
