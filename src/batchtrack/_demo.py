"""The demo service of ``batchtrack serve``: the page at ``/`` and the API under ``/api``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from ._orchestrator import Orchestrator
from ._paths import DB_NAME
from ._tracker import BatchTracker
from .asgi import Receive, Scope, Send, create_app
from .exceptions import BatchtrackError
from .imaging import ImagePipeline
from .stores.sqlite import SQLiteStore
from .uploads import UploadStore

__all__ = ["INTERRUPTED", "build", "recover"]

log = logging.getLogger("batchtrack")

INTERRUPTED = "interrupted"
"""The error of items the server stopped before they started."""

_PAGE_HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
        b"script-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
]


def page() -> bytes:
    """The self-contained demo page (HTML, CSS and JavaScript in one file)."""
    return resources.files("batchtrack").joinpath("static/index.html").read_bytes()


def recover(tracker: BatchTracker, orchestrator: Orchestrator) -> int:
    """Take back lost items and resume every unfinished batch; return how many resumed.

    What a service does at start (a batch a killed process had started finishes) and
    every so often (items whose worker died go back to pending and run again).
    """
    tracker.reclaim()
    resumed = 0
    for batch_id in tracker.open_batches():
        try:
            orchestrator.resume(batch_id)
        except BatchtrackError:  # expired meanwhile, or we are shutting down
            log.debug("batchtrack: could not resume batch %s", batch_id, exc_info=True)
        else:
            resumed += 1
    return resumed


def build(
    data_dir: Path,
    *,
    concurrency: int = 4,
    lease: float = 60.0,
    max_upload_storage: int | None = 2**30,
    upload_quota: int | None = 200 * 2**20,
) -> tuple[Any, Callable[[], None]]:
    """The demo ASGI app over ``data_dir``, and the function that shuts it down.

    At start it reclaims lost items and resumes every unfinished batch in the database,
    then does so again every ``min(60, lease)`` seconds; running items are heartbeated
    every ``lease / 3`` seconds. The uploads folder holds at most ``max_upload_storage``
    bytes (1 GiB), and one client (by IP address) may upload ``upload_quota`` bytes
    (200 MiB) per hour; None lifts either limit.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "results").mkdir(exist_ok=True)
    tracker = BatchTracker(SQLiteStore(data_dir / DB_NAME), lease=lease)
    pipeline = ImagePipeline(data_dir / "results")
    # Results live as long as their batch; writes a crash cut short are swept.
    tracker.add_removal_hook(pipeline.remove_results)
    orchestrator = Orchestrator(tracker, pipeline, concurrency=concurrency)
    uploads = UploadStore(data_dir / "uploads", max_total_bytes=max_upload_storage)
    api = create_app(tracker, orchestrator, uploads, upload_bytes_per_client=upload_quota)
    tracker.start_sweeper(interval=600)
    stop = threading.Event()

    def every(interval: float, task: Callable[[], object], what: str, *, first: float) -> None:
        def loop() -> None:
            wait = first
            while not stop.wait(wait):
                wait = interval
                try:
                    task()
                except Exception:  # keep going: the next round may succeed
                    log.exception("batchtrack: could not %s", what)

        threading.Thread(target=loop, name=f"batchtrack-{what}", daemon=True).start()

    def resume() -> None:
        resumed = recover(tracker, orchestrator)
        if resumed and not started.is_set():
            log.warning("batchtrack: resuming %d unfinished batches", resumed)
        started.set()

    started = threading.Event()
    every(600, uploads.cleanup, "clean up expired uploads", first=600)
    every(600, pipeline.sweep_partial, "sweep unfinished results", first=1)
    # The first round shortly after start, so that the server announces itself first.
    every(min(60.0, lease), resume, "resume lost work", first=0.5)

    body = page()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in ("/", "/index.html"):
            if scope["method"] not in ("GET", "HEAD"):
                await api(scope, receive, send)  # answers 404 JSON
                return
            await send({"type": "http.response.start", "status": 200, "headers": _PAGE_HEADERS})
            await send(
                {"type": "http.response.body", "body": body if scope["method"] == "GET" else b""}
            )
            return
        await api(scope, receive, send)

    def close() -> None:
        # Items not started yet are failed as "interrupted"; running ones finish, and the
        # pipeline's atomic writes mean no result is ever left half-written.
        orchestrator.close(cancel_pending=True, reason=INTERRUPTED)
        tracker.stop_sweeper()
        stop.set()
        uploads.cleanup()
        tracker.store.close()

    return app, close
