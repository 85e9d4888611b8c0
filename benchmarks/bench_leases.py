"""Leases: what they add to the hot path, and what reclaim() costs.

1. A start+complete event with leases (this checkout) against the same event without
   them (batchtrack 0.1.0, the last commit before leases, checked out of git into a
   temporary folder), on every store. Both run in fresh subprocesses, interleaved round by
   round (old, new, new, old, ...), and the ratio of the medians is reported. Goal: <= 1.1.
2. reclaim() with 100 lost items in a store holding 10,000 open batches (10 items each,
   one of them processing with a live lease) against the same 100 lost items in a store
   of 100 open batches: a ratio near 1 means it costs O(lost), not O(items). The same
   store with 1,000 lost items shows it growing with what is lost.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from io import BytesIO
from pathlib import Path
from typing import Any

from batchtrack import BatchTracker, MemoryStore, SQLiteStore
from batchtrack.stores.base import Store
from batchtrack.testing import FakeClock
from harness import Comparison

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "99b49b1"
"""The last commit before leases: batchtrack 0.1.0 as released to users."""

sys.path.insert(0, str(ROOT / "tests"))

# Runs in a subprocess with either source tree first on sys.path; prints seconds per
# start+complete pair (median of a few batches after a warm-up batch).
_EVENTS = textwrap.dedent(
    """
    import statistics, sys, time, uuid
    from batchtrack import BatchTracker, MemoryStore, SQLiteStore
    kind, n, where = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if kind == "memory":
        store = MemoryStore()
    elif kind == "sqlite":
        store = SQLiteStore(where + "/" + uuid.uuid4().hex + ".db")
    else:
        from batchtrack.stores.redis import RedisStore
        store = RedisStore(where, prefix=uuid.uuid4().hex + ":")
    tracker = BatchTracker(store)
    ids = [str(i) for i in range(n)]
    times = []
    for round_ in range(4):
        batch = tracker.create_batch([(i, "x.jpg") for i in ids]).batch_id
        start = time.perf_counter()
        for i in ids:
            tracker.start_item(batch, i)
            tracker.complete_item(batch, i)
        if round_:
            times.append((time.perf_counter() - start) / n)
    print(statistics.median(times))
    """
)


def baseline_tree(folder: Path, commit: str = BASELINE) -> Path | None:
    """batchtrack's source at ``commit``, extracted from git; None outside a clone."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", commit, "src/batchtrack"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder / "src"


