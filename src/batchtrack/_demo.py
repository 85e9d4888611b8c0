"""The demo service of ``batchtrack serve``: the page at ``/`` and the API under ``/api``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from ._orchestrator import Orchestrator
from ._tracker import BatchTracker
from .asgi import Receive, Scope, Send, create_app
from .cli import DB_NAME
from .imaging import ImagePipeline
from .stores.sqlite import SQLiteStore
from .uploads import UploadStore

__all__ = ["INTERRUPTED", "build"]

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


def build(data_dir: Path, *, concurrency: int = 4) -> tuple[Any, Callable[[], None]]:
    """The demo ASGI app over ``data_dir``, and the function that shuts it down."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "results").mkdir(exist_ok=True)
    tracker = BatchTracker(SQLiteStore(data_dir / DB_NAME))
    orchestrator = Orchestrator(
        tracker, ImagePipeline(data_dir / "results"), concurrency=concurrency
    )
    uploads = UploadStore(data_dir / "uploads")
    api = create_app(tracker, orchestrator, uploads)
    tracker.start_sweeper(interval=600)
    stop = threading.Event()

    def sweep_uploads() -> None:
        while not stop.wait(600):
            try:
                uploads.cleanup()
            except OSError:
                log.exception("batchtrack: could not clean up expired uploads")

    threading.Thread(target=sweep_uploads, name="batchtrack-uploads", daemon=True).start()
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
