"""Slow clients: a stalled or trickling request body never stalls the API (issue 16)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("python_multipart")
from batchtrack import asgi, wsgi
from batchtrack._wire import SPOOL_MEMORY
from batchtrack.exceptions import ValidationError
from http_support import (
    Service,
    SyncASGIClient,
    jpeg,
    raw_request,
    read_response,
    request_head,
    threaded_wsgiref_server,
    uvicorn_server,
    wsgiref_server,
)

STALLS = 50
MULTIPART = "multipart/form-data; boundary=XyZ"
PART_HEAD = (
    b'--XyZ\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n'
    b"Content-Type: image/jpeg\r\n\r\n"
)


def _stalled_upload(base: str) -> socket.socket:
    """An upload that announces 1,000,000 bytes, sends about 100, then nothing."""
    body = PART_HEAD + b"\xff" * (100 - len(PART_HEAD))
    return raw_request(base, request_head("POST", "/api/upload", MULTIPART, 1_000_000), body)


def _stalled_json(base: str) -> socket.socket:
    """A process-batch request that announces 100 bytes of JSON and sends 13."""
    head = request_head("POST", "/api/process-batch", "application/json", 100)
    return raw_request(base, head, b'{"fileIds": [')


STALLERS = {"uploads": _stalled_upload, "json": _stalled_json}


@contextlib.contextmanager
def _held(opener: Callable[[str], socket.socket], base: str, n: int) -> Iterator[list[Any]]:
    """``n`` connections made by ``opener``, held open; all closed on the way out."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(n):
            sockets.append(opener(base))
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
def make_service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Services with the given app options, each closed after the test."""
    made: list[Service] = []

    def make(**options: Any) -> Service:
        made.append(Service(tmp_path / str(len(made)), **options))
        return made[-1]

    yield make
    for service in made:
        service.close()


def _real_batch(client: httpx.Client) -> str:
    """The status URL of a batch started through the API by ``client``."""
    up = client.post("/api/upload", files=[("files", ("a.jpg", jpeg(), "image/jpeg"))])
    assert up.status_code == 201, up.text
    started = client.post("/api/process-batch", json={"fileIds": [up.json()["files"][0]["id"]]})
    assert started.status_code == 202, started.text
    return str(started.json()["statusUrl"])


def _answer_time(client: httpx.Client, url: str) -> float:
    """Seconds until ``url`` answers 200 (infinity when it does not within 5 s)."""
    start = time.monotonic()
    try:
        response = client.get(url, timeout=5)
    except httpx.TimeoutException:
        return math.inf
    assert response.status_code == 200, response.text
    return time.monotonic() - start


def _still_waiting(sock: socket.socket) -> bool:
    """Nothing has come back on ``sock``: no answer, and the server did not close it."""
    readable, _, _ = select.select([sock], [], [], 0)
    return not readable


def _no_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- ASGI under uvicorn --------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(STALLERS))
def test_fifty_stalled_bodies_do_not_delay_the_api_under_uvicorn(
    make_service: Callable[..., Service], kind: str
) -> None:
    """While 50 clients hold a request body half sent, other requests answer within 1 s."""
    service = make_service()
    with uvicorn_server(service.asgi) as base, httpx.Client(base_url=base) as client:
        status_url = _real_batch(client)
        with _held(STALLERS[kind], base, STALLS) as stalled:
            time.sleep(0.3)  # every stalled request has reached the app
            assert _answer_time(client, "/api/openapi.json") < 1
            assert _answer_time(client, status_url) < 1
            assert all(_still_waiting(sock) for sock in stalled)


def test_a_stalled_upload_gets_408_after_the_idle_timeout_and_leaves_no_file(
    make_service: Callable[..., Service],
) -> None:
    """An upload that stops mid-body is answered 408 and its partial file is removed."""
    service = make_service(idle_timeout=1.0)
    sent = PART_HEAD + b"\xff" * (SPOOL_MEMORY + 1000)  # more than is kept in memory
    with uvicorn_server(service.asgi) as base:
        head = request_head("POST", "/api/upload", MULTIPART, 1_000_000)
        with contextlib.closing(raw_request(base, head, sent)) as sock:
            start = time.monotonic()
            deadline = start + 0.8
            while not _no_files(service.uploads.directory) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert [n.endswith(".part") for n in _no_files(service.uploads.directory)] == [True]
            status, headers, body = read_response(sock)
            waited = time.monotonic() - start
    assert status == 408
    assert headers["content-type"] == "application/json"
    assert b'"code":"request_timeout"' in body
    assert 0.8 < waited < 5
    assert _no_files(service.uploads.directory) == []


def test_a_client_that_leaves_mid_upload_leaves_no_file(
    make_service: Callable[..., Service],
) -> None:
    """When a client disconnects half-way through an upload, its partial file is removed."""
    service = make_service()
    sent = PART_HEAD + b"\xff" * (SPOOL_MEMORY + 1000)
    with uvicorn_server(service.asgi) as base:
        head = request_head("POST", "/api/upload", MULTIPART, 1_000_000)
        with contextlib.closing(raw_request(base, head, sent)):
            deadline = time.monotonic() + 5
            while not _no_files(service.uploads.directory) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(_no_files(service.uploads.directory)) == 1
        deadline = time.monotonic() + 5
        while _no_files(service.uploads.directory) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _no_files(service.uploads.directory) == []


def test_an_upload_larger_than_memory_holds_arrives_intact(
    make_service: Callable[..., Service],
) -> None:
    """An upload spooled to disk on its way in is stored byte for byte, spool removed."""
    service = make_service()
    data = bytes(range(256)) * ((SPOOL_MEMORY + 20_000) // 256)
    with uvicorn_server(service.asgi) as base, httpx.Client(base_url=base) as client:
        up = client.post("/api/upload", files=[("files", ("big.bin", data, "image/jpeg"))])
    assert up.status_code == 201, up.text
    stored = service.uploads.get(up.json()["files"][0]["id"])
    assert stored.path.read_bytes() == data
    assert not [n for n in _no_files(service.uploads.directory) if n.endswith(".part")]


def test_a_body_announced_over_the_limit_is_refused_without_being_received(
    make_service: Callable[..., Service],
) -> None:
    """A Content-Length over the route's limit is answered 413 at once, nothing received."""
    service = make_service()
    with uvicorn_server(service.asgi) as base:
        head = request_head("POST", "/api/process-batch", "application/json", 10**9)
        with contextlib.closing(raw_request(base, head)) as sock:
            status, _, body = read_response(sock, timeout=2)
    assert status == 413
    assert b'"code":"too_large"' in body