def event_seconds(src: Path, kind: str, n: int, where: str) -> float:
    """Seconds per start+complete pair with the batchtrack source at ``src``, measured in
    a fresh subprocess."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, "-c", _EVENTS, kind, str(n), where],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    return float(out.strip())


def event_against(
    old: Path,
    kind: str,
    where: str,
    *,
    n: int,
    rounds: int,
    name: str,
    goal: float,
    new: Path = ROOT / "src",
) -> Comparison:
    """start+complete with the source at ``new`` (ours: this checkout) vs the source at
    ``old`` (baseline), each in fresh subprocesses, interleaved round by round; passes
    when the ratio <= goal."""
    ours: list[float] = []
    base: list[float] = []
    for i in range(rounds):
        pair = ((new, ours), (old, base)) if i % 2 else ((old, base), (new, ours))
        for src, sink in pair:
            sink.append(event_seconds(src, kind, n, where))
    a, b = statistics.median(ours), statistics.median(base)
    return Comparison(name, a, b, f"<= {goal:g}", a / b <= goal)


def event_with_leases(kind: str, where: str, old: Path, *, n: int, rounds: int) -> Comparison:
    """start+complete with leases (ours) vs 0.1.0 without (baseline), interleaved."""
    name = f"leases: {kind} start+complete, with leases vs 0.1.0 without"
    return event_against(old, kind, where, n=n, rounds=rounds, name=name, goal=1.1)


def _reclaim_store(make: Any, open_batches: int) -> tuple[BatchTracker, FakeClock]:
    """A store with ``open_batches`` batches of 10 items, one of each processing."""
    clock = FakeClock()
    tracker = BatchTracker(make(), clock=clock, lease=1e9, max_attempts=1_000_000)
    for _ in range(open_batches):
        snap = tracker.create_batch([(str(k), "x.jpg") for k in range(10)])
        tracker.start_item(snap.batch_id, "0")
    return tracker, clock


def _time_reclaim(tracker: BatchTracker, clock: FakeClock, lost: int, rounds: int) -> float:
    """Median seconds of reclaim() taking back ``lost`` items (made anew each round)."""
    snap = tracker.create_batch([(str(k), "x.jpg") for k in range(lost)])
    times = []
    for _ in range(rounds):
        for k in range(lost):
            tracker.start_item(snap.batch_id, str(k), lease=1.0)
        clock.advance(2.0)
        start = time.perf_counter()
        moved = tracker.reclaim()
        times.append(time.perf_counter() - start)
        assert moved == lost, (moved, lost)
    return statistics.median(times)


def reclaim_cost(kind: str, make: Any, *, big: int, rounds: int) -> list[Comparison]:
    """reclaim() of 100 lost items among ``big`` open batches vs among 100."""
    large, large_clock = _reclaim_store(make, big)
    small, small_clock = _reclaim_store(make, 100)
    in_large = _time_reclaim(large, large_clock, 100, rounds)
    in_small = _time_reclaim(small, small_clock, 100, rounds)
    more_lost = _time_reclaim(large, large_clock, 1000, max(3, rounds // 3))
    for tracker in (large, small):
        tracker.store.close()
    print(
        f"leases: {kind} reclaim() of 100 lost items: {in_large * 1e3:.2f} ms among {big:,} "
        f"open batches ({big * 10:,} items), {in_small * 1e3:.2f} ms among 100; "
        f"1,000 lost among {big:,}: {more_lost * 1e3:.2f} ms"
    )
    return [
        Comparison(
            f"leases: {kind} reclaim 100 lost, {big:,} vs 100 open batches",
            in_large,
            in_small,
            "<= 1.5",
            in_large / in_small <= 1.5,
        ),
        Comparison(
            f"leases: {kind} reclaim 1,000 vs 100 lost ({big:,} open batches)",
            more_lost,
            in_large,
            "figure",
            True,
        ),
    ]


def run(quick: bool = False) -> list[Comparison]:
    """The leases issue's figures."""
    results: list[Comparison] = []
    n = 300 if quick else 1500
    rounds = 4 if quick else 10
    big = 1000 if quick else 10_000
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        old = baseline_tree(folder / "baseline")
        redis_url = None
        proc = None
        if shutil.which("redis-server"):
            from conftest import start_redis  # the same real server the tests use

            proc, port = start_redis(folder)
            redis_url = f"redis://127.0.0.1:{port}/0"
        try:
            made = iter(range(1_000_000))

            def sqlite_store() -> Store:
                return SQLiteStore(folder / f"reclaim{next(made)}.db")

            makers: list[tuple[str, Any, str]] = [
                ("memory", MemoryStore, ""),
                ("sqlite", sqlite_store, str(folder)),
            ]
            if redis_url is not None:
                from batchtrack.stores.redis import RedisStore

                def redis_store() -> Store:
                    return RedisStore(redis_url, prefix=f"bench{next(made)}:")

                makers.append(("redis", redis_store, redis_url))
            else:
                print("leases: redis-server is not installed; Redis figures skipped")
            for kind, make, where in makers:
                if old is None:
                    print("leases: not in a git clone; the comparison with 0.1.0 is skipped")
                else:
                    results.append(event_with_leases(kind, where, old, n=n, rounds=rounds))
                results.extend(reclaim_cost(kind, make, big=big, rounds=rounds))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
    return results
