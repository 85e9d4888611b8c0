"""Redis benchmark: an event on RedisStore vs one redis-py SET round trip, same server."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from batchtrack.stores.redis import RedisStore
from bench_core import orchestrator_vs_pool, tracker_events
from harness import Comparison, compare

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def _server(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    from conftest import start_redis  # the same real server the tests use

    proc, port = start_redis(folder)
    return proc, f"redis://127.0.0.1:{port}/0"


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
            setup, ours = tracker_events(lambda: store, n)
            ids = [str(i) for i in range(n)]

            def baseline() -> None:
                for i in ids:
                    client.set(f"bench:{i}", "processing")
                    client.set(f"bench:{i}", "completed")

            result = compare(
                "redis: start+complete event vs redis-py SET round trip",
                ours,
                baseline,
                goal=1.5,
                setup=setup,
                rounds=7,
            )
            per_event = result.ours / (2 * n)
            per_set = result.baseline / (2 * n)
            print(
                f"redis: one event costs {per_event * 1e3:.3f} ms, one SET {per_set * 1e3:.3f} ms "
                "(Celery's store_result is ~3x a SET, RQ's save_meta ~1x, by their own code paths)"
            )
            pool = orchestrator_vs_pool(
                lambda: store, "redis", goal=1 / 0.06, n=500 if quick else 2000
            )
            store.close()
            client.close()
            time.sleep(0)
            return [result, pool]
        finally:
            proc.terminate()
            proc.wait(10)
