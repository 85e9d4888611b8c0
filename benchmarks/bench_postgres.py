"""PostgreSQL benchmarks, on one real server with its shipped settings (fsync on):

1. An event (start or complete through BatchTracker) on PostgresStore against a bare
   ``UPDATE ... ; COMMIT`` of one row through psycopg on the same server, two per item,
   interleaved. Goal: an event at least half as fast (ratio of times <= 2).
2. Reading the counts of a 100,000-item batch vs a 10-item batch. Goal: <= 1.2.
3. A 10,000-item status read (``tracker.get`` + ``json.dumps`` of the body) against a
   bare ``SELECT`` of the same rows + ``json.dumps`` of them as dicts. Goal: <= 2.
4. Creating a 100,000-item batch against a bare ``COPY`` of the same rows into a table
   with the same primary key, in one transaction; the goal is the time itself: <= 2 s.
5. A batch of 2,000 no-op items through an ``Orchestrator(concurrency=8)`` against a bare
   ``ThreadPoolExecutor(8).map`` (``orchestrator_vs_pool``, as for SQLite and Redis).
   Goal: >= 0.06x the pool's speed, Redis's (the other store on a server).
   ``python benchmarks/bench_postgres.py orchestrator`` runs this one alone.
"""

from __future__ import annotations

import json
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from bench_core import counts_read, half_done_batch, orchestrator_vs_pool, tracker_events
from harness import Comparison, compare

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def _prefix() -> str:
    return f"b{uuid.uuid4().hex[:12]}_"


def event_vs_update_commit(url: str, n: int) -> tuple[Comparison, float, float]:
    """start+complete per item through the tracker vs two bare UPDATE+COMMITs per item."""
    import psycopg

    from batchtrack.stores.postgres import PostgresStore

    store = PostgresStore(url, table_prefix=_prefix())
    setup_ours, ours = tracker_events(lambda: store, n)
    ids = [str(i) for i in range(n)]
    base = psycopg.connect(url)  # a transaction per statement until commit(), as apps do
    base.execute("CREATE TABLE bench_items (id text PRIMARY KEY, status text NOT NULL)")
    base.commit()

    def setup() -> None:
        setup_ours()
        base.execute("TRUNCATE bench_items")
        with base.cursor() as cursor, cursor.copy("COPY bench_items FROM STDIN") as copy:
            for i in ids:
                copy.write_row((i, "pending"))
        base.commit()

    def baseline() -> None:
        for i in ids:
            for status in ("processing", "completed"):
                base.execute("UPDATE bench_items SET status = %s WHERE id = %s", (status, i))
                base.commit()

    result = compare(
        "postgres: start+complete event vs UPDATE+COMMIT (same server)",
        ours,
        baseline,
        goal=2.0,
        setup=setup,
        rounds=7,
    )
    base.execute("DROP TABLE bench_items")
    base.commit()
    base.close()
    store.close()
    return result, result.ours / (2 * n), result.baseline / (2 * n)


def status_read(url: str, n: int) -> Comparison:
    """tracker.get + json.dumps of an n-item batch vs a bare SELECT of its rows + dumps."""
    import psycopg

    from batchtrack.stores.postgres import PostgresStore

    prefix = _prefix()
    store = PostgresStore(url, table_prefix=prefix)
    tracker, snap = half_done_batch(store, n)
    bare = psycopg.connect(url, autocommit=True)
    query = (
        f"SELECT i.item_id, i.filename, i.status, i.error FROM {prefix}items i"
        f" JOIN {prefix}batches b ON b.key = i.batch_key WHERE b.batch_id = %s"
        " ORDER BY i.position"
    )
    names = ("pending", "processing", "completed", "failed")

    def ours() -> None:
        json.dumps(tracker.get(snap.batch_id).to_dict())

    def baseline() -> None:
        rows: list[Any] = bare.execute(query, (snap.batch_id,)).fetchall()
        images = [
            {"id": i, "filename": f, "status": names[s], **({"error": e} if e else {})}
            for i, f, s, e in rows
        ]
        json.dumps({"batchId": snap.batch_id, "images": images})

    result = compare(
        f"postgres: status read of {n:,} items vs bare SELECT + json.dumps",
        ours,
        baseline,
        goal=2.0,
    )
    bare.close()
    store.close()
    return result


