"""Apps for ``bench_serve``: started by uvicorn or gunicorn as ``serve_apps:asgi`` or
``serve_apps:wsgi`` with ``BENCH_APP`` (``ours`` or ``raw``) and ``BENCH_STORE``
(``memory`` or ``sqlite``) in the environment; ``BENCH_DIR`` is a scratch folder."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from batchtrack import BatchTracker, MemoryStore, Orchestrator, SQLiteStore
from batchtrack.uploads import UploadStore

SESSION = "0123456789abcdef0123456789abcdef"
"""The session cookie value wrk sends: the batch belongs to it."""

_folder = Path(os.environ.get("BENCH_DIR", "/tmp/bench-serve"))
_store = (
    SQLiteStore(_folder / "bench.db")
    if os.environ.get("BENCH_STORE") == "sqlite"
    else MemoryStore()
)
tracker = BatchTracker(_store)
_batch = tracker.create_batch([f"image{i}.jpg" for i in range(10)], owner=f"session:{SESSION}")
for _item in _batch.items[:4]:
    tracker.start_item(_batch.batch_id, _item.id)
    tracker.complete_item(_batch.batch_id, _item.id)
tracker.start_item(_batch.batch_id, _batch.items[4].id)
BATCH_ID = _batch.batch_id
Path(_folder / "batch_id").write_text(BATCH_ID)

_orchestrator = Orchestrator(tracker, lambda item: None, concurrency=1)
_uploads = UploadStore(_folder / "uploads")


def _ours_asgi() -> Any:
    from batchtrack.asgi import create_app

    return create_app(tracker, _orchestrator, _uploads)


def _ours_wsgi() -> Any:
    from batchtrack.wsgi import create_app

    return create_app(tracker, _orchestrator, _uploads)


def _answer() -> tuple[bytes, list[tuple[str, str]]]:
    """The very bytes and headers our status endpoint answers with (the floor's body)."""
    from batchtrack._json import status_body

    snap = tracker.get(BATCH_ID)
    body = status_body(snap)
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("ETag", f'"{snap.version}.{snap.estimated_time_remaining}"'),
        ("Cache-Control", "no-store"),
    ]
    return body, headers


def _raw_asgi() -> Any:
    body, headers = _answer()
    raw = [(k.lower().encode(), v.encode()) for k, v in headers]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    return app


def _raw_wsgi() -> Any:
    body, headers = _answer()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", headers)
        return [body]

    return app


_ours = os.environ.get("BENCH_APP", "ours") == "ours"
asgi = _ours_asgi() if _ours else _raw_asgi()
wsgi = _ours_wsgi() if _ours else _raw_wsgi()
