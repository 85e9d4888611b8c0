"""A store that goes away for a moment loses no work: the Orchestrator waits it out."""

from __future__ import annotations

import collections
import os
import random
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from batchtrack import (
    BatchTracker,
    Item,
    MemoryStore,
    Orchestrator,
    ProgressEvent,
    SQLiteStore,
    Status,
    StoreError,
    ValidationError,
)
from batchtrack.stores.base import Store
from conftest import start_redis


class Counting:
    """A processor that counts its calls per item and takes a little time."""

    def __init__(self, seconds: float = 0.01) -> None:
        self.seconds = seconds
        self.calls: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def __call__(self, item: Item) -> None:
        with self.lock:
            assert item.id is not None
            self.calls[item.id] += 1
        time.sleep(self.seconds)


def _wait_for(condition: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_redis_restart_mid_batch_is_waited_out(tmp_path: Path) -> None:
    """300 items, redis-server killed mid-batch and back 2 s later: every item is
    processed once and counted once, and the batch completes."""
    pytest.importorskip("redis")
    from batchtrack.stores.redis import RedisStore

    proc, port = start_redis(tmp_path, persistent=True)
    store = RedisStore(f"redis://127.0.0.1:{port}/0")
    tracker = BatchTracker(store)
    work = Counting()
    orch = Orchestrator(tracker, work, concurrency=4, store_retry=30)
    try:
        snap = orch.submit([f"{i}.jpg" for i in range(300)])
        _wait_for(lambda: sum(work.calls.values()) >= 80)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        time.sleep(2)
        proc, _ = start_redis(tmp_path, persistent=True, port=port)
        final = orch.wait(snap.batch_id, timeout=120)
    finally:
        orch.close()
        proc.terminate()
        proc.wait(10)
    assert final.status is Status.COMPLETED
    assert final.progress.completed == 300
    assert sorted(work.calls.values()) == [1] * 300
    assert set(work.calls) == {i.id for i in final.items}


def test_a_locked_sqlite_file_is_waited_out(tmp_path: Path) -> None:
    """Another process holding SQLite's write lock past the busy timeout delays the batch;
    it completes once the lock is released, each item processed and counted once."""
    path = tmp_path / "batches.db"
    tracker = BatchTracker(SQLiteStore(path, timeout=0.1))
    work = Counting()
    orch = Orchestrator(tracker, work, concurrency=2, store_retry=30)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        snap = orch.submit([f"{i}.jpg" for i in range(60)])
        _wait_for(lambda: sum(work.calls.values()) >= 10)
        blocker.execute("BEGIN EXCLUSIVE")
        time.sleep(1.5)  # many times the busy timeout: every write in between fails
        blocker.execute("COMMIT")
        final = orch.wait(snap.batch_id, timeout=60)
    finally:
        blocker.close()
        orch.close()
    assert final.progress.completed == 60
    assert sorted(work.calls.values()) == [1] * 60


class FlakyStore(MemoryStore):
    """A MemoryStore whose applies fail while ``down`` is set, some after applying."""

    down = False
    lose_answers = False
    refused = 0  # calls failed while down

    def apply(self, batch_id, transition):  # type: ignore[no-untyped-def]
        if self.down:
            self.refused += 1
            if self.lose_answers:
                super().apply(batch_id, transition)  # applied, but the answer is lost
            raise StoreError("the store is down")
        return super().apply(batch_id, transition)

    def apply_all(self, batch_id, transitions):  # type: ignore[no-untyped-def]
        # The Orchestrator's calls: several transitions at once.
        if self.down:
            self.refused += 1
            if self.lose_answers:
                super().apply_all(batch_id, transitions)
            raise StoreError("the store is down")
        return super().apply_all(batch_id, transitions)


def test_an_item_whose_start_was_not_recorded_is_not_processed() -> None:
    """With the store down for longer than store_retry, nothing is processed, and the
    items are still pending for a later resume."""
    store = FlakyStore()
    tracker = BatchTracker(store)
    work = Counting()
    orch = Orchestrator(tracker, work, concurrency=2, store_retry=0.3)
    try:
        store.down = True
        snap = orch.submit([f"{i}.jpg" for i in range(4)])
        final = orch.wait(snap.batch_id, timeout=30)
    finally:
        orch.close()
    assert not work.calls
    assert store.refused
    assert final.progress.pending == 4
    store.down = False
    with Orchestrator(tracker, work, concurrency=2) as again:
        again.resume(snap.batch_id)
        assert again.wait(snap.batch_id, timeout=30).progress.completed == 4


def test_lost_answers_are_retried_without_counting_twice() -> None:
    """Transitions that applied but whose answers were lost are retried: each item is
    processed once, counted once, and the batch completes."""
    store = FlakyStore()
    store.lose_answers = True
    tracker = BatchTracker(store)
    work = Counting(0.0)
    orch = Orchestrator(tracker, work, concurrency=1, store_retry=10)
    try:
        store.down = True
        threading.Timer(0.3, lambda: setattr(store, "down", False)).start()
        snap = orch.submit([f"{i}.jpg" for i in range(3)])
        final = orch.wait(snap.batch_id, timeout=30)
    finally:
        orch.close()
    assert store.refused
    assert final.progress.completed == 3
    assert final.version == 6
    assert sorted(work.calls.values()) == [1, 1, 1]


@pytest.mark.parametrize("value", [-1, float("inf"), float("nan"), "60", True])
def test_bad_store_retry_is_rejected(value: object) -> None:
    """store_retry must be a finite number of seconds >= 0."""
    with pytest.raises(ValidationError, match="store_retry"):
        Orchestrator(BatchTracker(), print, store_retry=value)  # type: ignore[arg-type]


class NowAndThenFailingStore(MemoryStore):
    """A third party's store in spirit: ``apply_all`` is the base class's (one ``apply``
    per transition), and each ``apply`` fails now and then on its own (a passing error
    of its backend), at a seeded random rate."""

    rate = 0.25
    failures = 0

    def apply(self, batch_id, transition):  # type: ignore[no-untyped-def]
        with self._lock:
            fail = self._rng.random() < self.rate
        if fail:
            self.failures += 1
            raise StoreError("a passing failure")
        return super().apply(batch_id, transition)

    apply_all = Store.apply_all


def test_a_store_failing_now_and_then_per_transition_does_not_stall_the_batch() -> None:
    """A store whose every transition fails 1 time in 4 on its own: a call of many
    transitions then almost never goes through whole, so after a failed call the
    orchestrator records its steps one by one (under the same retry deadline), and every
    item is processed once and recorded, each final event delivered once."""
    store = NowAndThenFailingStore()
    store._rng = random.Random(7)  # type: ignore[attr-defined]
    tracker = BatchTracker(store)
    work = Counting()
    finals: collections.Counter[str] = collections.Counter()

    def seen(event: ProgressEvent) -> None:
        if event.item.status.is_final:
            finals[event.item.id] += 1

    with Orchestrator(tracker, work, concurrency=8, store_retry=5.0) as orch:
        snap = orch.submit([f"{i}.jpg" for i in range(120)], on_progress=seen)
        final = orch.wait(snap.batch_id, timeout=120)
    assert store.failures > 40
    assert final.progress.completed == 120
    assert sorted(work.calls.values()) == [1] * 120
    assert len(finals) == 120
    assert set(finals.values()) == {1}
