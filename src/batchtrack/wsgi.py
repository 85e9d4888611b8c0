"""The HTTP API as a plain WSGI application; mount it under any WSGI framework.

Needs the ``server`` extra for uploads (``pip install 'batchtrack[server]'``); imports
no web framework. WSGI reads a request's body in the thread that handles it, so a slow
client holds that server thread while its body arrives: see :func:`create_app`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from typing import Any

import attrs
from typing_extensions import Unpack

from ._http import Api, AppOptions, build_api, is_async
from ._recovery import Recovery, for_app
from ._tracker import BatchTracker
from ._wire import Body, Request, Stream, request_timeout
from .typing import Runner
from .uploads import UploadStore

__all__ = ["App", "create_app"]

StartResponse = Callable[..., Any]


@attrs.define(eq=False)
class App:
    """The WSGI application around an :class:`batchtrack._http.Api`."""

    api: Api
    _recovery: Recovery = attrs.field(init=False, default=attrs.Factory(for_app, takes_self=True))

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        # WSGI has no lifespan: recovery starts with the first request (see create_app).
        self._recovery.start(self)
        # PEP 3333: paths arrive as latin-1 decoded bytes.
        path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace")
        headers = {
            key[5:].replace("_", "-").lower(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if environ.get(key):
                headers[key.replace("_", "-").lower()] = environ[key]
        try:
            remaining = max(int(environ.get("CONTENT_LENGTH") or 0), 0)
        except ValueError:
            remaining = 0
        stream = environ["wsgi.input"]
        # read1 (where the input has it) returns after one read of the socket, so a client
        # trickling its body meets the deadline between reads, not 64 KiB later.
        read = getattr(stream, "read1", stream.read)
        deadline = time.monotonic() + self.api.body_timeout

        def read_chunk(size: int) -> bytes:
            nonlocal remaining
            if not remaining:
                return b""
            if time.monotonic() > deadline:
                raise request_timeout()
            try:
                data: bytes = read(min(size, remaining))
            except TimeoutError:  # the server's socket timeout: the client stopped sending
                raise request_timeout() from None
            remaining -= len(data)
            return data

        method = environ["REQUEST_METHOD"].upper()
        root = environ.get("SCRIPT_NAME", "")
        body = Body(read_chunk, self.api.body_limit(path))
        request = Request(
            method,
            path,
            headers,
            body,
            root,
            environ.get("REMOTE_ADDR") or None,
            environ.get("QUERY_STRING", ""),
            environ.get("wsgi.url_scheme", "http"),
        )
        response = self.api.handle(request)
        reason = HTTPStatus(response.status).phrase
        start_response(f"{response.status} {reason}", response.headers)
        if method == "HEAD":
            return [b""]
        if response.stream is not None:
            return _events(response.stream)
        return [response.body]


def _events(stream: Stream) -> Iterator[bytes]:
    """The event stream; the server closes the generator when the client goes away."""
    woken = threading.Event()
    stream.open(woken.set)
    try:
        while True:
            woken.clear()  # before the poll: a wake-up during it polls again at once
            chunks = stream.poll()
            if chunks is None:
                return
            yield from chunks
            woken.wait(stream.interval)
    finally:
        stream.close()


def create_app(
    tracker: BatchTracker,
    runner: Runner,
    uploads: UploadStore,
    **options: Unpack[AppOptions],
) -> App:
    """The HTTP API as a WSGI application: upload files, run them as a batch, follow it.

    The endpoints, the arguments and the options (the ``page`` and ``on_progress`` among
    them) are those of :func:`batchtrack.asgi.create_app`.

    What a slow client costs: WSGI hands the body to the app as a blocking file, read in
    the server thread that handles the request, so a client sending its body slowly holds
    that thread while it does (a thread-per-connection server still answers everyone
    else; a fixed pool loses one thread per slow client). ``body_timeout`` is checked
    between reads: a client trickling its body is answered 408 ``request_timeout`` once
    it is over. A client that stops sending is bounded by the *server's* socket timeout
    alone (WSGI gives the app no way to set one; ``idle_timeout`` is for the ASGI app):
    when the server sets one on the connection (as a ``wsgiref`` handler's ``timeout``
    does), the read that times out is answered 408 too. Servers that receive the whole
    body before calling the app (waitress; gunicorn behind nginx, as gunicorn advises for
    its sync workers, which set no socket timeout) are never held by a slow client.

    WSGI has no lifespan: the app's recovery of unfinished batches (see
    :doc:`deployment`) starts with its first request and stops at interpreter exit.

    Raises:
        TypeError: As for the ASGI app, and an ``async def`` ``owner``: a WSGI app has no
            event loop to await it on (a function that returns an awaitable is answered
            500, logged, at its first request).
    """
    owner = options.get("owner")
    if owner is not None and is_async(owner):
        raise TypeError(
            "create_app() got an async owner; the WSGI app has no event loop to await it "
            "on: give it a plain function, or use batchtrack.asgi.create_app"
        )
    return App(build_api(tracker, runner, uploads, options))
