"""HTTP values for the framework-free handler: requests, responses, bodies, JSON, errors.

The router (:mod:`batchtrack._http`) and the endpoint modules build on these; the WSGI
and ASGI shells translate their protocol to :class:`Request` and back from
:class:`Response`. Nothing here knows a route.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any, NoReturn, Protocol

import attrs

from ._json import dumps
from ._models import BatchSnapshot
from ._tracker import BatchTracker
from .exceptions import BatchNotFound

__all__ = [
    "CHUNK",
    "MAX_JSON_DEPTH",
    "NO_BODY",
    "SPOOL_MEMORY",
    "Body",
    "BodyTooLarge",
    "Reject",
    "Request",
    "Response",
    "Spool",
    "Stream",
    "check_uuid",
    "error_response",
    "find_batch",
    "json_depth",
    "json_response",
    "read_json",
    "reject",
    "request_timeout",
    "status_url",
]

CHUNK = 1 << 16
SPOOL_MEMORY = 1 << 18
"""How much of a request body a :class:`Spool` keeps in memory before using a file."""
_UUID = re.compile(
    r"\A[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z"
)


class BodyTooLarge(Exception):
    """The request body went over the limit for its route."""


@attrs.define(eq=False)
class Body:
    """A request body read in chunks through ``read``, never past ``limit`` bytes."""

    read_chunk: Callable[[int], bytes]
    limit: int
    seen: int = 0

    def read(self, size: int = CHUNK) -> bytes:
        data = self.read_chunk(size)
        self.seen += len(data)
        if self.seen > self.limit:
            raise BodyTooLarge
        return data


@attrs.define(eq=False)
class Spool:
    """A request body received before its handler runs: in memory, then in a temporary file.

    The ASGI shell receives the body on the event loop and hands each chunk to :meth:`add`;
    when :meth:`add` says so it runs :meth:`flush` in a worker thread, which moves what is
    held in memory (at most :data:`SPOOL_MEMORY` bytes) to a file in ``directory``. So no
    thread waits for the client and no body is ever held whole in memory. Past ``limit``
    bytes the spool drops what it has and stops keeping anything: :meth:`read` then
    raises :class:`BodyTooLarge`, which the handler answers with 413 if it reads the body;
    when the file cannot be written, :meth:`read` raises that error (a 507 for a full
    disk, else a 500, logged). The
    handler reads the body back with :meth:`read` (in its worker thread); :meth:`close`
    frees everything and may be called any number of times.
    """

    directory: Path
    limit: int
    size: int = 0
    too_large: bool = False
    error: OSError | None = None
    _memory: bytearray = attrs.Factory(bytearray)
    _file: IO[bytes] | None = None
    _path: str | None = None
    _rewound: bool = False

    @property
    def stopped(self) -> bool:
        """Nothing more is kept (too large, or the file failed): stop receiving."""
        return self.too_large or self.error is not None

    def add(self, data: bytes) -> bool:
        """Keep ``data``; True when :meth:`flush` should now run (in a thread)."""
        if self.stopped:
            return False
        self.size += len(data)
        if self.size > self.limit:
            self.too_large = True
            self._memory.clear()  # the file, if any, goes with close()
            return False
        self._memory += data
        return len(self._memory) >= SPOOL_MEMORY

    def flush(self) -> None:
        """Move what is held in memory to the file (made on first use): blocking I/O."""
        try:
            if self._file is None:
                fd, self._path = tempfile.mkstemp(
                    dir=self.directory, prefix=".body-", suffix=".part"
                )
                self._file = os.fdopen(fd, "w+b")
            self._file.write(self._memory)
        except OSError as exc:  # a full disk, say: kept for the handler to answer
            self.error = exc
        self._memory.clear()

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the body; b"" at its end (blocking I/O once on disk).

        Raises:
            BodyTooLarge: The body went over ``limit``.
        """
        if self.too_large:
            raise BodyTooLarge
        if self._file is not None and not self._rewound:
            self.flush()
            self._file.seek(0)
            self._rewound = True
        if self.error is not None:
            raise self.error
        if self._file is None:
            chunk = bytes(self._memory[:size])
            del self._memory[:size]
            return chunk
        return self._file.read(size)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the body: close and remove the file, empty the memory."""
        self._memory.clear()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._path)
            self._path = None


@attrs.frozen
class Request:
    """An HTTP request as the shells hand it over.

    Attributes:
        method: Upper-case method.
        path: The path below the mount point (``root_path`` / ``SCRIPT_NAME`` removed).
        headers: Lower-case names; repeated headers joined with ``", "``.
        body: Reads the body; its limit is set by the shell from ``Api.body_limit``.
        root_path: Where the app is mounted, for building URLs.
        client: The address of the peer (ASGI ``scope["client"]`` host, WSGI
            ``REMOTE_ADDR``), or None when the server gives none.
        query: The query string as it came (``a=1&b=2``, still percent-encoded).
        scheme: ``"http"`` or ``"https"``, as the server says (ASGI ``scope["scheme"]``,
            WSGI ``wsgi.url_scheme``).
    """

    method: str
    path: str
    headers: Mapping[str, str]
    body: Body
    root_path: str = ""
    client: str | None = None
    query: str = ""
    scheme: str = "http"


class Stream(Protocol):
    """A response body that the shell polls, such as server-sent events.

    The shell calls :meth:`open` once with a ``wake`` callable, then :meth:`poll` (in a
    thread for ASGI) and writes what it returns, then waits until ``wake()`` is called
    or :attr:`interval` seconds have passed, and polls again; until :meth:`poll` returns
    None or the client goes away. Then it calls :meth:`close`, whatever happened. The
    wait holds no thread under ASGI.
    """

    @property
    def interval(self) -> float:
        """The longest wait before the next :meth:`poll` (read after each poll)."""
        ...

    def open(self, wake: Callable[[], None]) -> None:
        """Called before the first poll; ``wake()``, callable from any thread at any time
        and returning at once, makes the shell poll without waiting any longer."""
        ...

    def poll(self) -> list[bytes] | None:
        """The chunks to send now (maybe none); None when the stream is over."""
        ...

    def close(self) -> None:
        """The response is over (ended, or the client left)."""
        ...


@attrs.frozen
class Response:
    """An HTTP response: a body, or a :class:`Stream` polled by the shell."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    stream: Stream | None = None


