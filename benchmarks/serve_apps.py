"""Apps for ``bench_serve``, built from the environment by a server's factory:
``uvicorn serve_apps:asgi --factory`` or ``gunicorn 'serve_apps:wsgi()'``.

- ``BENCH_APP``: ``ours`` (the default session-cookie owner), ``owner`` (ours with
  ``owner=`` a function, which runs in the app's threads), ``async`` (ours with an
  ``async def`` owner, awaited on the event loop) or ``raw`` (the floor: the very bytes
  and headers ours answers, precomputed, 304 when the request carries
  ``If-None-Match``); under gunicorn also ``peer`` (Django + celery-progress, see
  ``peers/celery_progress_site.py``).
- ``BENCH_STORE``: ``memory``, ``sqlite`` (a file in ``BENCH_DIR``) or ``redis`` (on
  ``BENCH_REDIS_URL``, under a prefix of its own).
- ``BENCH_DIR``: a scratch folder; ``info.json`` is written there once the app is
  built (gunicorn builds it after it listens): batch id, ETag, body length.

The batch: 10 items, 4 completed, 1 running. Its tracker's clock stops once the batch is
built, so the ETA, and with it the ETag, stays the same for the whole run (with a running
clock the ETA of a running batch moves every second or so, and with it the ETag).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from batchtrack import BatchTracker, MemoryStore, Orchestrator, SQLiteStore
from batchtrack._wire import Body, Request
from batchtrack.uploads import UploadStore

SESSION = "0123456789abcdef0123456789abcdef"
COOKIE = f"batchtrack_session={SESSION}"
"""The session cookie every request carries: the batch belongs to it."""


class _Clock:
    """time.time until stopped, then the moment it was stopped."""

    def __init__(self) -> None:
        self.stopped: float | None = None

    def __call__(self) -> float:
        return time.time() if self.stopped is None else self.stopped


def _build(kind: str) -> Any:
    """The app ``BENCH_APP`` asks for, as ``kind`` (``"asgi"`` or ``"wsgi"``)."""
    which = os.environ.get("BENCH_APP", "ours")
    folder = Path(os.environ.get("BENCH_DIR", "/tmp/bench-serve"))
    folder.mkdir(parents=True, exist_ok=True)
    kind_of_store = os.environ.get("BENCH_STORE", "memory")
    store: Any = MemoryStore()
    if kind_of_store == "sqlite":
        store = SQLiteStore(folder / "bench.db")
    elif kind_of_store == "redis":
        from batchtrack.stores.redis import RedisStore

        store = RedisStore(os.environ["BENCH_REDIS_URL"], prefix=f"bench-{uuid.uuid4()}:")
    clock = _Clock()
    tracker = BatchTracker(store, clock=clock)
    snap = tracker.create_batch([f"image{i}.jpg" for i in range(10)], owner=f"session:{SESSION}")
    for item in snap.items[:4]:
        tracker.start_item(snap.batch_id, item.id)
        time.sleep(0.01)  # durations the ETA can use
        tracker.complete_item(snap.batch_id, item.id)
    tracker.start_item(snap.batch_id, snap.items[4].id)
    clock.stopped = time.time()
    batch_id = snap.batch_id

    runner = Orchestrator(tracker, lambda item: None, concurrency=1)
    uploads = UploadStore(folder / "uploads")
    module = __import__(f"batchtrack.{kind}", fromlist=["create_app"])
    options: dict[str, Any] = {}
    if which == "owner":
        options["owner"] = lambda headers: f"session:{SESSION}"
    elif which == "async":

        async def owner(headers: Any) -> str:
            return f"session:{SESSION}"

        options["owner"] = owner
    ours = module.create_app(tracker, runner, uploads, **options)

    # What ours answers, asked in-process: the floor returns the same bytes and headers.
    path = f"/api/batch-status/{batch_id}"

    def ask(headers: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
        request = Request("GET", path, headers, Body(lambda size: b"", 0), "", "127.0.0.1")
        answer = ours.api.handle(request)
        return answer.status, list(answer.headers), answer.body

    if which == "async":  # awaited as the ASGI app awaits it, on a loop (of another thread:
        import asyncio  # the factory runs in uvicorn's)
        from concurrent.futures import ThreadPoolExecutor

        def ask(headers: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
            request = Request("GET", path, headers, Body(lambda size: b"", 0), "", "127.0.0.1")
            with ThreadPoolExecutor(1) as thread:
                identity = thread.submit(asyncio.run, ours.api.identify_async(request)).result()
            answer = ours.api.handle(request, identity)
            return answer.status, list(answer.headers), answer.body

    status, headers, body = ask({"cookie": COOKIE})
    assert status == 200, status
    etag = dict(headers)["ETag"]
    status_304, headers_304, _ = ask({"cookie": COOKIE, "if-none-match": etag})
    assert status_304 == 304, status_304
    info = {"path": path, "batch_id": batch_id, "etag": etag, "body_bytes": len(body), "app": which}
    (folder / "info.json.part").write_text(json.dumps(info))
    os.replace(folder / "info.json.part", folder / "info.json")

    if which != "raw":
        return ours
    if kind == "asgi":
        return _raw_asgi(headers, body, headers_304)
    return _raw_wsgi(headers, body, headers_304)


def _raw_asgi(
    headers: list[tuple[str, str]], body: bytes, headers_304: list[tuple[str, str]]
) -> Any:
    ok = [(k.lower().encode(), v.encode("latin-1")) for k, v in headers]
    not_modified = [(k.lower().encode(), v.encode("latin-1")) for k, v in headers_304]
    start_200 = {"type": "http.response.start", "status": 200, "headers": ok}
    start_304 = {"type": "http.response.start", "status": 304, "headers": not_modified}
    body_200 = {"type": "http.response.body", "body": body}
    body_304 = {"type": "http.response.body", "body": b""}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        for name, _ in scope["headers"]:
            if name == b"if-none-match":
                await send(start_304)
                await send(body_304)
                return
        await send(start_200)
        await send(body_200)

    return app


def _raw_wsgi(
    headers: list[tuple[str, str]], body: bytes, headers_304: list[tuple[str, str]]
) -> Any:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if "HTTP_IF_NONE_MATCH" in environ:
            start_response("304 Not Modified", headers_304)
            return [b""]
        start_response("200 OK", headers)
        return [body]

    return app


def asgi() -> Any:
    """The ASGI app (a uvicorn ``--factory``)."""
    return _build("asgi")


def wsgi() -> Any:
    """The WSGI app (gunicorn ``'serve_apps:wsgi()'``)."""
    if os.environ.get("BENCH_APP") == "peer":
        from peers.celery_progress_site import application

        return application()
    return _build("wsgi")