def test_a_spool_that_cannot_be_written_is_a_logged_500_that_keeps_nothing(
    make_service: Callable[..., Service], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the disk refuses a spooled body, the answer is the JSON 500 and no file stays
    (a full disk is a 507: tests/test_http_hardening.py)."""
    import batchtrack._wire

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(5, "Input/output error")

    service = make_service()
    monkeypatch.setattr(batchtrack._wire.tempfile, "mkstemp", refuse)
    client = SyncASGIClient(service.asgi)
    try:
        data = b"\0" * (SPOOL_MEMORY + 1000)
        up = client.post("/api/upload", files=[("files", ("big.bin", data, "image/jpeg"))])
    finally:
        client.close()
    assert up.status_code == 500
    assert up.json()["error"]["code"] == "internal"
    assert _no_files(service.uploads.directory) == []


@pytest.mark.parametrize("server", ["uvicorn", "wsgiref"])
def test_a_trickled_body_gets_408_after_the_body_timeout(
    make_service: Callable[..., Service], server: str
) -> None:
    """A body sent one byte every 100 ms is answered 408 once body_timeout has passed."""
    service = make_service(body_timeout=1.0, idle_timeout=0.5)
    serving = uvicorn_server(service.asgi) if server == "uvicorn" else wsgiref_server(service.wsgi)
    with serving as base:
        head = request_head("POST", "/api/process-batch", "application/json", 1000)
        with contextlib.closing(raw_request(base, head)) as sock:
            start = time.monotonic()
            while time.monotonic() - start < 5 and not select.select([sock], [], [], 0.1)[0]:
                sock.sendall(b" ")
            status, _, body = read_response(sock)
            waited = time.monotonic() - start
    assert status == 408
    assert b'"code":"request_timeout"' in body
    assert 0.9 < waited < 3


def test_handlers_run_in_the_apps_own_pool_not_the_loops_default_executor(
    make_service: Callable[..., Service],
) -> None:
    """With the event loop's default executor busy, the ASGI app still answers."""
    service = make_service()
    client = SyncASGIClient(service.asgi)
    release = threading.Event()
    try:
        loop = client._loop

        async def exhaust() -> None:
            for _ in range(64):
                loop.run_in_executor(None, release.wait)

        asyncio.run_coroutine_threadsafe(exhaust(), loop).result(5)
        start = time.monotonic()
        assert client.get("/api/openapi.json").status_code == 200
        assert time.monotonic() - start < 1
    finally:
        release.set()
        client.close()


def test_lifespan_shutdown_shuts_the_pool_down(make_service: Callable[..., Service]) -> None:
    """After lifespan shutdown the app's pool takes no more work; a new request makes one."""
    service = make_service()
    app = service.asgi
    client = SyncASGIClient(app)
    try:
        assert client.get("/api/openapi.json").status_code == 200
        pool = app._pool
        assert pool is not None

        async def lifespan() -> None:
            messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

            async def receive() -> dict[str, Any]:
                return messages.pop(0)

            async def send(message: Any) -> None:
                pass

            await app({"type": "lifespan"}, receive, send)

        asyncio.run(lifespan())
        with pytest.raises(RuntimeError):
            pool.submit(print)
        assert client.get("/api/openapi.json").status_code == 200
    finally:
        client.close()


# -- WSGI under a threaded server ----------------------------------------------------------


def test_stalled_uploads_hold_only_their_own_threads_under_a_threaded_wsgi_server(
    make_service: Callable[..., Service],
) -> None:
    """A thread-per-connection WSGI server answers others within 1 s while 50 uploads stall."""
    service = make_service()
    with threaded_wsgiref_server(service.wsgi) as base, httpx.Client(base_url=base) as client:
        status_url = _real_batch(client)
        with _held(_stalled_upload, base, STALLS) as stalled:
            time.sleep(0.3)
            assert _answer_time(client, "/api/openapi.json") < 1
            assert _answer_time(client, status_url) < 1
            assert all(_still_waiting(sock) for sock in stalled)


def test_a_stalled_wsgi_upload_gets_408_after_the_servers_socket_timeout(
    make_service: Callable[..., Service],
) -> None:
    """Under WSGI a body read that times out on the server's socket is answered 408."""
    service = make_service()
    with threaded_wsgiref_server(service.wsgi, timeout=0.5) as base:
        head = request_head("POST", "/api/upload", MULTIPART, 1_000_000)
        with contextlib.closing(raw_request(base, head, PART_HEAD + b"\xff" * 5000)) as sock:
            start = time.monotonic()
            deadline = start + 0.4
            while not _no_files(service.uploads.directory) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert [n.endswith(".part") for n in _no_files(service.uploads.directory)] == [True]
            status, _, body = read_response(sock)
            waited = time.monotonic() - start
    assert status == 408
    assert b'"code":"request_timeout"' in body
    assert 0.4 < waited < 3
    assert _no_files(service.uploads.directory) == []


# -- options --------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [asgi, wsgi], ids=["asgi", "wsgi"])
@pytest.mark.parametrize("option", ["body_timeout", "idle_timeout"])
@pytest.mark.parametrize("value", [0, -1, 0.0, math.nan, math.inf, True, "30", None])
def test_timeouts_must_be_positive_numbers_of_seconds(
    make_service: Callable[..., Service], module: Any, option: str, value: Any
) -> None:
    """A timeout that is not a positive, finite number of seconds is a ValidationError."""
    service = make_service()
    with pytest.raises(ValidationError, match=option):
        module.create_app(service.tracker, service.runner, service.uploads, **{option: value})
