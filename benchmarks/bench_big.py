"""Big batches: what a poll of a 100,000-item batch costs when it asks only for a page or
for what changed, what creating such a batch costs, and what the change index adds to a
transition.

1. A ``since`` poll of a 100,000-item batch in which 100 items changed, against a full
   poll of a 100-item batch: ``tracker.get`` plus the JSON body, as the status endpoint
   does it. Goal: <= 3x (memory, SQLite; Redis reported).
2. A page of 100 items (``limit=100, after=...`` from the middle) of the same batch,
   against the same full poll of 100 items. Goal: <= 3x.
3. Creating a 100,000-item batch, against writing the same rows the plainest way the
   store allows: a bare ``executemany`` in one transaction (SQLite), a list of the same
   snapshots (memory), pipelined ``HSET`` chunks (Redis). Absolute times are printed
   too (goals: memory <= 0.5 s, SQLite <= 2 s on a 2-core machine).
4. A start+complete event with the change index (this checkout) against the commit
   before it, in fresh subprocesses, interleaved. Goal: <= 1.1.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchtrack import BatchTracker, ItemSnapshot, MemoryStore, SQLiteStore
from batchtrack.stores.base import Store
from bench_leases import ROOT, baseline_tree, event_against
from harness import Comparison, compare

sys.path.insert(0, str(ROOT / "tests"))

BEFORE = "57fb6be"
"""The last commit before the change index: a transition's cost without it."""


def _poll(tracker: BatchTracker, batch_id: str, **conditions: Any) -> Callable[[], object]:
    """One status poll as the endpoint serves it: the snapshot and its JSON body."""

    def poll() -> object:
        snap = tracker.get(batch_id, **conditions)
        return json.dumps(snap.to_dict(), separators=(",", ":"), ensure_ascii=False)

    return poll


def polls(kind: str, make: Callable[[], Store], *, big: int, rounds: int) -> list[Comparison]:
    """A since poll and a page of a ``big`` batch vs a full poll of 100 items."""
    tracker = BatchTracker(make())
    large = tracker.create_batch([(f"{k:06d}", f"{k}.jpg") for k in range(big)]).batch_id
    version = tracker.get(large, items=False).version
    step = big // 100
    for k in range(0, big, step):
        tracker.start_item(large, f"{k:06d}")  # 100 items changed since `version`
    small = tracker.create_batch([f"{k}.jpg" for k in range(100)]).batch_id
    full_small = _poll(tracker, small)
    middle = f"{big // 2:06d}"
    assert len(tracker.get(large, since=version).items) == 100
    results = [
        compare(
            f"big: {kind} since-poll of {big:,} items (100 changed) vs full poll of 100",
            _poll(tracker, large, since=version),
            full_small,
            goal=3.0,
            rounds=rounds,
        ),
        compare(
            f"big: {kind} page of 100 of {big:,} items vs full poll of 100",
            _poll(tracker, large, limit=100, after=middle),
            full_small,
            goal=3.0,
            rounds=rounds,
        ),
    ]
    tracker.store.close()
    return results


def _rows(n: int) -> list[ItemSnapshot]:
    return [ItemSnapshot(f"{k:06d}", f"{k}.jpg") for k in range(n)]


def creation(kind: str, make: Callable[[], Store], folder: Path, n: int) -> Comparison:
    """create_batch of ``n`` items vs the store's plainest bulk write of the same rows."""
    specs = [(f"{k:06d}", f"{k}.jpg") for k in range(n)]
    made = iter(range(1_000_000))
    stores: list[Store] = []

    def ours() -> None:
        store = make()
        stores.append(store)
        BatchTracker(store).create_batch(specs)

    if kind == "sqlite":

        def baseline() -> None:
            db = sqlite3.connect(folder / f"bare{next(made)}.db", isolation_level=None)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute(
                "CREATE TABLE items (batch_key INTEGER, position INTEGER, item_id TEXT,"
                " filename TEXT, status INTEGER, error TEXT, changed_at REAL,"
                " PRIMARY KEY (batch_key, position)) WITHOUT ROWID"
            )
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO items VALUES (1, ?, ?, ?, 0, NULL, 0.0)",
                ((k, i, f) for k, (i, f) in enumerate(specs)),
            )
            db.execute("COMMIT")
            db.close()

        what = "a bare executemany of the rows"
    elif kind == "redis":
        store = make()
        client = store._client  # type: ignore[attr-defined]

        def baseline() -> None:
            key = f"bare{next(made)}"
            with client.pipeline(transaction=False) as pipe:
                for first in range(0, n, 1000):
                    chunk = specs[first : first + 1000]
                    pipe.hset(
                        key,
                        mapping={i: json.dumps({"f": f, "s": 0}) for i, f in chunk},
                    )
                pipe.execute()

        what = "pipelined HSET of the rows"
    else:

        def baseline() -> None:
            _rows(n)

        what = "building the item snapshots"
    result = compare(
        f"big: {kind} create a {n:,}-item batch vs {what}", ours, baseline, goal=1e9, rounds=5
    )
    for store in stores:
        store.close()
    print(f"big: {kind} create of {n:,} items: {result.ours:.3f} s (median of 5)")
    return Comparison(result.name, result.ours, result.baseline, "figure", True)


def run(quick: bool = False) -> list[Comparison]:
    """The big-batches issue's figures."""
    big = 20_000 if quick else 100_000
    rounds = 5 if quick else 15
    results: list[Comparison] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        old = baseline_tree(folder / "before", BEFORE)
        made = iter(range(1_000_000))
        proc = None
        makers: list[tuple[str, Callable[[], Store], str]] = [
            ("memory", MemoryStore, ""),
            ("sqlite", lambda: SQLiteStore(folder / f"big{next(made)}.db"), str(folder)),
        ]
        if shutil.which("redis-server"):
            from batchtrack.stores.redis import RedisStore
            from conftest import start_redis

            proc, port = start_redis(folder)
            url = f"redis://127.0.0.1:{port}/0"
            makers.append(("redis", lambda: RedisStore(url, prefix=f"big{next(made)}:"), url))
        else:
            print("big: redis-server is not installed; Redis figures skipped")
        try:
            for kind, make, where in makers:
                results.extend(polls(kind, make, big=big, rounds=rounds))
                results.append(creation(kind, make, folder, big))
                if old is None:
                    print("big: not in a git clone; the transition comparison is skipped")
                    continue
                results.append(
                    event_against(
                        old,
                        kind,
                        where,
                        n=300 if quick else 1500,
                        rounds=4 if quick else 10,
                        name=f"big: {kind} start+complete, with change index vs before",
                        goal=1.1,
                    )
                )
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
    return results