class Reject(Exception):
    """Answer the request with this error (raised by endpoints, caught by the router)."""

    def __init__(
        self, status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or []

    def response(self) -> Response:
        """The JSON error response this rejection answers with."""
        return error_response(self.status, self.code, self.message, self.headers)


def reject(status: int, code: str, message: str) -> NoReturn:
    """Stop handling the request: answer ``status`` with the JSON error body."""
    raise Reject(status, code, message)


def request_timeout(headers: list[tuple[str, str]] | None = None) -> Reject:
    """The 408 ``request_timeout`` for a body that arrived too slowly (or stopped)."""
    return Reject(
        408,
        "request_timeout",
        "the request body arrived too slowly (or stopped); send the request again",
        headers,
    )


def json_response(
    status: int, payload: Any, headers: list[tuple[str, str]] | None = None
) -> Response:
    """A compact JSON response."""
    body = dumps(payload)
    return Response(
        status,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            *(headers or []),
        ],
        body,
    )


def error_response(
    status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None
) -> Response:
    """``{"error": {"code": ..., "message": ...}}``, the body of every error."""
    return json_response(status, {"error": {"code": code, "message": message}}, headers)


def check_uuid(value: str, what: str) -> str:
    """``value`` in lower case, or a 400 ``invalid_id`` when it is not a UUID."""
    if not _UUID.match(value):
        reject(400, "invalid_id", f"{what} must be a UUID, got {value[:80]!r}")
    return value.lower()


NO_BODY: Any = object()
"""What :func:`read_json` returns for an empty optional body."""

MAX_JSON_DEPTH = 64
"""How deeply arrays and objects may nest in a JSON body; deeper is a 400 ``bad_json``.

No body of the API nests more than three levels. Checked before parsing, so that how deep
:func:`json.loads` can go (the interpreter's recursion limit, the thread's stack) never
decides between a 400 and a 500.
"""
# A string (one never ending counts to the end, so no search starts inside it) or a bracket.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]+|\\.)*"?|[\[\]{}]', re.DOTALL)


def json_depth(raw: bytes) -> int:
    """How deeply arrays and objects nest in ``raw`` (JSON text), in linear time.

    Brackets inside strings do not count. For text that is not JSON the answer is only
    an upper bound, which is all that :func:`read_json` needs of it.
    """
    depth = deepest = 0
    for match in _JSON_TOKEN.finditer(raw):
        token = match[0]
        if token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in (b"]", b"}"):
            depth = max(depth - 1, 0)
    return deepest


def read_json(request: Request, *, optional: bool = False) -> Any:
    """The request's body, parsed as JSON.

    Args:
        request: The request.
        optional: An empty body (with or without a Content-Type) is allowed and gives
            :data:`NO_BODY`; a body that is not empty must still be JSON.

    Raises:
        Reject: 415 when the body is not ``application/json`` (for a required body this
            is checked before any of it is read), 400 ``bad_json`` when it does not parse
            or nests deeper than :data:`MAX_JSON_DEPTH`.
        BodyTooLarge: Over the route's limit (413).
    """
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    is_json = media == "application/json"
    if not is_json and not optional:
        reject(415, "unsupported_media_type", "send a JSON body (application/json)")
    raw = b"".join(iter(lambda: request.body.read(CHUNK), b""))
    if optional and not raw:
        return NO_BODY
    if not is_json:
        reject(415, "unsupported_media_type", "send no body, or a JSON body (application/json)")
    if json_depth(raw) > MAX_JSON_DEPTH:
        reject(400, "bad_json", f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: a last line of defence
        reject(400, "bad_json", "the body is not valid JSON")


def batch_not_found() -> NoReturn:
    """Stop with the 404 of a batch that is unknown, expired or someone else's."""
    reject(404, "batch_not_found", "no such batch (it may have expired)")


def find_batch(
    tracker: BatchTracker, batch: str, owner: str, *, items: bool = True
) -> BatchSnapshot:
    """The batch named by a path segment, as the caller may see it.

    Raises:
        Reject: 400 ``invalid_id`` for a segment that is not a UUID, 404
            ``batch_not_found`` for a batch that is unknown, expired or someone else's.
    """
    try:
        return tracker.get(check_uuid(batch, "batchId"), owner=owner, items=items)
    except BatchNotFound:
        batch_not_found()


def status_url(request: Request, prefix: str, batch_id: str) -> str:
    """The URL of the batch's status, as a client of this mount point reaches it."""
    return f"{request.root_path}{prefix}/batch-status/{batch_id}"


def fold_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """ASGI's header pairs as one string per lower-case name: repeated headers joined
    with ``", "`` (cookies with ``"; "``)."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in raw:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        joiner = "; " if name == "cookie" else ", "
        headers[name] = f"{headers[name]}{joiner}{value}" if name in headers else value
    return headers


def body_length(method: str, headers: Mapping[str, str]) -> str | None:
    """The ``Content-Length`` a request announces (``""`` when none), or None for a GET
    or HEAD that announces no body at all: nothing to wait for before answering."""
    length = headers.get("content-length", "")
    if method in ("GET", "HEAD") and length in ("", "0") and "transfer-encoding" not in headers:
        return None
    return length
