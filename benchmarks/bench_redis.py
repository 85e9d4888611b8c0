"""Redis benchmark: an event on RedisStore vs one redis-py SET round trip, same server."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batchtrack.stores.redis import RedisStore
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
            with celery_worker(url) as noop:
                if noop is not None:
                    results.append(
                        celery_group_vs_orchestrator(noop, store, 200 if quick else 2000)
                    )
            store.close()
            client.close()
            time.sleep(0)
            return results
        finally:
            proc.terminate()
            proc.wait(10)


def events(n: int = 1500) -> None:
    """Only the event comparison: ``python benchmarks/bench_redis.py events``."""
    import redis

    with tempfile.TemporaryDirectory() as tmp:
        proc, url = _server(Path(tmp))
        try:
            store = RedisStore(url)
            client = redis.Redis.from_url(url)
            print(event_vs_sets(store, client, n).line())
            store.close()
            client.close()
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    if sys.argv[1:] == ["events"]:
        events()
    else:
        for line in run("--quick" in sys.argv):
            print(line.line())
