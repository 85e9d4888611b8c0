"""The framework-free HTTP API: one request value in, one response value out.

Routing, validation, ownership, JSON and error mapping live here, once; the WSGI and ASGI
modules only translate their protocol to :class:`Request` and back from
:class:`Response`. Everything here is synchronous: the ASGI shell runs it in a thread.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

import attrs
from typing_extensions import TypedDict

from ._models import Item
from ._orchestrator import Orchestrator
from ._tracker import BatchTracker
from .exceptions import BatchNotFound, OrchestratorClosed, ValidationError
from .uploads import FileNotFound, FileTooLarge, UploadStore, UploadWriter

__all__ = ["COOKIE", "Api", "AppOptions", "BodyTooLarge", "Request", "Response"]

log = logging.getLogger("batchtrack")

COOKIE = "batchtrack_session"
_COOKIE_VALUE = re.compile(r"\A[0-9a-f]{32}\Z")
_UUID = re.compile(
    r"\A[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z"
)
_CHUNK = 1 << 16

Owner = Callable[[Mapping[str, str]], "str | None"]


class AppOptions(TypedDict, total=False):
    """The keyword arguments of ``create_app`` (see :func:`batchtrack.asgi.create_app`)."""

    prefix: str
    max_files: int
    owner: Owner | None
    secure_cookies: bool
    max_json_bytes: int
    results_dir: str | Path | None
    events_poll: float


def _optional_path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


class BodyTooLarge(Exception):
    """The request body went over the limit for its route."""


@attrs.define(eq=False)
class Body:
    """A request body read in chunks through ``read``, never past ``limit`` bytes."""

    read_chunk: Callable[[int], bytes]
    limit: int
    seen: int = 0

    def read(self, size: int = _CHUNK) -> bytes:
        data = self.read_chunk(size)
        self.seen += len(data)
        if self.seen > self.limit:
            raise BodyTooLarge
        return data


@attrs.frozen
class Request:
    """An HTTP request as the shells hand it over.

    Attributes:
        method: Upper-case method.
        path: The path below the mount point (``root_path`` / ``SCRIPT_NAME`` removed).
        headers: Lower-case names; repeated headers joined with ``", "``.
        body: Reads the body; its limit is set by the shell from :meth:`Api.body_limit`.
        root_path: Where the app is mounted, for building URLs.
    """

    method: str
    path: str
    headers: Mapping[str, str]
    body: Body
    root_path: str = ""


@attrs.frozen
class Response:
    """An HTTP response: a body, or an :class:`EventStream` for server-sent events."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    stream: EventStream | None = None


@attrs.define(eq=False)
class EventStream:
    """Server-sent events for one batch, polled by the shell.

    The shell calls :meth:`poll` every :attr:`interval` seconds (in a thread for ASGI)
    and writes what it returns, until it returns None or the client goes away. Polling
    instead of blocking keeps no thread waiting between events.
    """

    api: Api
    batch_id: str
    owner: str
    version: int = -1
    last_write: float = attrs.field(factory=time.monotonic)

    @property
    def interval(self) -> float:
        return self.api.events_poll

    def poll(self) -> list[bytes] | None:
        """The chunks to send now (maybe none); None when the stream is over."""
        if self.version == -2:
            return None
        try:
            snap = self.api.tracker.get(self.batch_id, owner=self.owner)
        except BatchNotFound:
            return None
        now = time.monotonic()
        if snap.version != self.version:
            self.version = -2 if snap.status.is_final else snap.version
            self.last_write = now
            body = json.dumps(snap.to_dict(), separators=(",", ":"), ensure_ascii=False)
            return [f"id: {snap.version}\ndata: {body}\n\n".encode()]
        if now - self.last_write >= self.api.heartbeat:
            self.last_write = now
            return [b": keep-alive\n\n"]
        return []


