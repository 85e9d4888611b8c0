"""The fast path: a tracker event and a status body against the floors the issue set.

1. A memory-store event (start or complete) against a dict of statuses under a lock
   doing the same bookkeeping (the floor), printed with the absolute time per event;
   goal (issue 27, point 4): <= 3 us per event with the ETA sums kept. Also the fast
   path against the generic store path (a MemoryStore subclass), which third-party
   stores take.
2. A SQLite event against a bare ``BEGIN; UPDATE; COMMIT`` on the same kind of file
   (WAL, synchronous=NORMAL); goal: >= 0.3x its speed (ratio <= 3.33).
3. The status body of a 10,000-item batch (``tracker.get`` plus the JSON bytes) against
   joining pre-encoded items (the floor); goals 3 ms (memory) and 8 ms (SQLite),
   printed as absolute figures next to the ratio.
"""

from __future__ import annotations

import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from batchtrack import BatchTracker, MemoryStore, SQLiteStore
from batchtrack._json import status_body
from batchtrack.stores.base import Store, Transition, TransitionResult
from bench_core import half_done_batch
from harness import Comparison, compare


class _GenericMemoryStore(MemoryStore):
    """apply() overridden: the tracker takes the generic store path (Transition and
    TransitionResult per event), as for a third-party store. (A subclass that keeps
    apply() keeps the fast path too.)"""

    def apply(self, batch_id: str, transition: Transition) -> TransitionResult:
        return super().apply(batch_id, transition)


def _events(make: Callable[[], Store], n: int) -> tuple[Callable[[], None], Callable[[], None]]:
    state: dict[str, object] = {}
    ids = [str(i) for i in range(n)]

    def setup() -> None:
        tracker = BatchTracker(make())
        state["tracker"] = tracker
        state["batch"] = tracker.create_batch([(i, "x.jpg") for i in ids]).batch_id

    def run() -> None:
        tracker, batch = state["tracker"], state["batch"]
        assert isinstance(tracker, BatchTracker)
        assert isinstance(batch, str)
        for i in ids:
            tracker.start_item(batch, i)
            tracker.complete_item(batch, i)

    return setup, run


def _floor(n: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """A dict of statuses and counts under a lock: check, set, move a count, stamp."""
    state: dict[str, dict[str, object]] = {}
    lock = threading.Lock()

    def setup() -> None:
        state["items"] = {str(i): "pending" for i in range(n)}
        state["counts"] = {"pending": n, "processing": 0, "completed": 0, "failed": 0}

    def run() -> None:
        items, counts = state["items"], state["counts"]
        for i in map(str, range(n)):
            for source, target in (("pending", "processing"), ("processing", "completed")):
                with lock:
                    if items[i] != source:
                        raise ValueError(i)
                    items[i] = target
                    counts[source] -= 1  # type: ignore[operator]
                    counts[target] += 1  # type: ignore[operator]
                    state["at"] = {"t": time.time()}

    return setup, run


def memory_event(n: int) -> list[Comparison]:
    ours_setup, ours = _events(MemoryStore, n)
    generic_setup, generic = _events(_GenericMemoryStore, n)
    floor_setup, floor = _floor(n)

    def setup() -> None:
        ours_setup()
        generic_setup()
        floor_setup()

    vs_floor = compare(
        "fast: memory event vs dict+lock floor", ours, floor, goal=1e9, setup=setup, rounds=9
    )
    vs_generic = compare(
        "fast: memory event, fast path vs generic store path",
        ours,
        generic,
        goal=1.0,
        setup=setup,
        rounds=9,
    )
    us = vs_floor.ours / (2 * n) * 1e6
    print(f"fast: memory event {us:.2f} us (goal <= 3 us)")
    # The same runs timed by the process's CPU clock: what other load on a shared
    # machine takes away (time slices) does not count. Printed beside, not judged.
    cpu = []
    for _ in range(9):
        ours_setup()
        began = time.process_time()
        ours()
        cpu.append(time.process_time() - began)
    print(f"fast: memory event {statistics.median(cpu) / (2 * n) * 1e6:.2f} us of CPU time")
    vs_floor = Comparison(vs_floor.name, vs_floor.ours, vs_floor.baseline, "<= 3 us", us <= 3.0)
    return [vs_floor, vs_generic]


def sqlite_event(folder: Path, n: int) -> Comparison:
    made = iter(range(1_000_000))
    ours_setup, ours = _events(lambda: SQLiteStore(folder / f"ev{next(made)}.db"), n)
    state: dict[str, sqlite3.Connection] = {}

    def setup() -> None:
        ours_setup()
        db = sqlite3.connect(folder / f"bare{next(made)}.db", isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v INTEGER)")
        db.executemany("INSERT INTO t VALUES (?, 0)", ((i,) for i in range(n)))
        state["db"] = db

    def bare() -> None:
        db = state["db"]
        for i in range(n):
            for _ in range(2):
                db.execute("BEGIN")
                db.execute("UPDATE t SET v = v + 1 WHERE k = ?", (i,))
                db.execute("COMMIT")

    result = compare(
        "fast: SQLite event vs bare BEGIN/UPDATE/COMMIT",
        ours,
        bare,
        goal=1 / 0.3,
        setup=setup,
        rounds=7,
    )
    print(f"fast: SQLite event {result.ours / (2 * n) * 1e6:.1f} us")
    return result


def status_bodies(kind: str, make: Callable[[], Store], goal_ms: float, n: int) -> Comparison:
    tracker, snap = half_done_batch(make(), n)
    encoded = [b'{"id":"x","filename":"y","status":"completed"}' for _ in range(n)]
    lock = threading.Lock()

    def ours() -> None:
        status_body(tracker.get(snap.batch_id))

    def floor() -> None:
        with lock:
            b"".join((b'{"images":[', b",".join(encoded), b"]}"))

    result = compare(
        f"fast: {kind} {n:,}-item status body vs joining encoded items",
        ours,
        floor,
        goal=1e9,
        rounds=15,
    )
    ms = result.ours * 1e3
    print(f"fast: {kind} {n:,}-item status body {ms:.2f} ms (goal <= {goal_ms:g} ms)")
    tracker.store.close()
    return Comparison(
        result.name, result.ours, result.baseline, f"<= {goal_ms:g} ms", ms <= goal_ms
    )


def run(quick: bool = False) -> list[Comparison]:
    n = 500 if quick else 2000
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        made = iter(range(1000))
        return [
            *memory_event(n),
            sqlite_event(folder, n // 2),
            status_bodies("memory", MemoryStore, 3.0, 10_000),
            status_bodies(
                "SQLite", lambda: SQLiteStore(folder / f"body{next(made)}.db"), 8.0, 10_000
            ),
        ]


if __name__ == "__main__":  # python benchmarks/bench_fast.py events: the two event figures
    import sys

    if sys.argv[1:] == ["events"]:
        with tempfile.TemporaryDirectory() as tmp:
            for line in [*memory_event(2000), sqlite_event(Path(tmp), 1000)]:
                print(line.line())
    else:
        for line in run("--quick" in sys.argv):
            print(line.line())
