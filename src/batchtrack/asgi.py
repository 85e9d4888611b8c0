"""The HTTP API as a plain ASGI 3 application; mount it under any ASGI framework.

Needs the ``server`` extra for uploads (``pip install 'batchtrack[server]'``); imports
no web framework. No thread waits for a client: a request's body is received whole on the
event loop (past 256 KiB into a temporary file) within ``body_timeout`` and ``idle_timeout``
before its handler runs in a pool of :data:`THREADS` threads that the app owns (and shuts
down with the lifespan), where every store and file call runs (but an ``async def`` owner
is awaited on the loop, and a memory store's status read or a kept Redis one answered there).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import attrs
from typing_extensions import Unpack

from ._http import Api, AppOptions, Identity, build_api
from ._recovery import Recovery, for_app
from ._tracker import BatchTracker
from ._wire import (
    Body,
    Request,
    Response,
    Spool,
    Stream,
    body_length,
    fold_headers,
    request_timeout,
)
from .typing import Runner
from .uploads import UploadStore

__all__ = ["THREADS", "App", "create_app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
T = TypeVar("T")

THREADS = 32
"""The size of an app's thread pool; its threads never wait for a client."""


@attrs.define(eq=False)
class App:
    """The ASGI application around an :class:`batchtrack._http.Api`."""

    api: Api
    _pool: ThreadPoolExecutor | None = attrs.field(default=None, init=False)
    _pool_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _recovery: Recovery = attrs.field(init=False, default=attrs.Factory(for_app, takes_self=True))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._recovery.start(self)  # at lifespan startup, or on first use without one
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
                await self._run(self._recovery.stop)
                await self.api.aclose()
                with self._pool_lock:
                    pool, self._pool = self._pool, None
                if pool is not None:
                    pool.shutdown(wait=False)  # busy threads finish their call, then exit
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _run(self, call: Callable[[], T]) -> T:
        """``call()`` in a thread of the app's pool (made on first use), in this context."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="batchtrack-http")
            pool = self._pool
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(pool, context.run, call)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        root = scope.get("root_path", "")
        path = scope["path"]
        if root and path.startswith(root):
            path = path[len(root) :]
        headers = fold_headers(scope["headers"])
        method = scope["method"]
        spool = Spool(self.api.uploads.spool_dir, self.api.body_limit(path))
        client = (scope.get("client") or (None,))[0]  # (host, port), or None when unknown
        received, scheme = Body(spool.read, spool.limit), scope.get("scheme", "http")
        query = scope.get("query_string", b"").decode("latin-1")
        request = Request(method, path, headers, received, root, client, query, scheme)
        handed_over = False
        try:
            length = body_length(method, headers)  # None: no body to wait for
            if length is not None and not await self._receive(receive, spool, length):
                return  # the client left
            identity = await self.api.identify_async(request)  # an async owner, on the loop
            handed_over = True
            response = await self.api.kept_status_async(request, identity)  # Redis: an await
            if response is not None:
                spool.close()
            elif self.api.answers_inline(request):  # a status read of a memory store
                response = self._handle(request, spool, identity)
            else:
                call = functools.partial(self._handle, request, spool, identity)
                response = await self._run(call)
        except asyncio.TimeoutError:  # too slow: answered now, and nothing waits for it
            response = request_timeout([("Connection", "close")]).response()
        finally:
            if not handed_over:
                spool.close()  # at most a close and an unlink: cheap enough for the loop
        raw = [(k.lower().encode(), v.encode("latin-1")) for k, v in response.headers]
        await send({"type": "http.response.start", "status": response.status, "headers": raw})
        if response.stream is not None and method != "HEAD":
            await self._stream(response.stream, receive, send)
            return
        body = b"" if method == "HEAD" else response.body
        await send({"type": "http.response.body", "body": body})

    async def _receive(self, receive: Receive, spool: Spool, length: str) -> bool:
        """Receive the whole body into ``spool``; False when the client left.

        Raises:
            asyncio.TimeoutError: It took over ``body_timeout``, or paused over
                ``idle_timeout``.
        """
        if length.isdigit() and int(length) > spool.limit:
            spool.too_large = True  # none of it is received: the handler gets 413 if it reads
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.api.body_timeout
        while True:
            wait = max(min(self.api.idle_timeout, deadline - loop.time()), 0)
            message = await asyncio.wait_for(receive(), wait)
            if message["type"] == "http.disconnect":
                return False
            if spool.add(message.get("body", b"")):
                await self._run(spool.flush)
            if spool.stopped or not message.get("more_body", False):
                return True

    def _handle(self, request: Request, spool: Spool, identity: Identity | None) -> Response:
        """Answer a request whose body has arrived (in a thread of the pool)."""
        with spool:  # freed here, once answered
            return self.api.handle(request, identity)

    async def _stream(self, stream: Stream, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()  # by the stream's wake-up, or by the client leaving

        def wake() -> None:  # from any thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(woken.set)

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            woken.set()

        watcher = asyncio.ensure_future(watch())
        stream.open(wake)
        try:
            while not watcher.done():
                woken.clear()  # before the poll: a wake-up during it polls again at once
                chunks = await self._run(stream.poll)  # a short call: no thread waits between
                if chunks is None:
                    break
                for chunk in chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(woken.wait(), stream.interval)
            if not watcher.done():
                await send({"type": "http.response.body", "body": b""})
        finally:
            watcher.cancel()
            stream.close()


def create_app(
    tracker: BatchTracker,
    runner: Runner,
    uploads: UploadStore,
    **options: Unpack[AppOptions],
) -> App:
    """The HTTP API as an ASGI application: upload images, run them as a batch, follow it.

    Args:
        tracker: Where batches are read, cancelled and retried.
        runner: What runs the batches that ``process-batch`` starts and ``batch-retry``
            resumes, and drops the queued work of those ``batch-cancel`` stops: any
            :class:`batchtrack.typing.Runner`, such as an
            :class:`~batchtrack.Orchestrator` (in this process) or a
            :class:`batchtrack.celery.CeleryRunner`.
        uploads: Where uploaded files go.
        **options: ``prefix`` (``"/api"``), ``max_files`` (10), ``owner`` (identity
            from the headers instead of a session cookie: a function, run in the app's
            threads, or an ``async def``, awaited on the event loop), ``secure_cookies``,
            ``session_secret`` (signs session cookies: give every process the same),
            ``max_json_bytes``, ``results_dir``, ``events_poll``, ``body_timeout``,
            ``idle_timeout``, the upload quota's ``upload_bytes_per_client``,
            ``upload_window`` and ``client_key``; ``page`` (False: also serve the demo
            page at ``/``); ``on_progress`` (called with every
            :class:`~batchtrack.ProgressEvent` of the batches started or retried through
            the app, in the runner's thread; what it raises is logged, never raised);
            ``trusted_origins`` (other sites whose pages may change state); ``metrics``
            (``GET /metrics`` for Prometheus: True or a :class:`batchtrack.metrics.Metrics`);
            ``webhooks`` (:class:`batchtrack.webhooks.Webhook` objects: a signed POST to
            each when a batch ends, sent from the store's outbox while the app runs).
            Each is described in :ref:`create-app-options`. With an Orchestrator the app
            resumes unfinished batches after a restart (:doc:`deployment`).

    Raises:
        ValidationError: A bad option, a ``runner`` without ``submit``, ``resume`` and
            ``cancel`` methods, or an ``on_progress`` the runner cannot take.
        TypeError: An option it does not take (a misspelt one names the closest).
        ImportError: python-multipart (the ``server`` extra) is not installed.
    """
    return App(build_api(tracker, runner, uploads, options))
