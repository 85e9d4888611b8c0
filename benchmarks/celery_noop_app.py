"""A Celery app with one no-op task, for the Redis suite's group comparison.

The worker (``celery -A celery_noop_app worker``, started by ``bench_redis.py``) and the
benchmark read the broker and result backend from ``BENCH_REDIS_URL``: the same Redis the
RedisStore benchmarks use.
"""

from __future__ import annotations

import os

from celery import Celery

_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("bench_noop", broker=_URL, backend=_URL)
app.conf.update(result_expires=600, worker_hijack_root_logger=False, broker_pool_limit=16)


@app.task(name="bench.noop")
def noop(i: int) -> None:
    """Does nothing: what is measured is the tracking."""
    return None
