"""Ways to reach the HTTP apps in tests: in process, and through real servers."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import httpx
from PIL import Image

from batchtrack import BatchTracker, Orchestrator
from batchtrack import asgi as asgi_module
from batchtrack import wsgi as wsgi_module
from batchtrack.imaging import ImagePipeline
from batchtrack.uploads import UploadStore

TRANSPORTS = ["asgi", "wsgi", "uvicorn", "wsgiref"]


def jpeg(size: tuple[int, int] = (800, 600), color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "JPEG", quality=85)
    return out.getvalue()


class SyncASGIClient:
    """httpx.AsyncClient on an ASGITransport, driven from synchronous tests."""

    def __init__(self, app: Any, root_path: str = "") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        transport = httpx.ASGITransport(app=app, root_path=root_path)
        self._client = httpx.AsyncClient(transport=transport, base_url="http://testserver")

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async def call() -> httpx.Response:
            response = await self._client.request(method, url, **kwargs)
            await response.aread()
            return response

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(60)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def wait_until_serving(url: str, proc: Any, timeout: float = 30) -> None:
    """Wait until ``url`` answers, failing early if the server process ``proc`` died."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout} s") from None
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def uvicorn_server(app: Any) -> Iterator[str]:
    """The ASGI app under a real uvicorn on 127.0.0.1; yields the base URL."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        threading.Event().wait(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def wsgiref_server(app: Any) -> Iterator[str]:
    """The WSGI app under a threaded wsgiref server on 127.0.0.1; yields the base URL."""
    server = make_server(
        "127.0.0.1", 0, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class Service:
    """A tracker, an orchestrator running the image pipeline, uploads; and both apps."""

    def __init__(self, root: Path, **app_options: Any) -> None:
        (root / "out").mkdir(parents=True, exist_ok=True)
        self.tracker = BatchTracker()
        self.orchestrator = Orchestrator(
            self.tracker, ImagePipeline(root / "out", max_size=256), concurrency=2
        )
        self.uploads = UploadStore(
            root / "uploads", max_bytes=app_options.pop("max_bytes", 300_000)
        )
        options = {"events_poll": 0.05, **app_options}
        self.asgi = asgi_module.create_app(self.tracker, self.orchestrator, self.uploads, **options)
        self.wsgi = wsgi_module.create_app(self.tracker, self.orchestrator, self.uploads, **options)

    def close(self) -> None:
        self.orchestrator.close(cancel_pending=True)


@contextlib.contextmanager
def clients(service: Service, transport: str, root_path: str = "") -> Iterator[Callable[[], Any]]:
    """Yields a factory of fresh clients (each with its own cookies) for ``transport``."""
    made: list[Any] = []

    def finish() -> None:
        for client in made:
            client.close()

    if transport == "asgi":

        def make() -> Any:
            made.append(SyncASGIClient(service.asgi, root_path))
            return made[-1]

        try:
            yield make
        finally:
            finish()
        return
    if transport == "wsgi":

        def make_wsgi() -> Any:
            t = httpx.WSGITransport(app=service.wsgi, script_name=root_path)
            made.append(httpx.Client(transport=t, base_url="http://testserver"))
            return made[-1]

        try:
            yield make_wsgi
        finally:
            finish()
        return
    server = (
        uvicorn_server(service.asgi) if transport == "uvicorn" else wsgiref_server(service.wsgi)
    )
    with server as base:

        def make_real() -> Any:
            made.append(httpx.Client(base_url=base, timeout=30))
            return made[-1]

        try:
            yield make_real
        finally:
            finish()