def creation(url: str, n: int) -> Comparison:
    """create_batch of n items vs a bare COPY of the same rows into a keyed table."""
    import psycopg

    from batchtrack import BatchTracker
    from batchtrack.stores.postgres import PostgresStore

    store = PostgresStore(url, table_prefix=_prefix())
    tracker = BatchTracker(store)
    specs = [(f"{k:06d}", f"{k}.jpg") for k in range(n)]
    bare = psycopg.connect(url)
    bare.execute(
        "CREATE TABLE bench_bulk (batch_key bigint, position integer, item_id text,"
        " filename text, status smallint, PRIMARY KEY (batch_key, position))"
    )
    bare.commit()
    made = iter(range(1_000_000))

    def ours() -> None:
        tracker.create_batch(specs)

    def baseline() -> None:
        key = next(made)
        with bare.cursor() as cursor, cursor.copy("COPY bench_bulk FROM STDIN") as copy:
            for position, (item_id, filename) in enumerate(specs):
                copy.write_row((key, position, item_id, filename, 0))
        bare.commit()

    result = compare(
        f"postgres: create a {n:,}-item batch vs a bare COPY of the rows",
        ours,
        baseline,
        goal=1e9,
        rounds=5,
    )
    print(
        f"postgres: create of {n:,} items: {result.ours:.3f} s, bare COPY "
        f"{result.baseline:.3f} s (medians of 5)"
    )
    # The goal is the time itself, as for SQLite: at most 2 s on a 2-core machine.
    result = Comparison(result.name, result.ours, result.baseline, "<= 2 s", result.ours <= 2.0)
    bare.execute("DROP TABLE bench_bulk")
    bare.commit()
    bare.close()
    store.close()
    return result


def run(quick: bool = False, only: str | None = None) -> list[Comparison]:
    """The PostgreSQL issue's figures (``only="orchestrator"``: just the orchestrator's)."""
    from conftest import _postgres_bin, start_postgres  # the same real server the tests use

    try:
        import psycopg  # noqa: F401

        from batchtrack.stores.postgres import PostgresStore
    except ImportError:
        print("postgres: psycopg is not installed (pip install 'batchtrack[postgres]'); skipped")
        return []
    if _postgres_bin() is None:
        print("postgres: the PostgreSQL server is not installed; skipped")
        return []
    with tempfile.TemporaryDirectory() as tmp:
        server = start_postgres(Path(tmp), options=())
        url = server.dsn()
        try:
            orchestrator = orchestrator_vs_pool(
                lambda: PostgresStore(url, table_prefix=_prefix()),
                "postgres",
                goal=1 / 0.06,
                n=500 if quick else 2000,
            )
            if only == "orchestrator":
                return [orchestrator]
            event, per_event, per_update = event_vs_update_commit(url, 200 if quick else 1000)
            print(
                f"postgres: one event costs {per_event * 1e3:.3f} ms, one UPDATE+COMMIT "
                f"{per_update * 1e3:.3f} ms here"
            )
            results = [
                event,
                counts_read(
                    lambda: PostgresStore(url, table_prefix=_prefix()), "postgres", reads=500
                ),
                status_read(url, 10_000),
                creation(url, 20_000 if quick else 100_000),
                orchestrator,
            ]
        finally:
            server.stop()
    return results


if __name__ == "__main__":  # python benchmarks/bench_postgres.py [--quick] [orchestrator]
    for line in run("--quick" in sys.argv, "orchestrator" if "orchestrator" in sys.argv else None):
        print(line.line())
