"""The HTTP API as a plain WSGI application; mount it under any WSGI framework.

Needs the ``server`` extra for uploads (``pip install 'batchtrack[server]'``); imports
no web framework.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from typing import Any

import attrs
from typing_extensions import Unpack

from ._http import Api, AppOptions
from ._tracker import BatchTracker
from ._wire import Body, Request, Stream
from .typing import Runner
from .uploads import UploadStore

__all__ = ["App", "create_app"]

StartResponse = Callable[..., Any]


@attrs.define(eq=False)
class App:
    """The WSGI application around an :class:`batchtrack._http.Api`."""

    api: Api

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
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

        def read_chunk(size: int) -> bytes:
            nonlocal remaining
            data = stream.read(min(size, remaining)) if remaining else b""
            remaining -= len(data)
            return data

        method = environ["REQUEST_METHOD"].upper()
        root = environ.get("SCRIPT_NAME", "")
        request = Request(method, path, headers, Body(read_chunk, self.api.body_limit(path)), root)
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
    while (chunks := stream.poll()) is not None:
        yield from chunks
        time.sleep(stream.interval)


def create_app(
    tracker: BatchTracker,
    runner: Runner,
    uploads: UploadStore,
    **options: Unpack[AppOptions],
) -> App:
    """The HTTP API (contract §2, §7) as a WSGI application.

    The arguments are those of :func:`batchtrack.asgi.create_app`.
    """
    return App(Api(tracker, runner, uploads, **options))
