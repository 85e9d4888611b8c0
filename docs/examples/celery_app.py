"""Batches on Celery workers: the one module that the web tier and the workers both import.

Workers::

    celery -A celery_app worker --concurrency 4

Web tier: ``uvicorn --factory celery_app:web_app`` (see ``web_app`` below).

Both read from the environment:

- ``REDIS_URL``: Celery's broker, and the tracker's store unless ``STORE_URL`` names
  another (``postgresql://...``: :func:`batchtrack.stores.from_url`);
- ``FILES_URL``: where uploads and results live, for every machine: ``s3://bucket/prefix``
  (endpoint and credentials from ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``), or a folder that every machine mounts
  (default: ``./batchtrack-data``, for trying it on one machine);
- ``BATCH_TTL``: seconds a finished batch (and its results) stays (default: an hour).
"""

from __future__ import annotations

import os

from celery import Celery

from batchtrack import BatchTracker
from batchtrack.celery import CeleryRunner, tracked_task
from batchtrack.files import from_url
from batchtrack.imaging import ImagePipeline
from batchtrack.stores import from_url as store_from_url

REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
files = from_url(os.environ.get("FILES_URL", "batchtrack-data"))

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
tracker = BatchTracker(
    store_from_url(os.environ.get("STORE_URL", REDIS_URL)),
    lease=60.0,
    ttl=float(os.environ.get("BATCH_TTL", 3600)),
)

# Results go to results/<item id>.<ext> in the shared storage; a worker reads each
# item's upload from the location stored with it (uploads/<id> in the same storage).
pipeline = ImagePipeline(files, prefix="results/", max_size=1024)
# A batch's results go with it when it is deleted or expires.
tracker.add_removal_hook(pipeline.remove_results)

process_image = tracked_task(
    app,
    tracker,
    pipeline,
    name="myapp.process_image",
    max_retries=3,
    retry_backoff=1.0,
)

runner = CeleryRunner(tracker, process_image)


def web_app() -> object:
    """The ASGI app of the web tier: the batchtrack API over the Celery runner.

    Each web process also sweeps: batches that expired are removed with their results,
    lost items are taken back, and a batch whose messages were lost is sent again.
    Session cookies are signed with ``BATCHTRACK_SECRET``, the same on every web process,
    so that each honours the sessions the others issued.
    """
    from batchtrack.asgi import create_app
    from batchtrack.uploads import UploadStore

    runner.start_sweeper(interval=min(60.0, tracker.ttl))
    return create_app(
        tracker,
        runner,
        UploadStore(files, prefix="uploads/"),
        session_secret=os.environ.get("BATCHTRACK_SECRET"),
    )
