"""What ``batchtrack serve`` bounds that uvicorn leaves open: slow headers, fds, memory.

uvicorn times out a kept-alive connection between requests (``timeout_keep_alive``) and a
slow body is the app's to time out (``body_timeout``), but a connection whose request
headers never complete is held for ever, and its ``limit_concurrency`` answers 503 only
once headers are complete. A thousand clients that send ``GET /api/batch-sta`` and stop
then hold every file descriptor of the process, and ``accept`` fails for everyone else.

Here uvicorn's HTTP protocol is subclassed with two bounds:

- a header deadline: a request's headers must be complete within ``header_timeout``
  seconds of the connection being made (or of the first byte of a later request on a
  kept-alive connection); then it is answered 408 and closed;
- a connection cap: past ``max_connections`` open connections, the oldest one that has
  no request under way (headers still incomplete, or kept alive between requests) is
  closed to make room; when every connection is busy with a request, the new one is
  answered 503 and closed.

And the soft limit of open files is raised to the hard one, so that the cap can be high;
and glibc's malloc is kept from holding freed image buffers (:func:`settle_malloc`).
Imported only by ``serve``: it needs uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, ClassVar

from uvicorn.protocols.http.auto import AutoHTTPProtocol

__all__ = [
    "HEADER_TIMEOUT",
    "MMAP_THRESHOLD",
    "bounded_protocol",
    "connection_cap",
    "raise_fd_limit",
    "settle_malloc",
]

HEADER_TIMEOUT = 10.0
"""Seconds a client has to send a request's headers (``serve --header-timeout``)."""

_MOST_FDS = 1 << 20  # the soft limit asked for when the hard one is unlimited


def raise_fd_limit() -> int | None:
    """Raise this process's soft limit of open files to its hard limit (at most 2**20).

    Returns:
        The soft limit now in force, or None where there is no such limit (Windows).
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _MOST_FDS if hard == resource.RLIM_INFINITY else min(hard, _MOST_FDS)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        # macOS, for one, caps it lower: then keep what we have.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


MMAP_THRESHOLD = 128 * 1024
"""Bytes from which glibc's malloc maps memory of its own (its initial default, kept)."""

_M_MMAP_THRESHOLD = -3  # mallopt's parameter numbers, from glibc's malloc.h


def settle_malloc() -> bool:
    """Keep glibc's malloc from holding on to the memory of freed images.

    By default glibc raises its mmap threshold to the size of each large block freed (up
    to 32 MiB): after the first few images, Pillow's buffers of a few MiB come from the
    arenas of the server's many threads instead of being mapped, and freed they stay
    there, fragmented: the process's RSS creeps up for ever while Python's heap does not.
    A fixed threshold (as ``MALLOC_MMAP_THRESHOLD_`` would set) maps every buffer over it
    and returns it to the system when freed. Left alone when that variable is set.

    Returns:
        Whether the threshold was set (glibc only).
    """
    import ctypes
    import os
    import platform

    if platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc after all
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def connection_cap(fd_limit: int | None) -> int:
    """The most connections worth holding under ``fd_limit`` open files: the rest (an
    eighth, at least 64) is kept for the database, uploads, results and the server."""
    if fd_limit is None:
        return 10_000
    return max(fd_limit - max(64, fd_limit // 8), 16)


def _answer(status: int, reason: str, code: str, message: str) -> bytes:
    """A whole JSON error response that closes the connection."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


_TIMED_OUT = _answer(
    408,
    "Request Timeout",
    "request_timeout",
    "the request headers arrived too slowly (or stopped); send the request again",
)
_BUSY = _answer(
    503, "Service Unavailable", "server_busy", "too many connections; try again shortly"
)


class _Bounded(asyncio.Protocol):
    """The header deadline and the connection cap, mixed into uvicorn's HTTP protocol.

    A class made by :func:`bounded_protocol` holds the settings and, shared by its
    connections, those with no request under way (oldest first) and those closed by it.
    """

    header_timeout: ClassVar[float]
    max_connections: ClassVar[int]
    _idle: ClassVar[dict[Any, None]]
    _closing: ClassVar[set[Any]]

    # uvicorn's own attributes (HttpToolsProtocol and H11Protocol alike)
    transport: Any
    loop: Any
    cycle: Any
    connections: Any
    _deadline: asyncio.TimerHandle | None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._deadline = None
        self._arm()
        cls = type(self)
        cls._idle[self] = None
        if len(self.connections) - len(cls._closing) > cls.max_connections:
            victim = next(iter(cls._idle), None)
            if victim is self:  # the only connection without a request: nothing to evict
                victim = None
            if victim is not None:
                victim._drop()
            else:
                self._drop(_BUSY)

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        if self._deadline is None and (before is None or before.response_complete):
            self._arm()  # the first bytes of another request on a kept-alive connection
        super().data_received(data)
        if self.cycle is not before or self.transport.get_protocol() is not self:
            self._rest()  # headers complete: a request is under way (or handed over)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            type(self)._idle[self] = None  # kept alive: evictable until its next request

    def connection_lost(self, exc: Exception | None) -> None:
        self._rest()
        type(self)._closing.discard(self)
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.header_timeout, self._drop, _TIMED_OUT)

    def _rest(self) -> None:
        """No deadline and no eviction for this connection (it has a request, or left)."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        type(self)._idle.pop(self, None)

    def _drop(self, answer: bytes = b"") -> None:
        """Close the connection, after ``answer`` if given."""
        self._rest()
        if self.transport.is_closing():
            return
        type(self)._closing.add(self)
        if answer:
            self.transport.write(answer)
        self.transport.close()


def bounded_protocol(header_timeout: float, max_connections: int) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, else h11) with a deadline of
    ``header_timeout`` seconds for request headers and at most ``max_connections`` open
    connections; pass it as ``uvicorn.Config(http=...)``."""
    settings = {
        "header_timeout": header_timeout,
        "max_connections": max_connections,
        "_idle": {},
        "_closing": set(),
    }
    made: type[asyncio.Protocol] = type(
        "BoundedHTTPProtocol", (_Bounded, AutoHTTPProtocol), settings
    )
    return made
