"""Ways to reach the HTTP apps in tests: in process, and through real servers."""

from __future__ import annotations

import asyncio
import contextlib
import io
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import attrs
import httpx
from PIL import Image

from batchtrack import BatchSnapshot, BatchTracker, Item, Orchestrator, Status
from batchtrack import asgi as asgi_module
from batchtrack import wsgi as wsgi_module
from batchtrack.exceptions import ProcessingError
from batchtrack.imaging import ImagePipeline
from batchtrack.stores.base import Store
from batchtrack.uploads import UploadStore

TRANSPORTS = ["asgi", "wsgi", "uvicorn", "wsgiref"]

FAIL_MARKER = b"batchtrack-test: fail while switched on"
"""A JPEG comment that makes :class:`TestProcessor` fail the image while its switch is on."""


def jpeg(
    size: tuple[int, int] = (800, 600),
    color: tuple[int, int, int] = (200, 40, 40),
    *,
    comment: bytes = b"",
) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "JPEG", quality=85, comment=comment)
    return out.getvalue()


def flaky_jpeg() -> bytes:
    """A valid JPEG that :class:`TestProcessor` fails while its switch file exists."""
    return jpeg((320, 240), comment=FAIL_MARKER)


@attrs.define(eq=False)
class TestProcessor:
    """The image pipeline, plus what tests need to steer it.

    It records every item it runs; it waits while ``gate`` is cleared (so items stay
    processing); and while the ``switch`` file exists it fails every image whose bytes
    carry :data:`FAIL_MARKER` with the error ``"injected failure"``.
    """

    __test__ = False  # not a test class, despite its name

    pipeline: ImagePipeline
    switch: Path
    gate: threading.Event = attrs.Factory(threading.Event)
    runs: list[str] = attrs.Factory(list)  # item ids, in the order they ran

    def __attrs_post_init__(self) -> None:
        self.gate.set()

    @property
    def output_dir(self) -> Path:
        return self.pipeline.output_dir

    def __call__(self, item: Item) -> Any:
        assert item.id is not None
        self.runs.append(item.id)
        if not self.gate.wait(30):
            raise ProcessingError("the test's gate stayed closed")
        if self.switch.exists() and FAIL_MARKER in Path(str(item.source)).read_bytes():
            raise ProcessingError("injected failure")
        return self.pipeline(item)


@attrs.define(eq=False)
class RecordingRunner:
    """A :class:`batchtrack.typing.Runner` that records its calls and runs nothing by itself.

    :meth:`run` processes a batch's pending items inline, when the test says so.
    """

    tracker: BatchTracker
    processor: TestProcessor
    calls: list[tuple[str, Any]] = attrs.Factory(list)

    def submit(self, items: Iterable[Any], *, owner: str | None = None) -> BatchSnapshot:
        given = list(items)
        self.calls.append(("submit", given))
        return self.tracker.create_batch(given, owner=owner)

    def resume(self, batch_id: str) -> BatchSnapshot:
        self.calls.append(("resume", batch_id))
        return self.tracker.get(batch_id)

    def cancel(self, batch_id: str) -> bool:
        self.calls.append(("cancel", batch_id))
        return True  # deliberately not the count: the API must take that from the tracker

    def run(self, batch_id: str) -> BatchSnapshot:
        """Process every pending item of the batch here, one after another."""
        for item in self.tracker.get(batch_id).items:
            if item.status is not Status.PENDING:
                continue
            self.tracker.start_item(batch_id, item.id)
            try:
                self.processor(Item(item.filename, item.source, item.id, batch_id))
            except ProcessingError as exc:
                self.tracker.fail_item(batch_id, item.id, str(exc))
            else:
                self.tracker.complete_item(batch_id, item.id)
        return self.tracker.get(batch_id)


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

    @property
    def cookies(self) -> httpx.Cookies:
        return self._client.cookies

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
    with _serve_wsgi(app, _ThreadingWSGIServer, _QuietHandler) as base:
        yield base


@contextlib.contextmanager
def _serve_wsgi(app: Any, server_class: Any, handler_class: Any) -> Iterator[str]:
    server = make_server(
        "127.0.0.1", 0, app, server_class=server_class, handler_class=handler_class
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class _RoomyThreadingWSGIServer(_ThreadingWSGIServer):
    request_queue_size = 128  # socketserver's 5 makes a burst of connections wait for SYN retries


@contextlib.contextmanager
def threaded_wsgiref_server(app: Any, *, timeout: float | None = None) -> Iterator[str]:
    """The threaded wsgiref server of :func:`wsgiref_server`, for many connections at once.

    Its listen backlog takes a burst of connections; with ``timeout``, every connection's
    socket times out after that many seconds, which is how a threaded wsgiref server
    bounds a client that stops sending (a read of ``wsgi.input`` raises TimeoutError).
    """

    class Handler(_QuietHandler):
        pass

    Handler.timeout = timeout  # StreamRequestHandler sets it on each connection's socket
    with _serve_wsgi(app, _RoomyThreadingWSGIServer, Handler) as base:
        yield base


def raw_request(base: str, head: bytes, body: bytes = b"") -> socket.socket:
    """A socket to the server at ``base`` that has sent ``head`` (ending in a blank line)
    and ``body``, and nothing more: the caller decides what else to send, and closes it.
    """
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    try:
        sock.sendall(head + body)
    except BaseException:
        sock.close()
        raise
    return sock


def request_head(method: str, path: str, content_type: str, length: int) -> bytes:
    """An HTTP/1.1 request head that announces a body of ``length`` bytes."""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def read_response(sock: socket.socket, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """The status, headers (lower-case names) and body of the response on ``sock``."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection; got {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body


class Service:
    """A tracker, a runner over the :class:`TestProcessor`, uploads; and both apps.

    The runner is an orchestrator unless ``runner`` makes another one from the tracker
    and the processor; the store a :class:`MemoryStore` unless ``store`` is given.
    """

    def __init__(
        self,
        root: Path,
        *,
        runner: Callable[[BatchTracker, TestProcessor], Any] | None = None,
        store: Store | None = None,
        **app_options: Any,
    ) -> None:
        (root / "out").mkdir(parents=True, exist_ok=True)
        self.tracker = BatchTracker(store)
        self.switch = root / "failing"
        self.processor = TestProcessor(ImagePipeline(root / "out", max_size=256), self.switch)
        self.orchestrator = Orchestrator(self.tracker, self.processor, concurrency=2)
        self.runner = self.orchestrator if runner is None else runner(self.tracker, self.processor)
        self.uploads = UploadStore(
            root / "uploads", max_bytes=app_options.pop("max_bytes", 300_000)
        )
        options = {"events_poll": 0.05, **app_options}
        self.asgi = asgi_module.create_app(self.tracker, self.runner, self.uploads, **options)
        self.wsgi = wsgi_module.create_app(self.tracker, self.runner, self.uploads, **options)

    def close(self) -> None:
        self.processor.gate.set()
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


def stop_serve(proc: subprocess.Popen[Any]) -> None:
    """Stop a serve process like Ctrl-C would, or kill it if it does not stop."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
