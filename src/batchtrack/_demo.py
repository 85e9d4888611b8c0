"""The demo service of ``batchtrack serve``: the page at ``/`` and the API under ``/api``.

The page is the app's own (``create_app(..., page=True)``), as any integrator can have it.

For tests only, ``BATCHTRACK_TEST_ITEM_DELAY`` delays every image (see ``_test_delay``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from ._models import Item
from ._orchestrator import Orchestrator
from ._paths import DB_NAME
from ._report import report_progress
from ._test_delay import TEST_ITEM_DELAY, item_delay
from ._tracker import BatchTracker
from .asgi import create_app
from .exceptions import BatchtrackError
from .files.base import FileStorage
from .files.results import ResultFiles
from .imaging import ImagePipeline
from .stores.base import Store
from .stores.sqlite import SQLiteStore
from .uploads import UploadStore
from .webhooks import Webhook

__all__ = ["INTERRUPTED", "TEST_ITEM_DELAY", "build", "recover", "resuming", "trim_malloc"]

log = logging.getLogger("batchtrack")

INTERRUPTED = "interrupted"
"""The error of items the server stopped before they started."""


def trim_malloc() -> bool:
    """Give glibc's free heap pages back to the system (``malloc_trim``); whether it could.

    A maintenance round (cleanup of expired uploads, sweep of unfinished results) reads
    thousands of small objects and frees them: without a trim the freed pages stay in the
    process, and its RSS steps up at each round. Does nothing (False) off glibc.
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # pragma: no cover - not glibc after all
        return False
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    malloc_trim(0)
    return True


@attrs.frozen
class _Delayed:
    """The pipeline, each image started ``delay`` seconds late (for tests only)."""

    pipeline: ImagePipeline
    delay: float

    @property
    def results(self) -> ResultFiles:
        return self.pipeline.results

    def __call__(self, item: Item) -> Path | str:
        # The wait reports its progress, as a processor that knows how far it is would.
        for step in range(4):
            report_progress(step / 4, stage="test delay")
            time.sleep(self.delay / 4)
        return self.pipeline(item)


def recover(tracker: BatchTracker, orchestrator: Orchestrator) -> list[str]:
    """Take back lost items and resume every unfinished batch; return the ids resumed.

    What a service does at start (a batch a killed process had started finishes) and
    every so often (items whose worker died go back to pending and run again).
    """
    tracker.reclaim()
    resumed = []
    for batch_id in tracker.open_batches():
        try:
            orchestrator.resume(batch_id)
        except BatchtrackError:  # expired meanwhile, or we are shutting down
            log.debug("batchtrack: could not resume batch %s", batch_id, exc_info=True)
        else:
            resumed.append(batch_id)
    return resumed


def resuming(count: int) -> str:
    """The log line of a service that found unfinished batches at start."""
    return f"batchtrack: resuming {count} unfinished batch{'' if count == 1 else 'es'}"


def build(
    data_dir: Path,
    *,
    concurrency: int = 4,
    lease: float = 60.0,
    max_files: int = 10,
    max_upload_storage: int | None = 2**30,
    upload_quota: int | None = 200 * 2**20,
    store: Store | None = None,
    files: FileStorage | None = None,
    session_secret: str | None = None,
    trusted_origins: Sequence[str] = (),
    metrics: bool = False,
    webhooks: Sequence[Webhook] = (),
) -> tuple[Any, Callable[[], None]]:
    """The demo ASGI app over ``data_dir``, and the function that shuts it down.

    At start it reclaims lost items and resumes every unfinished batch in the database,
    then does so again every ``min(60, lease)`` seconds; running items are heartbeated
    every ``lease / 3`` seconds. A batch holds at most ``max_files`` images (the page
    and the API say so). The uploads folder holds at most ``max_upload_storage``
    bytes (1 GiB), and one client (by IP address) may upload ``upload_quota`` bytes
    (200 MiB) per hour; None lifts either limit.

    Batches live in ``store`` (default: the SQLite file in ``data_dir``); uploads and
    results in ``files`` under ``uploads/`` and ``results/`` (default: those folders of
    ``data_dir``). Processes sharing both serve the same users. Pages of
    ``trusted_origins`` may send state-changing requests with a visitor's cookie.
    With ``metrics`` the app answers ``GET /metrics`` (``create_app(metrics=True)``).
    ``webhooks`` get a signed POST when a batch ends (``create_app(webhooks=...)``).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    if store is None:
        store = SQLiteStore(data_dir / DB_NAME)
    tracker = BatchTracker(store, lease=lease)
    if files is None:
        pipeline = ImagePipeline(data_dir / "results")
        uploads = UploadStore(data_dir / "uploads", max_total_bytes=max_upload_storage)
    else:
        pipeline = ImagePipeline(files, prefix="results/")
        uploads = UploadStore(files, prefix="uploads/", max_total_bytes=max_upload_storage)
    # Results live as long as their batch; writes a crash cut short are swept.
    tracker.add_removal_hook(pipeline.remove_results)
    delay = item_delay()
    processor = _Delayed(pipeline, delay) if delay else pipeline
    orchestrator = Orchestrator(tracker, processor, concurrency=concurrency)
    app = create_app(
        tracker,
        orchestrator,
        uploads,
        max_files=max_files,
        upload_bytes_per_client=upload_quota,
        page=True,
        session_secret=session_secret,
        trusted_origins=trusted_origins,
        metrics=metrics,
        webhooks=webhooks,
    )
    tracker.start_sweeper(interval=600)
    stop = threading.Event()

    def every(
        interval: float, task: Callable[[], object], what: str, *, first: float, trim: bool = False
    ) -> None:
        def loop() -> None:
            wait = first
            while not stop.wait(wait):
                wait = interval
                try:
                    task()
                except Exception:  # keep going: the next round may succeed
                    log.exception("batchtrack: could not %s", what)
                if trim:
                    trim_malloc()

        threading.Thread(target=loop, name=f"batchtrack-{what}", daemon=True).start()

    def resume() -> None:
        resumed = recover(tracker, orchestrator)
        if not started.is_set():
            # Only batches a stopped service left: not one a user started meanwhile.
            left = [batch_id for batch_id in resumed if batch_id in unfinished]
            if left:
                log.warning(resuming(len(left)))
            started.set()

    started = threading.Event()
    unfinished = frozenset(tracker.open_batches())  # before the app takes any request
    # Each maintenance round is followed by a trim: what it read and freed goes back to
    # the system instead of stepping the RSS up (see trim_malloc).
    every(600, uploads.cleanup, "clean up expired uploads", first=600, trim=True)
    every(600, pipeline.sweep_partial, "sweep unfinished results", first=1, trim=True)
    # The first round shortly after start, so that the server announces itself first.
    every(min(60.0, lease), resume, "resume lost work", first=0.5)

    def close() -> None:
        # Items not started yet are failed as "interrupted"; running ones finish, and the
        # pipeline's atomic writes mean no result is ever left half-written.
        orchestrator.close(cancel_pending=True, reason=INTERRUPTED)
        tracker.stop_sweeper()
        stop.set()
        uploads.cleanup()
        tracker.store.close()

    return app, close
