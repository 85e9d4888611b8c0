"""Redis benchmarks, all on one redis-server: an event on RedisStore vs one redis-py SET
round trip; the orchestrator vs a bare pool and vs a Celery group; and the Celery peers
(an event vs ``Task.update_state``, a 1,000-item batch's read vs
``GroupResult.completed_count``).

``python benchmarks/bench_redis.py [--quick]`` runs them all (as ``run.py redis`` does);
``... events`` only the event vs SETs (and what any scripted event costs), ``... peers
[--quick]`` only the Celery peers.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batchtrack.stores.redis import _GET_ARGS, RedisStore
from bench_core import orchestrator_vs_pool, tracker_events
from harness import Comparison, compare

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def _server(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    from conftest import start_redis  # the same real server the tests use

    proc, port = start_redis(folder)
    return proc, f"redis://127.0.0.1:{port}/0"


@contextlib.contextmanager
def celery_worker(url: str) -> Iterator[Any]:
    """A real ``celery worker`` (8 threads) of ``celery_noop_app`` on the Redis at ``url``,
    its broker and result backend; yields the app's ``noop`` task once the worker answers
    a ping and has run a small group, or None (with a note) when Celery is not installed
    or the worker does not start. The worker is stopped by its pid on the way out."""
    try:
        import celery  # noqa: F401
    except ImportError:
        print("redis: celery is not installed; the Celery comparisons are skipped")
        yield None
        return
    import os

    here = Path(__file__).resolve().parent
    env = {**os.environ, "BENCH_REDIS_URL": url, "PYTHONPATH": str(here)}
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "celery_noop_app",
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            "8",
            "--loglevel",
            "WARNING",
        ],
        cwd=here,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ["BENCH_REDIS_URL"] = url
    sys.path.insert(0, str(here))
    from celery import group

    from celery_noop_app import app, noop

    try:
        deadline = time.monotonic() + 60
        started = True
        while not app.control.ping(timeout=1.0):
            if time.monotonic() > deadline or worker.poll() is not None:
                print("redis: the Celery worker did not start; the Celery comparisons are skipped")
                started = False
                break
        if started:
            group(noop.s(i) for i in range(20)).apply_async().get(timeout=60)
        yield noop if started else None
    finally:
        worker.terminate()
        worker.wait(30)


def celery_group_vs_orchestrator(noop: Any, store: RedisStore, n: int) -> Comparison:
    """A Celery group of ``n`` no-op tasks on the worker of :func:`celery_worker` (8
    threads), its results in the same Redis (``group(...).apply_async().get()``), vs an
    Orchestrator(8) running ``n`` no-op items tracked in a RedisStore on it. Goal: ours
    10x faster (ratio <= 0.1)."""
    from celery import group

    from batchtrack import BatchTracker, Item, Orchestrator

    tracker = BatchTracker(store)
    orch = Orchestrator(tracker, lambda item: None, concurrency=8)
    items = [Item(f"{i}.jpg") for i in range(n)]

    def ours() -> None:
        orch.run(items)

    def baseline() -> None:
        group(noop.s(i) for i in range(n)).apply_async().get(timeout=600)

    try:
        return compare(
            "redis: Orchestrator(8) of no-op items vs a Celery group (8 threads)",
            ours,
            baseline,
            goal=0.1,
            rounds=5,
        )
    finally:
        orch.close()


def event_vs_sets(store: RedisStore, client: Any, n: int) -> Comparison:
    """A start and a completion through the tracker vs two plain SETs (issue 27, point 4:
    goal ours <= 1.3x)."""
    setup, ours = tracker_events(lambda: store, n)
    ids = [str(i) for i in range(n)]

    def baseline() -> None:
        for i in ids:
            client.set(f"bench:{i}", "processing")
            client.set(f"bench:{i}", "completed")

    result = compare(
        "redis: start+complete event vs two redis-py SETs",
        ours,
        baseline,
        goal=1.3,
        setup=setup,
        rounds=7,
    )
    per_event = result.ours / (2 * n)
    per_set = result.baseline / (2 * n)
    # Once more each, for the server's own time per call (creating a batch apart).
    setup()
    client.config_resetstat()
    ours()
    server = client.info("commandstats").get("cmdstat_evalsha", {}).get("usec_per_call")
    client.config_resetstat()
    baseline()
    server_set = client.info("commandstats").get("cmdstat_set", {}).get("usec_per_call")
    print(
        f"redis: one event costs {per_event * 1e6:.1f} µs, one SET {per_set * 1e6:.1f} µs; "
        f"on the server (INFO commandstats) a script call {server:.1f} µs, a SET "
        f"{server_set:.2f} µs"
    )
    return result


def event_vs_update_state(store: RedisStore, url: str, n: int) -> Comparison | None:
    """A start and a completion through the tracker vs Celery's way to report a task's
    progress on the same Redis: ``Task.update_state(task_id=..., state=..., meta=...)``
    twice per item (PROGRESS with celery-progress's meta, then SUCCESS with the last
    one), each a fresh task id per round as each new task has. Issue 27, point 5: goal
    ours <= 1.0x."""
    try:
        from celery import Celery
    except ImportError:
        print("redis: celery is not installed; the update_state comparison is skipped")
        return None
    # No worker: update_state with an explicit task_id writes to the result backend
    # itself (a GET of the task's meta, then SETEX + PUBLISH in one pipeline).
    app = Celery("bench_update_state", broker=url, backend=url, set_as_current=False)

    @app.task(name="bench.progress", bind=True)
    def step(self: Any, i: int) -> None:  # never run: only its update_state is called
        return None

    setup_ours, ours = tracker_events(lambda: store, n)
    ids: list[str] = []
    rounds = itertools.count()

    def setup() -> None:
        setup_ours()
        k = next(rounds)
        ids[:] = [f"bench-{k}-{i}" for i in range(n)]

    def baseline() -> None:
        for task_id in ids:
            step.update_state(task_id=task_id, state="PROGRESS", meta=_STARTED)
            step.update_state(task_id=task_id, state="SUCCESS", meta=_DONE)

    try:
        return compare(
            "redis: start+complete event vs two Celery update_state",
            ours,
            baseline,
            goal=1.0,
            setup=setup,
            rounds=7,
        )
    finally:
        app.close()


# What celery-progress's ProgressRecorder.set_progress stores for a step of one item.
_STARTED = {"pending": False, "current": 0, "total": 1, "percent": 0.0, "description": ""}
_DONE = {"pending": False, "current": 1, "total": 1, "percent": 100.0, "description": ""}


def group_read_vs_get(noop: Any, store: RedisStore, n: int) -> list[Comparison]:
    """A progress read of a finished ``n``-task batch, as a web view polling it makes one:
    Celery's ``GroupResult.restore(group_id).completed_count()`` (the group saved once,
    as ``celery_progress``'s group view restores it; Celery's default result cache is
    off, so each read fetches every task's meta) vs ``tracker.get(batch_id)`` (the whole
    status with all ``n`` items, counts and ETA) and ``tracker.get(batch_id,
    items=False)`` (counts, status and ETA, what ``completed_count`` answers) on a
    RedisStore in the same Redis. Both sides keep what a web host keeps between polls:
    the Celery app and its backend's connections, one BatchTracker. Issue 27, point 5:
    goal ours <= 0.1x."""
    from celery import group
    from celery.result import GroupResult

    from batchtrack import BatchTracker

    app = noop.app
    finished = group(noop.s(i) for i in range(n)).apply_async()
    finished.get(timeout=600)
    finished.save()
    group_id = finished.id

    tracker = BatchTracker(store)
    ids = [str(i) for i in range(n)]
    batch_id = tracker.create_batch([(i, f"{i}.jpg") for i in ids]).batch_id
    for i in ids:
        tracker.start_item(batch_id, i)
        tracker.complete_item(batch_id, i)

    def celery_read() -> int:
        return int(GroupResult.restore(group_id, app=app).completed_count())

    def full() -> int:
        return tracker.get(batch_id).progress.completed

    def counts() -> int:
        return tracker.get(batch_id, items=False).progress.completed

    for read in (celery_read, full, counts):
        if read() != n:
            raise RuntimeError(f"{read.__name__} does not see the {n} finished tasks")
    return [
        compare(
            f"redis: get, {n:,} items vs Celery group completed_count",
            full,
            celery_read,
            goal=0.1,
            rounds=7,
        ),
        compare(
            f"redis: get(items=False) vs group completed_count, {n:,}",
            counts,
            celery_read,
            goal=0.1,
            rounds=7,
        ),
    ]


def run(quick: bool = False) -> list[Comparison]:
    if shutil.which("redis-server") is None:
        print("redis: redis-server is not installed; skipped")
        return []
    import redis

    n = 300 if quick else 1500
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = _server(Path(tmp))
        try:
            store = RedisStore(url)
            client = redis.Redis.from_url(url)
            result = event_vs_sets(store, client, n)
            pool = orchestrator_vs_pool(
                lambda: store, "redis", goal=1 / 0.06, n=500 if quick else 2000
            )
            results = [result, pool]
            peer = event_vs_update_state(store, url, 150 if quick else 750)
            if peer is not None:
                results.append(peer)
            with celery_worker(url) as noop:
                if noop is not None:
                    results.append(
                        celery_group_vs_orchestrator(noop, store, 200 if quick else 2000)
                    )
                    results.extend(group_read_vs_get(noop, store, 200 if quick else 1000))
            store.close()
            client.close()
            time.sleep(0)
            return results
        finally:
            proc.terminate()
            proc.wait(10)


# The least a scripted event can do, for event_floor: read the header and the item, write
# both back, answer the counts and the item (no indexes, lease, stats, TTL or PUBLISH).
_LEAST_EVENT = """
local h = redis.call('HMGET', KEYS[1], 'expires_at', 'version', 'pending', 'processing',
  'completed', 'failed', 'stats', 'paused', 'created_at', 'total')
