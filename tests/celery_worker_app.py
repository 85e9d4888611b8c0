"""The Celery workers of tests/test_celery.py: the docs example, plus a recording task.

Workers run ``celery -A celery_worker_app worker`` with ``docs/examples`` and ``tests`` on
``PYTHONPATH``, so they serve exactly the app, the configuration and the
``myapp.process_image`` task of ``docs/examples/celery_app.py``. On top of that:

- test timings: a message of a dead worker comes back after 4 s, not 15 minutes;
- ``tests.record``, a tracked task whose processor reads instructions from the item's
  source file (``"ok <seconds>"`` or ``"fail <seconds>"``), writes
  ``<out>/results/<item id>.txt`` atomically and logs ``start``/``done`` lines (with the
  worker's process group) to ``<out>/log.txt``.

``BATCHTRACK_TEST_OUT`` names ``<out>``; the example reads ``REDIS_URL`` and ``DATA_DIR``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from celery_app import app, tracker

from batchtrack import Item
from batchtrack.celery import tracked_task

RECORD_TASK = "tests.record"
VISIBILITY_TIMEOUT = 4
LEASE = 2.0

app.conf.broker_transport_options = {
    **app.conf.broker_transport_options,
    "visibility_timeout": VISIBILITY_TIMEOUT,
    # Look for messages to restore every second (kombu's default: every 100 s).
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
    # A worker killed while it held the restore lock must not block restores for long.
    "unacked_mutex_expire": 10,
}


def log_line(out: Path, text: str) -> None:
    """Append one line to the log; one O_APPEND write, so lines never interleave."""
    fd = os.open(out / "log.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{text}\n".encode())
    finally:
        os.close(fd)


def record(item: Item) -> None:
    """Follow the instructions in the item's source file; write its result atomically."""
    out = Path(os.environ["BATCHTRACK_TEST_OUT"])
    action, seconds = Path(item.source).read_text().split()
    log_line(out, f"start {item.id} {os.getpgrp()}")
    time.sleep(float(seconds))
    if action == "fail":
        raise RuntimeError("injected failure")
    fd, tmp = tempfile.mkstemp(dir=out / "tmp")
    with os.fdopen(fd, "w") as result:
        result.write(f"{item.filename}\n")
    os.replace(tmp, out / "results" / f"{item.id}.txt")
    log_line(out, f"done {item.id} {os.getpgrp()}")


record_task = tracked_task(
    app, tracker, record, name=RECORD_TASK, max_retries=1, retry_backoff=0.2, lease=LEASE
)
