"""Batches on Celery workers: the one module that the web tier and the workers both import.

Workers::

    celery -A celery_app worker --concurrency 4

Web tier: ``create_app(tracker, runner, uploads)`` (see ``web_app`` below).

Both read ``REDIS_URL`` (broker and store) and ``DATA_DIR`` (uploads and results, on
storage that every machine sees) from the environment.
"""

from __future__ import annotations

import os
from pathlib import Path

from celery import Celery

from batchtrack import BatchTracker
from batchtrack.celery import CeleryRunner, tracked_task
from batchtrack.imaging import ImagePipeline
from batchtrack.stores.redis import RedisStore

REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
DATA_DIR = Path(os.environ.get("DATA_DIR", "/srv/myapp"))
(DATA_DIR / "results").mkdir(parents=True, exist_ok=True)

app = Celery("myapp", broker=REDIS_URL)
app.conf.update(
    broker_transport_options={
        # Redis hands a message that was not acknowledged within this many seconds to
        # another worker: that is how the message of a worker that died comes back.
        # Keep it above the longest item plus the longest retry wait (60 s), or items
        # that are merely slow run twice.
        "visibility_timeout": 15 * 60,
    },
    # A worker takes no more messages than it has processes: the rest stay in the
    # queue for the other workers, not stuck behind a slow item.
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)

# Workers heartbeat every third of the lease; an item whose worker is silent for a
# whole lease is lost, and tracker.reclaim() may hand it out again.
tracker = BatchTracker(RedisStore(REDIS_URL), lease=60.0)

process_image = tracked_task(
    app,
    tracker,
    ImagePipeline(DATA_DIR / "results", max_size=1024),
    name="myapp.process_image",
    max_retries=3,
    retry_backoff=1.0,
)

runner = CeleryRunner(tracker, process_image)


def web_app() -> object:
    """The ASGI app of the web tier: the batchtrack API over the Celery runner."""
    from batchtrack.asgi import create_app
    from batchtrack.uploads import UploadStore

    return create_app(tracker, runner, UploadStore(DATA_DIR / "uploads"))