local item = cjson.decode(redis.call('HGET', KEYS[2], ARGV[1]))
item.s = tonumber(ARGV[3])
item.t = ARGV[2]
local raw = cjson.encode(item)
redis.call('HSET', KEYS[2], ARGV[1], raw)
redis.call('HSET', KEYS[1], 'version', tonumber(h[2]) + 1, 'updated_at', ARGV[2])
return {h[1], h[2], h[3], h[4], h[5], h[6], h[7], raw}
"""


def event_floor(client: Any, n: int) -> list[Comparison]:
    """What any scripted event costs against SETs, sent as RedisStore's event is (a
    connection of the pool's, the command packed by hiredis): an empty script, and the
    least an event that answers the counts can do (:data:`_LEAST_EVENT`). With
    ``event_vs_sets`` this splits the event's cost into what any script costs and what
    pages, changes-since, leases, the ETA's sums and watchers add."""
    from redis.connection import HIREDIS_AVAILABLE

    if not HIREDIS_AVAILABLE:
        print("redis: hiredis is not installed; the event floor is skipped")
        return []
    import hiredis

    client.hset(
        "floor:b",
        mapping={
            "expires_at": "9e12",
            "version": 1,
            "pending": n,
            "processing": 0,
            "completed": 0,
            "failed": 0,
            "stats": "x" * 300,
            "created_at": "1",
            "total": n,
        },
    )
    client.hset("floor:i", mapping={str(i): f'{{"s":0,"t":"1.5","p":{i},"a":0}}' for i in range(n)})
    ids = [str(i) for i in range(n)]
    conn = client.connection_pool.get_connection(*_GET_ARGS)
    results = []
    try:
        for name, body in (("an empty script", "return 1"), ("the least event", _LEAST_EVENT)):
            sha = client.script_load(body)

            def ours(sha: str = sha) -> None:
                for i in ids:
                    for target in ("1", "2"):
                        conn.send_packed_command(
                            [
                                hiredis.pack_command(
                                    (
                                        "EVALSHA",
                                        sha,
                                        2,
                                        "floor:b",
                                        "floor:i",
                                        i,
                                        "12345.678",
                                        target,
                                    )
                                )
                            ]
                        )
                        conn.read_response()

            def baseline() -> None:
                for i in ids:
                    client.set(f"bench:{i}", "processing")
                    client.set(f"bench:{i}", "completed")

            results.append(
                compare(
                    f"redis: {name} (2 calls) vs two redis-py SETs",
                    ours,
                    baseline,
                    goal=1.3,
                    rounds=7,
                )
            )
    finally:
        client.connection_pool.release(conn)
    return results


