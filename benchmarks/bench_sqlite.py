"""SQLite store benchmarks: an event vs a bare UPDATE + COMMIT, O(1) counts, snapshots."""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

from batchtrack import MemoryStore, SQLiteStore
from bench_core import counts_read, orchestrator_vs_pool, snapshot_json, tracker_events
from harness import Comparison, compare


def event_vs_update_commit(folder: Path, *, n: int) -> tuple[Comparison, float]:
    """start+complete through SQLiteStore vs two bare UPDATE+COMMITs per item, same settings."""
    ids = [str(i) for i in range(n)]
    store = SQLiteStore(folder / "events.db")
    setup_ours, ours = tracker_events(lambda: store, n)
    base = sqlite3.connect(folder / "baseline.db", isolation_level=None)
    base.execute("PRAGMA journal_mode = WAL")
    base.execute("PRAGMA synchronous = NORMAL")
    base.execute("CREATE TABLE items (id TEXT PRIMARY KEY, status TEXT NOT NULL)")

    def setup() -> None:
        setup_ours()
        base.execute("DELETE FROM items")
        base.executemany("INSERT INTO items VALUES (?, 'pending')", ((i,) for i in ids))

    def baseline() -> None:
        for i in ids:
            for status in ("processing", "completed"):
                base.execute("BEGIN")
                base.execute("UPDATE items SET status = ? WHERE id = ?", (status, i))
                base.execute("COMMIT")

    result = compare(
        "sqlite: start+complete event vs UPDATE+COMMIT (WAL, NORMAL)",
        ours,
        baseline,
        goal=2.0,
        setup=setup,
        rounds=7,
    )
    store.close()
    base.close()
    per_event = result.ours / (2 * n)
    return result, per_event


def run(quick: bool = False) -> list[Comparison]:
    """The SQLite issue's figures."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        made = iter(range(1_000_000))

        def sqlite_store() -> SQLiteStore:
            return SQLiteStore(folder / f"s{next(made)}.db")

        event, per_event = event_vs_update_commit(folder, n=200 if quick else 1000)
        results = [
            event,
            counts_read(sqlite_store, "sqlite", reads=500),
            orchestrator_vs_pool(sqlite_store, "sqlite", goal=1 / 0.15, n=500 if quick else 2000),
        ]
        sq, sqlite_snapshot = snapshot_json(sqlite_store, "sqlite", goal=99)
        del sq
        _, memory_snapshot = snapshot_json(MemoryStore, "memory", goal=99)
        results.append(
            compare(
                "sqlite vs memory: snapshot + json.dumps, 10,000 items",
                sqlite_snapshot,
                memory_snapshot,
                goal=2.0,
            )
        )
    print(
        f"sqlite: one event costs {per_event * 1e3:.3f} ms here; a Redis round trip as "
        "Celery/RQ use it costs ~0.2-0.5 ms on this class of machine (documented figure)"
    )
    return results