class _Reject(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or []


def _reject(status: int, code: str, message: str) -> NoReturn:
    raise _Reject(status, code, message)


def _json(status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(
        status,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            *(headers or []),
        ],
        body,
    )


def _error(
    status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None
) -> Response:
    return _json(status, {"error": {"code": code, "message": message}}, headers)


def _uuid(value: str, what: str) -> str:
    if not _UUID.match(value):
        _reject(400, "invalid_id", f"{what} must be a UUID, got {value[:80]!r}")
    return value.lower()


@attrs.define(eq=False)
class Api:
    """The API of contract §2 over a tracker, an orchestrator and an upload store.

    See :func:`batchtrack.asgi.create_app` for the arguments.
    """

    tracker: BatchTracker
    orchestrator: Orchestrator
    uploads: UploadStore
    prefix: str = "/api"
    max_files: int = 10
    owner: Owner | None = None
    max_json_bytes: int = 64 * 1024
    secure_cookies: bool = False
    results_dir: Path | None = attrs.field(default=None, converter=_optional_path)
    events_poll: float = 0.5
    heartbeat: float = 15.0
    _routes: list[tuple[str, re.Pattern[str], Callable[..., Response]]] = attrs.field(
        init=False, factory=list
    )

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.prefix, str) or (self.prefix and not self.prefix.startswith("/")):
            raise ValidationError(f"prefix must be '' or start with '/', not {self.prefix!r}")
        self.prefix = self.prefix.rstrip("/")
        if (
            isinstance(self.max_files, bool)
            or not isinstance(self.max_files, int)
            or self.max_files < 1
        ):
            raise ValidationError(f"max_files must be a whole number >= 1, not {self.max_files!r}")
        if self.owner is not None and not callable(self.owner):
            raise ValidationError("owner must be a callable taking the request headers")
        if self.results_dir is None:
            output = getattr(self.orchestrator.processor, "output_dir", None)
            self.results_dir = Path(output) if output is not None else None
        id_ = r"(?P<batch>[^/]+)"
        self._routes = [
            ("POST", re.compile(r"/upload"), self._upload),
            ("POST", re.compile(r"/process-batch"), self._process_batch),
            ("GET", re.compile(rf"/batch-status/{id_}"), self._batch_status),
            ("GET", re.compile(rf"/batch-events/{id_}"), self._batch_events),
            ("GET", re.compile(rf"/batch-results/{id_}/(?P<item>[^/]+)"), self._batch_results),
            ("GET", re.compile(r"/openapi\.json"), self._openapi),
        ]

    # -- entry points ---------------------------------------------------------------------

    def body_limit(self, path: str) -> int:
        """How many body bytes a request to ``path`` may send."""
        if path == f"{self.prefix}/upload":
            return self.max_files * self.uploads.max_bytes + 64 * 1024
        return self.max_json_bytes

    def handle(self, request: Request) -> Response:
        """Answer one request; never raises, never shows a traceback."""
        cookie_headers: list[tuple[str, str]] = []
        try:
            handler, params, allowed = self._route(request)
            if handler is None:
                if allowed:
                    raise _Reject(
                        405,
                        "method_not_allowed",
                        f"{request.method} is not allowed here; use {', '.join(allowed)}",
                        [("Allow", ", ".join(allowed))],
                    )
                _reject(404, "not_found", f"no such endpoint: {request.path[:200]}")
            owner = None
            if handler is not self._openapi:
                owner, cookie_headers = self._identify(request)
            response = handler(request, owner, **params)
        except _Reject as exc:
            response = _error(exc.status, exc.code, exc.message, exc.headers)
        except BodyTooLarge:
            response = _error(413, "too_large", "the request body is too large")
        except Exception:
            log.exception("batchtrack: %s %s failed", request.method, request.path[:200])
            response = _error(500, "internal", "internal error; it has been logged")
        if cookie_headers:
            response.headers.extend(cookie_headers)
        return response

    def _route(
        self, request: Request
    ) -> tuple[Callable[..., Response] | None, dict[str, str], list[str]]:
        path = request.path
        if not path.startswith(self.prefix + "/"):
            return None, {}, []
        path = path[len(self.prefix) :]
        allowed: list[str] = []
        for method, pattern, handler in self._routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if method == request.method or (method == "GET" and request.method == "HEAD"):
                return handler, match.groupdict(), []
            allowed.append(method)
        return None, {}, allowed

    def _identify(self, request: Request) -> tuple[str, list[tuple[str, str]]]:
        if self.owner is not None:
            owner = self.owner(request.headers)
            if not owner:
                _reject(401, "unauthorized", "sign in to use this service")
            return str(owner), []
        for part in request.headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and _COOKIE_VALUE.match(value):
                return f"session:{value}", []
        value = secrets.token_hex(16)
        attributes = f"{COOKIE}={value}; Path=/; HttpOnly; SameSite=Lax"
        if self.secure_cookies:
            attributes += "; Secure"
        return f"session:{value}", [("Set-Cookie", attributes)]

    # -- endpoints ------------------------------------------------------------------------

    def _upload(self, request: Request, owner: str) -> Response:
        from ._multipart import read_uploads  # needs python-multipart: the server extra

        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            _reject(415, "unsupported_media_type", "send the files as multipart/form-data")
        writers: list[UploadWriter] = []
        try:
            read_uploads(request.body, content_type, self._begin(owner, writers))
        except FileTooLarge as exc:
            _abort(writers)
            _reject(413, "too_large", f"{exc.filename} is larger than {exc.limit:,} bytes")
        except (_Reject, BodyTooLarge):
            _abort(writers)
            raise
        except ValueError as exc:
            _abort(writers)
            _reject(400, "bad_multipart", f"the multipart body is malformed: {exc}")
        except BaseException:
            _abort(writers)
            raise
        if not writers:
            _reject(400, "no_files", "no files were sent: use the field 'files'")
        stored = [writer.commit() for writer in writers]
        return _json(
            201, {"files": [{"id": f.id, "filename": f.filename, "size": f.size} for f in stored]}
        )

    def _begin(
        self, owner: str, writers: list[UploadWriter]
    ) -> Callable[[str, str], UploadWriter | None]:
        def begin(field: str, filename: str) -> UploadWriter | None:
            if field != "files" or not filename:
                return None  # other fields, and empty file inputs, are ignored
            if len(writers) >= self.max_files:
                _reject(400, "too_many_files", f"at most {self.max_files} files per request")
            try:
                writer = self.uploads.begin(filename, owner=owner)
            except ValidationError as exc:
                _reject(400, "bad_filename", str(exc))
            writers.append(writer)
            return writer

        return begin

    def _process_batch(self, request: Request, owner: str) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            _reject(415, "unsupported_media_type", "send a JSON body (application/json)")
        raw = b"".join(iter(lambda: request.body.read(_CHUNK), b""))
        try:
            payload = json.loads(raw)
        except ValueError:
            _reject(400, "bad_json", "the body is not valid JSON")
        ids = payload.get("fileIds") if isinstance(payload, dict) else None
        if not isinstance(payload, dict) or "fileIds" not in payload:
            _reject(400, "missing_file_ids", 'send {"fileIds": [...]}')
        if not isinstance(ids, list) or not ids:
            _reject(400, "bad_file_ids", "fileIds must be a non-empty list of file ids")
        if len(ids) > self.max_files:
            _reject(400, "too_many_files", f"at most {self.max_files} files per batch")
        if not all(isinstance(i, str) for i in ids):
            _reject(400, "bad_file_ids", "every file id must be a string")
        normal = [_uuid(i, "every file id") for i in ids]
        if len(set(normal)) != len(normal):
            _reject(400, "duplicate_file_ids", "a file id appears more than once")
        try:
            files = [self.uploads.get(i, owner=owner) for i in normal]
        except FileNotFound as exc:
            _reject(404, "file_not_found", f"no uploaded file {exc.file_id!r} (expired?)")
        try:
            snap = self.orchestrator.submit(
                [Item(f.filename, source=f.path) for f in files], owner=owner
            )
        except OrchestratorClosed:
            _reject(503, "shutting_down", "the service is shutting down; try again shortly")
        url = f"{request.root_path}{self.prefix}/batch-status/{snap.batch_id}"
        return _json(
            202,
            {"batchId": snap.batch_id, "status": snap.status.value, "statusUrl": url},
            [("Location", url)],
        )

    def _snapshot(self, batch: str, owner: str, *, items: bool = True) -> Any:
        try:
            return self.tracker.get(_uuid(batch, "batchId"), owner=owner, items=items)
        except BatchNotFound:
            _reject(404, "batch_not_found", "no such batch (it may have expired)")

    def _batch_status(self, request: Request, owner: str, batch: str) -> Response:
        snap = self._snapshot(batch, owner)
        etag = f'"{snap.version}.{snap.estimated_time_remaining}"'
        headers = [("ETag", etag), ("Cache-Control", "no-store")]
        wanted = request.headers.get("if-none-match", "")
        if wanted.strip() == "*" or etag in [
            t.strip().removeprefix("W/") for t in wanted.split(",")
        ]:
            return Response(304, headers)
        return _json(200, snap.to_dict(), headers)

    def _batch_events(self, request: Request, owner: str, batch: str) -> Response:
        batch_id = self._snapshot(batch, owner, items=False).batch_id
        return Response(
            200,
            [
                ("Content-Type", "text/event-stream"),
                ("Cache-Control", "no-store"),
                ("X-Accel-Buffering", "no"),
            ],
            stream=EventStream(self, batch_id, owner),
        )

    def _batch_results(self, request: Request, owner: str, batch: str, item: str) -> Response:
        snap = self._snapshot(batch, owner)
        item_id = _uuid(item, "itemId")
        found = next((i for i in snap.items if i.id == item_id), None)
        if found is None or found.status.value != "completed":
            _reject(404, "result_not_found", "no processed file for this item (yet)")
        paths = sorted(self.results_dir.glob(f"{item_id}.*")) if self.results_dir else []
        paths = [p for p in paths if p.suffix != ".part"]
        if not paths:
            _reject(404, "result_not_found", "the processed file is not available")
        data = paths[0].read_bytes()
        name = Path(found.filename).stem + paths[0].suffix
        kind = mimetypes.guess_type(paths[0].name)[0] or "application/octet-stream"
        return Response(
            200,
            [
                ("Content-Type", kind),
                ("Content-Length", str(len(data))),
                ("Content-Disposition", f"attachment; filename*=UTF-8''{quote(name)}"),
                ("Cache-Control", "private, max-age=3600"),
            ],
            data,
        )

    def _openapi(self, request: Request, owner: str | None) -> Response:
        from ._openapi import document

        return _json(200, document(f"{request.root_path}{self.prefix}", self.max_files))


def _abort(writers: list[UploadWriter]) -> None:
    for writer in writers:
        writer.abort()