def events(n: int = 1500) -> None:
    """Only the event comparisons: ``python benchmarks/bench_redis.py events``: the
    event vs SETs, and what any scripted event costs (:func:`event_floor`)."""
    import redis

    with tempfile.TemporaryDirectory() as tmp:
        proc, url = _server(Path(tmp))
        try:
            store = RedisStore(url)
            client = redis.Redis.from_url(url)
            print(event_vs_sets(store, client, n).line())
            for result in event_floor(client, n):
                print(result.line())
            store.close()
            client.close()
        finally:
            proc.terminate()
            proc.wait(10)


def peers(quick: bool = False) -> None:
    """Only the Celery peer comparisons (issue 27, point 5): an event vs
    ``update_state``, a 1,000-item batch's read vs ``GroupResult.completed_count``.
    ``python benchmarks/bench_redis.py peers [--quick]``."""
    if shutil.which("redis-server") is None:
        print("redis: redis-server is not installed; skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = _server(Path(tmp))
        try:
            store = RedisStore(url)
            results = []
            peer = event_vs_update_state(store, url, 150 if quick else 750)
            if peer is not None:
                results.append(peer)
            with celery_worker(url) as noop:
                if noop is not None:
                    results.extend(group_read_vs_get(noop, store, 200 if quick else 1000))
            for result in results:
                print(result.line(), flush=True)
            store.close()
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    if sys.argv[1:] == ["events"]:
        events()
    elif sys.argv[1:2] == ["peers"]:
        peers("--quick" in sys.argv)
    else:
        for line in run("--quick" in sys.argv):
            print(line.line())
