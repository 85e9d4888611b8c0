"""What ``batchtrack serve`` logs: one line per request, and each batch's start and end.

The demo app gives no hook into the batches it runs, so the log watches from outside,
honestly: a batch has *started* when ``POST …/process-batch`` answered 202 (its id is in
that body), and it has *finished* when the database says so. A :class:`BatchWatch`
thread reads the started batches' counts from the store (``items=False``, cheap for any
size) twice a second and logs each one once, when it is final — whether or not a client
is still polling it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import attrs

from ._models import BatchSnapshot
from .exceptions import BatchNotFound, BatchtrackError

__all__ = ["AccessLog", "BatchWatch"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("batchtrack.serve")

# A 202 body is a few hundred bytes; never hold more than this of any response.
_MAX_BODY = 64 * 1024


@attrs.define
class _Watched:
    since: float
    announced: bool = False


@attrs.define
class BatchWatch:
    """Logs ``batch … started`` when told, and ``batch … finished`` once the store agrees.

    Args:
        read: Reads a batch's counts (``tracker.get(batch_id, items=False)``).
        interval: Seconds between two reads of the unfinished batches.
    """

    read: Callable[[str], BatchSnapshot]
    interval: float = 0.5
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _wake: threading.Event = attrs.field(factory=threading.Event, init=False)
    _stop: threading.Event = attrs.field(factory=threading.Event, init=False)
    _started: dict[str, _Watched] = attrs.field(factory=dict, init=False)
    _thread: threading.Thread | None = attrs.field(default=None, init=False)

    def started(self, batch_id: str) -> None:
        """A batch was accepted: log it and watch it until it is final (from the watch's
        thread, so that no caller, and no event loop, waits for the store)."""
        with self._lock:
            self._started.setdefault(batch_id, _Watched(time.monotonic()))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="batchtrack-batch-log", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def check(self) -> None:
        """Read every watched batch once; log the new ones, and log and forget the ones
        that are final."""
        with self._lock:
            watched = list(self._started.items())
        for batch_id, state in watched:
            try:
                snap = self.read(batch_id)
            except BatchNotFound:
                log.info("batch %s is gone (deleted or expired)", batch_id)
            except BatchtrackError as exc:  # the store is busy or away: read it next time
                log.debug("batch %s: cannot read it: %s", batch_id, exc)
                continue
            else:
                p = snap.progress
                if not state.announced:
                    state.announced = True
                    noun = "image" if p.total == 1 else "images"
                    log.info("batch %s started: %d %s", batch_id, p.total, noun)
                if not snap.status.is_final:
                    continue
                log.info(
                    "batch %s finished (%s) in %.1f s: %d of %d images processed, %d failed",
                    batch_id,
                    snap.status.value,
                    time.monotonic() - state.since,
                    p.completed,
                    p.total,
                    p.failed,
                )
            with self._lock:
                self._started.pop(batch_id, None)

    def close(self) -> None:
        """Stop watching (batches still running are not logged as finished)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                self.check()
            except Exception:  # the log must never take the server down
                log.exception("batchtrack: could not check the running batches")


@attrs.frozen
class AccessLog:
    """Pure ASGI middleware: logs ``METHOD /path STATUS 12.3 ms`` at INFO when each
    HTTP response ends (for an event stream: when it closes); other scopes pass through.

    Args:
        app: The app to wrap.
        watch: Told about every batch ``POST {prefix}/process-batch`` accepted (202).
        prefix: Where the API is mounted.
    """

    app: ASGIApp
    watch: BatchWatch | None = None
    prefix: str = "/api"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        method, path = scope["method"], scope["path"]
        keep_body = (
            self.watch is not None and method == "POST" and path == f"{self.prefix}/process-batch"
        )
        status: int | None = None
        body = bytearray()
        logged = False

        def done(outcome: str) -> None:
            nonlocal logged
            if not logged:
                logged = True
                ms = (time.perf_counter() - began) * 1000
                log.info("%s %s %s %.1f ms", method, path, outcome, ms)

        async def logging_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif (
                message["type"] == "http.response.body"
                and keep_body
                and status == 202
                and len(body) < _MAX_BODY
            ):
                body.extend(message.get("body", b""))
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                done(str(status))
                if keep_body and status == 202:
                    self._started(bytes(body))

        try:
            await self.app(scope, receive, logging_send)
        except BaseException:
            done("500" if status is None else f"{status} (cut short)")
            raise
        done("-" if status is None else f"{status} (cut short)")  # the client went away

    def _started(self, body: bytes) -> None:
        try:
            batch_id = json.loads(body)["batchId"]
        except (ValueError, KeyError, TypeError):
            log.warning("batchtrack: a 202 from process-batch without a batchId")
            return
        if self.watch is not None and isinstance(batch_id, str):
            self.watch.started(batch_id)
