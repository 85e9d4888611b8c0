"""The HTTP API as a plain ASGI 3 application; mount it under any ASGI framework.

Needs the ``server`` extra for uploads (``pip install 'batchtrack[server]'``); imports
no web framework. Store I/O never runs on the event loop: every request is handled in a
worker thread, and the request body is pulled from the loop chunk by chunk as the
handler reads it, so nothing large is held in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import attrs
from typing_extensions import Unpack

from ._http import Api, AppOptions
from ._tracker import BatchTracker
from ._wire import Body, Request, Response
from .typing import Runner
from .uploads import UploadStore

__all__ = ["App", "create_app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _ClientGone(BaseException):
    """The client left while its body was being read (a BaseException, so that the
    handler's catch-all for errors does not turn it into a 500 nobody will see)."""


@attrs.define(eq=False)
class App:
    """The ASGI application around an :class:`batchtrack._http.Api`."""

    api: Api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1000})
        # Other scope types are not ours: leave them alone.

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        root = scope.get("root_path", "")
        path = scope["path"]
        if root and path.startswith(root):
            path = path[len(root) :]
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            joiner = "; " if name == "cookie" else ", "
            headers[name] = f"{headers[name]}{joiner}{value}" if name in headers else value
        pending = bytearray()
        more = True

        async def next_message() -> Message:
            return await receive()

        def read_chunk(size: int) -> bytes:  # runs in the worker thread
            nonlocal more
            while not pending and more:
                message = asyncio.run_coroutine_threadsafe(next_message(), loop).result()
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                pending.extend(message.get("body", b""))
                more = message.get("more_body", False)
            chunk = bytes(pending[:size])
            del pending[:size]
            return chunk

        method = scope["method"]
        request = Request(method, path, headers, Body(read_chunk, self.api.body_limit(path)), root)
        try:
            response = await asyncio.to_thread(self.api.handle, request)
        except _ClientGone:
            return
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [(k.lower().encode(), v.encode("latin-1")) for k, v in response.headers],
            }
        )
        if response.stream is not None and method != "HEAD":
            await self._stream(response, receive, send, more)
            return
        await send(
            {"type": "http.response.body", "body": b"" if method == "HEAD" else response.body}
        )

    async def _stream(self, response: Response, receive: Receive, send: Send, more: bool) -> None:
        stream = response.stream
        assert stream is not None
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        try:
            while not gone.is_set():
                chunks = await asyncio.to_thread(stream.poll)
                if chunks is None:
                    break
                for chunk in chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(gone.wait(), stream.interval)
            if not gone.is_set():
                await send({"type": "http.response.body", "body": b""})
        finally:
            watcher.cancel()


def create_app(
    tracker: BatchTracker,
    runner: Runner,
    uploads: UploadStore,
    **options: Unpack[AppOptions],
) -> App:
    """The HTTP API (contract §2, §7) as an ASGI application.

    Args:
        tracker: Where batches are read, cancelled and retried.
        runner: What runs the batches that ``process-batch`` starts and ``batch-retry``
            resumes, and drops the queued work of those ``batch-cancel`` stops: any
            :class:`batchtrack.typing.Runner`, such as an
            :class:`~batchtrack.Orchestrator` (in this process) or a
            :class:`batchtrack.celery.CeleryRunner`.
        uploads: Where uploaded files go.
        **options: ``prefix`` (``"/api"``): the path the endpoints live under.
            ``max_files`` (10): files per upload request and per batch.
            ``owner``: who is asking, from the request headers (lower-case names), None
            answering 401; without it an anonymous session cookie
            (``batchtrack_session``) decides. ``secure_cookies`` (False): mark that
            cookie ``Secure``. ``max_json_bytes`` (64 KiB): the largest JSON body.
            ``results_dir``: where processed files are, named ``<item id>.<ext>``; by
            default the ``output_dir`` of the runner's ``processor`` (None when the
            runner has none: results are then not served). ``events_poll`` (0.5): seconds
            between checks for changes in the events stream.

    Raises:
        ValidationError: A bad option, or a ``runner`` without ``submit``, ``resume``
            and ``cancel`` methods.
    """
    return App(Api(tracker, runner, uploads, **options))
