"""The Celery workers of tests/test_time_limits.py: the test worker app, plus a task with a
time limit of 1 s.

``tests.timed`` reads instructions from the item's source file: ``"ok <seconds>"`` sleeps
that long (Celery's soft time limit interrupts the sleep), ``"stubborn <seconds>"`` sleeps
that long and ignores the soft limit (so only the hard limit stops it). Each logs
``start``/``done`` lines like ``tests.record`` (see ``celery_worker_app``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

from batchtrack import Item
from batchtrack.celery import tracked_task
from celery_worker_app import LEASE, app, log_line, tracker

TIMED_TASK = "tests.timed"
TIME_LIMIT = 1


def timed(item: Item) -> None:
    """Sleep as the item's source file says, ignoring the soft limit when told to."""
    out = Path(os.environ["BATCHTRACK_TEST_OUT"])
    action, seconds = Path(str(item.source)).read_text().split()
    log_line(out, f"start {item.id} {os.getpgrp()}")
    end = time.monotonic() + float(seconds)
    while time.monotonic() < end:
        try:
            time.sleep(max(0.0, end - time.monotonic()))
        except SoftTimeLimitExceeded:
            if action != "stubborn":
                raise
    log_line(out, f"done {item.id} {os.getpgrp()}")


timed_task = tracked_task(
    app,
    tracker,
    timed,
    name=TIMED_TASK,
    max_retries=1,
    retry_backoff=0.2,
    lease=LEASE,
    time_limit=TIME_LIMIT,
)
