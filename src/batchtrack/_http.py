"""The framework-free HTTP API: one request value in, one response value out.

Routing, ownership and error mapping live here, once, with the endpoints that upload
files, start a batch and report on it; cancel and retry live in :mod:`batchtrack._control`,
the ZIP of a batch's results in :mod:`batchtrack._zip`, the optional page in
:mod:`batchtrack._page`, the request and response values and the JSON helpers in
:mod:`batchtrack._wire`, the check of other sites' requests in
:mod:`batchtrack._origins` and the log of outages in :mod:`batchtrack._outages`. The WSGI
and ASGI modules only translate their protocol to :class:`Request` and back from
:class:`Response`. Everything here is synchronous (the ASGI shell runs it in a thread)
but :meth:`Api.identify_async`, which awaits an ``async def`` owner on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import difflib
import hashlib
import hmac
import importlib
import inspect
import ipaddress
import logging
import math
import mimetypes
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote

import attrs
from typing_extensions import TypedDict

from . import _keys
from ._control import BatchControl, progress_hook
from ._json import dumps, status_body
from ._models import BatchSnapshot, Item, ProgressEvent, Status
from ._origins import check_origin, parse_trusted_origins
from ._outages import Outages, disk_full
from ._page import Page
from ._query import MAX_LIMIT, find_items, wants_delta
from ._query import _parameters as query_parameters
from ._query import _whole as whole_number
from ._tracker import BatchTracker, check_metadata
from ._watch import Subscription, subscribe
from ._wire import (
    Body,
    BodyTooLarge,
    Reject,
    Request,
    Response,
    batch_not_found,
    check_uuid,
    error_response,
    find_batch,
    json_response,
    read_json,
    reject,
    status_url,
)
from ._zip import ResultsZip
from .exceptions import (
    BatchNotFound,
    DatabaseDamaged,
    FileStorageError,
    OrchestratorClosed,
    StoreError,
    ValidationError,
)
from .files.base import FileStorage
from .files.results import ResultFiles, result_files
from .stores.base import BatchVersion
from .stores.memory import MemoryStore
from .typing import Runner
from .uploads import (
    FileNotFound,
    FileTooLarge,
    QuotaExceeded,
    StorageFull,
    StoredFile,
    UploadQuota,
    UploadStore,
    UploadWriter,
)

if TYPE_CHECKING:
    from .metrics import AppMetrics, Metrics
    from .webhooks import Webhook, WebhookSender

__all__ = [
    "COOKIE",
    "Api",
    "AppOptions",
    "Body",
    "BodyTooLarge",
    "EventStream",
    "Request",
    "Response",
    "build_api",
]

log = logging.getLogger("batchtrack")

COOKIE = "batchtrack_session"
_COOKIE_VALUE = re.compile(r"\A([0-9a-f]{32})(?:\.([0-9A-Za-z_-]{43}))?\Z")
_RUNNER_METHODS = ("submit", "resume", "cancel")

Owner = Callable[[Mapping[str, str]], "str | Awaitable[str | None] | None"]
"""Who is asking, from the request headers: a function, or an ``async def`` (awaited on
the ASGI app's event loop; see :func:`batchtrack.asgi.create_app`)."""
ClientKey = Callable[[Mapping[str, str], "str | None"], "str | None"]
"""Who a request comes from, for the upload quota: ``(headers, client address) -> key``."""


class AppOptions(TypedDict, total=False):
    """The keyword arguments of ``create_app`` (see :func:`batchtrack.asgi.create_app`)."""

    prefix: str
    max_files: int
    owner: Owner | None
    secure_cookies: bool
    session_secret: str | bytes | None
    max_json_bytes: int
    results_dir: str | Path | FileStorage | ResultFiles | None
    events_poll: float
    body_timeout: float
    idle_timeout: float
    upload_bytes_per_client: int | None
    upload_window: float
    client_key: ClientKey | None
    page: bool
    on_progress: Callable[[ProgressEvent], Any] | None
    trusted_origins: Iterable[str]
    metrics: bool | Metrics
    webhooks: Iterable[Webhook]


def build_api(
    tracker: BatchTracker, runner: Runner, uploads: UploadStore, options: Mapping[str, Any]
) -> Api:
    """The :class:`Api` that ``create_app`` (ASGI or WSGI) wraps, its options checked.

    Raises:
        TypeError: An option ``create_app`` does not take (the closest one is suggested).
        ImportError: python-multipart, which the upload endpoint needs, is not installed.
        ValidationError: A bad option value (see :class:`Api`).
    """
    accepted = sorted(AppOptions.__annotations__)
    for name in options:
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(accepted)}"
            raise TypeError(f"create_app() got an unexpected keyword argument {name!r}; {hint}")
    try:
        importlib.import_module("batchtrack._multipart")  # the upload endpoint's parser
    except ImportError as exc:
        raise ImportError(
            "create_app() needs python-multipart for its upload endpoint: "
            "pip install 'batchtrack[server]'",
            name="python_multipart",
        ) from exc
    if options.get("metrics") not in (None, False):
        try:
            importlib.import_module("batchtrack.metrics")
        except ImportError as exc:
            from ._extras import missing

            raise ImportError(
                missing("create_app(metrics=...)", "prometheus-client", "metrics"),
                name="prometheus_client",
            ) from exc
    return Api(tracker, runner, uploads, **options)


def is_async(owner: object) -> bool:
    """Whether ``owner`` is an ``async def`` (or an object whose ``__call__`` is one)."""
    return inspect.iscoroutinefunction(owner) or inspect.iscoroutinefunction(
        getattr(owner, "__call__", None)  # noqa: B004 - an async __call__, not callable()
    )


EVENT_LOOP: contextvars.ContextVar[asyncio.AbstractEventLoop | None] = contextvars.ContextVar(
    "batchtrack_event_loop", default=None
)
"""The ASGI app's event loop, set around the requests it hands to its threads: where a
sync ``owner`` that returns an awaitable has it awaited."""


@attrs.frozen
class Identity:
    """What an ``async def`` owner answered for one request (or what it raised), found
    on the event loop before the request's handler runs in a thread."""

    owner: object = None
    error: Exception | None = None


async def _awaited(awaitable: Awaitable[object]) -> object:
    return await awaitable


def _resolve(answer: object) -> object:
    """A sync owner's answer; an awaitable one is awaited on the ASGI app's event loop
    (from the app's thread that calls the owner).

    Raises:
        TypeError: It is awaitable and there is no event loop to await it on (a WSGI app).
    """
    if not inspect.isawaitable(answer):
        return answer
    loop = EVENT_LOOP.get()
    if loop is None:
        close = getattr(answer, "close", None)
        if callable(close):
            close()  # no "never awaited" warning on top of the error
        raise TypeError(
            "owner= returned an awaitable, which only the ASGI app can await; "
            "give the WSGI app a plain function"
        )
    return asyncio.run_coroutine_threadsafe(_awaited(answer), loop).result()


def _seconds(instance: object, attribute: attrs.Attribute[float], value: object) -> None:
    """A timeout option: a positive, finite number of seconds.

    Raises:
        ValidationError: Anything else (including ``True``, 0, NaN and infinity).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValidationError(
            f"{attribute.name} must be a positive number of seconds, not {value!r}"
        )


def _secret(value: str | bytes | None) -> bytes | None:
    """A session secret: None, or a string or bytes of at least 16 characters."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes) or len(value) < 16:
        raise ValidationError("session_secret must be a string of at least 16 characters")
    return value


def _sign(secret: bytes, token: str) -> str:
    """The signature of a session token: HMAC-SHA256, URL-safe base64 without padding."""
    digest = hmac.new(secret, token.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _check_runner(runner: object) -> Runner:
    """``runner`` if it has the methods of :class:`batchtrack.typing.Runner`.

    Raises:
        ValidationError: A method is missing or not callable.
    """
    missing = [m for m in _RUNNER_METHODS if not callable(getattr(runner, m, None))]
    if missing:
        raise ValidationError(
            f"runner must be a batchtrack.typing.Runner (an Orchestrator, a CeleryRunner, or "
            f"any object with submit, resume and cancel methods); {type(runner).__name__} "
            f"has no {' or '.join(missing)} method"
        )
    return cast(Runner, runner)


def _results_of(runner: Runner) -> ResultFiles | None:
    """Where the runner's processor writes results (its ``results``, or its
    ``output_dir`` folder), if it says."""
    processor = getattr(runner, "processor", None)
    results = getattr(processor, "results", None)
    if isinstance(results, ResultFiles):
        return results
    output = getattr(processor, "output_dir", None)
    return result_files(output) if isinstance(output, (str, os.PathLike)) else None


@attrs.frozen
class _Read:
    """What one read of a batch gives an events stream: the next event and what decides
    whether to send it (made once per change when watchers share it)."""

    owner: str | None
    version: int
    final: bool
    expires_at: float  # by the tracker's clock
    chunk: bytes  # the event, ready to send


@attrs.define(eq=False)
class EventStream:
    """Server-sent events for one batch: a :class:`~batchtrack._wire.Stream`.

    On a store that can listen (:mod:`batchtrack._watch`) it reads the batch only when
    the store reports a change, and that read is shared by every stream of the process
    on the batch (made as a trusted reader; each stream checks the owner itself); in
    between it sends only keep-alives. On a store that cannot, and while the store's
    channel is down, it reads the batch every ``events_poll`` seconds. Either way no
    thread waits between two polls.

    The first event carries a ``retry:`` field (:data:`RETRY_MS`). A read that fails
    (the store is away) ends the stream with an ``unavailable`` event and that field
    again, so that a browser's ``EventSource`` reconnects once the delay is over.
    """

    api: Api
    batch_id: str
    owner: str
    delta: bool = False  # after the first event, only the items changed since the last
    version: int = -1  # of the last event sent; -1 before the first, -2 once final
    last_write: float = attrs.field(factory=time.monotonic)
    _subscription: Subscription | None = attrs.field(default=None, init=False)
    _seen: int = attrs.field(default=-1, init=False)  # the batch's change count when read
    _expires: float = attrs.field(default=math.inf, init=False)  # time.monotonic()'s

    @property
    def interval(self) -> float:
        if self.version == -2:
            return 0.0  # over: the next poll ends the response
        subscription = self._subscription
        if subscription is None or not subscription.live:
            return self.api.events_poll
        due = min(self.last_write + self.api.heartbeat, self._expires)
        return max(due - time.monotonic(), 0.0) + 0.001

    def open(self, wake: Callable[[], None]) -> None:
        self._subscription = subscribe(self.api.tracker.store, self.batch_id, wake)

    def close(self) -> None:
        if self._subscription is not None:
            self._subscription.close()

    def poll(self) -> list[bytes] | None:
        """The chunks to send now (maybe none); None when the stream is over."""
        if self.version == -2:
            return None
        subscription = self._subscription
        now = time.monotonic()
        try:
            if subscription is None or not subscription.live:
                read = self._read(self.owner)
            elif self._stale(subscription, now):
                read = self._shared(subscription)
            else:
                read = _UNCHANGED
        except StoreError as exc:  # the store is away: the browser comes back later
            self.version = -2
            return [self.api._stream_failed(self.batch_id, exc)]
        except Exception:  # a bug: logged, and the response still ends as it should
            log.exception("batchtrack: events of batch %s failed", self.batch_id)
            self.version = -2
            return [_sse_unavailable("internal", "internal error; it has been logged")]
        if read is None:
            return None
        if read is not _UNCHANGED:
            self.api._outages.answered(("store",))
            clock = self.api.tracker.clock()
            if read.expires_at <= clock:
                return None
            self._expires = now + (read.expires_at - clock)
            if read.version != self.version:
                first = self.version == -1
                self.version = -2 if read.final else read.version
                self.last_write = now
                # The first event also says how long to wait before reconnecting.
                return [read.chunk[:-1] + _RETRY if first else read.chunk]
        if now - self.last_write >= self.api.heartbeat:
            self.last_write = now
            return [b": keep-alive\n\n"]
        return []

    def _stale(self, subscription: Subscription, now: float) -> bool:
        """Whether what the stream sent may be out of date: a change was reported since,
        the batch may have expired, or there was no good read yet."""
        return self.version == -1 or subscription.changes != self._seen or now >= self._expires

    def _shared(self, subscription: Subscription) -> _Read | None:
        """The batch as it is since the last change reported, read once for all the
        process's streams that want the same event; None when it is not the caller's."""
        changes = subscription.changes
        self._seen = changes
        key = (self.delta, self._since())  # what the event holds
        read = subscription.shared(key, changes, lambda: self._read(None))
        return None if read is not None and read.owner != self.owner else read

    def _since(self) -> int | None:
        """The version whose changes the next event carries (None: the whole batch)."""
        return self.version if self.delta and self.version >= 0 else None

    def _read(self, owner: str | None) -> _Read | None:
        """Read the batch now, as ``owner`` (None: trusted); None when it is not found."""
        try:
            snap, expires_at = self.api.tracker._watched(self.batch_id, owner, self._since())
        except BatchNotFound:
            return None
        fields = snap.to_dict()
        if self.delta:
            fields["version"] = snap.version
        body = dumps(fields).decode()
        chunk = f"id: {snap.version}\ndata: {body}\n\n".encode()
        return _Read(snap.owner, snap.version, snap.status.is_final, expires_at, chunk)


_UNCHANGED = _Read(None, -1, False, math.inf, b"")
"""What :meth:`EventStream.poll` makes of a poll that reads nothing."""

RETRY_MS = 5000
"""The reconnection delay an events stream gives the browser (its ``retry:`` field), in
milliseconds: as long as the ``Retry-After`` of a 503."""


_RETRY = b"retry: %d\n\n" % RETRY_MS


def _sse_unavailable(code: str, message: str) -> bytes:
    """The last event of a stream that cannot go on: when to reconnect, and why."""
    body = dumps({"error": {"code": code, "message": message}}).decode()
    return f"retry: {RETRY_MS}\nevent: unavailable\ndata: {body}\n\n".encode()


# What each endpoint needs to answer well, by handler name (other endpoints: the store).
_BATCH_ID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_SERVED_BY = {
    "_upload": ("files", "full"),
    "_process_batch": ("store", "files"),
    "_batch_results": ("store", "files"),
    "_openapi": (),
    "_batch_events": (),  # its stream says, once it has read the batch
}


@attrs.define(eq=False)
class Api:
    """The router of the HTTP API over a tracker, a runner and an upload store.

    It maps every route to its endpoint, identifies the caller and turns every error into
    the JSON error body. Uploading, starting a batch, its status, events and results are its
    methods; cancel and retry live in
    :class:`~batchtrack._control.BatchControl`. See :func:`batchtrack.asgi.create_app`
    for the arguments.
    """

    tracker: BatchTracker
    runner: Runner = attrs.field(converter=_check_runner)
    uploads: UploadStore
    prefix: str = "/api"
    max_files: int = 10
    owner: Owner | None = None
    max_json_bytes: int = 64 * 1024
    secure_cookies: bool = False
    session_secret: bytes | None = attrs.field(default=None, converter=_secret)
    results_dir: ResultFiles | None = attrs.field(default=None, converter=result_files)
    events_poll: float = 0.5
    body_timeout: float = attrs.field(default=300.0, validator=_seconds)
    idle_timeout: float = attrs.field(default=30.0, validator=_seconds)
    upload_bytes_per_client: int | None = None
    upload_window: float = 3600.0
    client_key: ClientKey | None = None
    heartbeat: float = 15.0
    page: bool = False
    on_progress: Callable[[ProgressEvent], Any] | None = None
    trusted_origins: frozenset[str] = attrs.field(default=None, converter=parse_trusted_origins)
    metrics: bool | Metrics = False
    webhooks: tuple[Webhook, ...] = attrs.field(default=(), converter=tuple)
    _metrics: AppMetrics | None = attrs.field(init=False, default=None)
    # Started and stopped with the app's recovery (batchtrack._recovery).
    webhook_sender: WebhookSender | None = attrs.field(init=False, default=None)
    _page: Page | None = attrs.field(init=False, default=None)
    _outages: Outages = attrs.field(init=False, factory=Outages)
    _progress: dict[str, Any] = attrs.field(init=False, factory=dict)
    _routes: list[tuple[str, re.Pattern[str], Callable[..., Response]]] = attrs.field(
        init=False, factory=list
    )
    _control: BatchControl = attrs.field(init=False)
    _quota: UploadQuota | None = attrs.field(init=False, default=None)
    _status_prefix: str = attrs.field(init=False, default="")
    _version_of_async: Callable[[str], Awaitable[BatchVersion | None]] | None = attrs.field(
        init=False, default=None
    )
    _owner_async: bool = attrs.field(init=False, default=False)
    # Per batch: the ETag and JSON body of its last full status answer.
    _bodies: BodyCache = attrs.field(init=False, factory=lambda: BodyCache(_CACHED_BYTES))

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
        self._owner_async = self.owner is not None and is_async(self.owner)
        self._quota = _upload_quota(
            self.upload_bytes_per_client, self.upload_window, self.client_key
        )
        if self.results_dir is None:
            self.results_dir = _results_of(self.runner)
        self._progress = progress_hook(self.runner, self.on_progress)
        self._control = BatchControl(
            self.tracker, self.runner, self.uploads, self.prefix, self._progress
        )
        if self.page:
            self._page = Page(self.prefix, self.max_files, self.uploads.max_bytes)
        results_zip = ResultsZip(self.tracker, self.results_dir)
        self._status_prefix = f"{self.prefix}/batch-status/"
        self._version_of_async = getattr(self.tracker.store, "version_of_async", None)
        id_ = r"(?P<batch>[^/]+)"
        self._routes = [
            # The status first: it is polled every 2 seconds by every watching client.
            ("GET", re.compile(rf"/batch-status/{id_}"), self._batch_status),
            ("POST", re.compile(r"/upload"), self._upload),
            ("POST", re.compile(r"/process-batch"), self._process_batch),
            ("GET", re.compile(r"/batches"), self._list_batches),
            ("GET", re.compile(rf"/batch-events/{id_}"), self._batch_events),
            ("GET", re.compile(rf"/batch-results/{id_}\.zip"), results_zip.download),
            ("GET", re.compile(rf"/batch-results/{id_}/(?P<item>[^/]+)"), self._batch_results),
            ("POST", re.compile(rf"/batch-cancel/{id_}"), self._control.cancel),
            ("POST", re.compile(rf"/batch-retry/{id_}"), self._control.retry),
            ("POST", re.compile(rf"/batch-pause/{id_}"), self._control.pause),
            ("POST", re.compile(rf"/batch-unpause/{id_}"), self._control.unpause),
            ("GET", re.compile(r"/openapi\.json"), self._openapi),
        ]
        if self.metrics is not False and self.metrics is not None:  # GET /metrics, counts
            from .metrics import for_app

            self._metrics = for_app(self.metrics, self.tracker)
        if self.webhooks:  # POSTs when batches end, from the store's outbox
            from .webhooks import WebhookSender

            self.webhook_sender = WebhookSender(self.tracker, self.webhooks)

    # -- entry points ---------------------------------------------------------------------

    def body_limit(self, path: str) -> int:
        """How many body bytes a request to ``path`` may send."""
        if path == f"{self.prefix}/upload":
            return self.max_files * self.uploads.max_bytes + 64 * 1024
        return self.max_json_bytes

    @property
    def owner_is_async(self) -> bool:
        """Whether ``owner`` is an ``async def``: the ASGI app awaits it on its event loop
        (:meth:`identify_async`) and hands what it answered to :meth:`handle`."""
        return self._owner_async

    def answers_inline(self, request: Request) -> bool:
        """Whether ``request`` can be answered on the event loop without blocking it: a
        status read, when the tracker's store is a :class:`MemoryStore` (it never waits
        for I/O) and the caller is known by the session cookie or by an ``async def``
        owner, already awaited (a sync ``owner`` callable might block). Everything else
        runs in the app's threads."""
        return (
            request.method == "GET"
            and type(self.tracker.store) is MemoryStore
            and (self.owner is None or self._owner_async)
            and request.path.startswith(self._status_prefix)
        )

    async def kept_status_async(
        self, request: Request, identity: Identity | None
    ) -> Response | None:
        """The kept status body for ``request``, read on the event loop, or None: then
        :meth:`handle` answers it in a thread, as any other request.

        Only a ``GET``/``HEAD`` status poll without a query, of a store with an async
        version read (``version_of_async``: the Redis store's), from a caller known by
        an existing session cookie or an ``async def`` owner already awaited, with no
        metrics to count it, whose body is kept with the stamp of the batch's current
        version in this same second of the tracker's clock, for the same owner, before
        its expiry: the checks :meth:`_batch_status` makes, with one awaited read
        instead of a thread. Anything else, an error included, is None.
        """
        version_of = self._version_of_async
        if (
            version_of is None
            or self._metrics is not None
            or request.method not in ("GET", "HEAD")
            or request.query
            or not request.path.startswith(self._status_prefix)
        ):
            return None
        batch = request.path[len(self._status_prefix) :]
        made = self._bodies.stamped(batch)  # a well-formed id, or nothing is kept
        if made is None:
            return None
        if self.owner is None:
            try:
                owner, cookies = self._identify(request)
            except Exception:
                return None
            if cookies:  # a new session: it owns nothing yet, the thread says so
                return None
        elif identity is None or identity.error is not None or not identity.owner:
            return None
        else:
            owner = str(identity.owner)
        now = self.tracker.clock()
        try:
            head = await version_of(batch)
        except Exception:  # the thread reads again and maps the failure
            return None
        if (
            head is None
            or made[2] != (head.version, math.floor(now))
            or head.owner != owner
            or not head.expires_at > now
        ):
            return None
        self._outages.answered(("store",))
        return _status_answer(request, made[0], lambda: made[1])

    async def aclose(self) -> None:
        """Close what :meth:`kept_status_async` opened on the running event loop."""
        close = getattr(self.tracker.store, "aclose_async_reads", None)
        if close is not None:
            await close()

    async def identify_async(self, request: Request) -> Identity | None:
        """Await an ``async def`` owner for ``request``, on the event loop: what it
        answered or raised, for :meth:`handle`. None when the owner is not async or the
        request needs no owner (an unknown path, a wrong method, the page, the OpenAPI
        document), as the sync owner is not called for those either.

        With a sync owner, it notes the running loop (:data:`EVENT_LOOP`, in the
        request's context) for an owner that returns an awaitable.
        """
        if not self._owner_async:
            if self.owner is not None:
                EVENT_LOOP.set(asyncio.get_running_loop())
            return None
        if not self._needs_owner(request):
            return None
        assert self.owner is not None
        try:
            return Identity(await cast(Awaitable[object], self.owner(request.headers)))
        except Exception as exc:  # raised in handle, mapped as a sync owner's would be
            return Identity(error=exc)

    def _needs_owner(self, request: Request) -> bool:
        if self._page is not None and self._page.route(request.path):
            return False
        handler, _, _ = self._route(request)
        return handler is not None and handler != self._openapi

    def handle(self, request: Request, identity: Identity | None = None) -> Response:
        """Answer one request; never raises, never shows a traceback.

        Args:
            request: The request, its body received.
            identity: What an ``async def`` owner answered for it
                (:meth:`identify_async`); None: call the owner here when needed.
        """
        if self._metrics is not None:
            return self._metrics.handle(self, request, lambda r: self._answer(r, identity))
        return self._answer(request, identity)

    def route_of(self, request: Request) -> str:
        """The route pattern ``request`` matches, such as ``/api/batch-status/{batch}``
        (ids never appear); ``"other"`` when it matches none."""
        if self._page is not None and (shown := self._page.route(request.path)):
            return "/favicon.ico" if shown == "icon" else "/"
        handler, _, _ = self._route(request)
        for _, pattern, known in self._routes:
            if known == handler:
                template = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern.pattern)
                return self.prefix + template.replace("\\", "")
        return "other"

    def _answer(self, request: Request, identity: Identity | None = None) -> Response:
        cookie_headers: list[tuple[str, str]] = []
        if self._page is not None and (shown := self._page.route(request.path)):
            if request.method in ("GET", "HEAD"):
                return self._page.serve(request, shown)
            allow = [("Allow", "GET, HEAD")]
            return error_response(405, "method_not_allowed", "use GET or HEAD here", allow)
        try:
            handler, params, allowed = self._route(request)
            if handler is None:
                if allowed:
                    raise Reject(
                        405,
                        "method_not_allowed",
                        f"{request.method} is not allowed here; use {', '.join(allowed)}",
                        [("Allow", ", ".join(allowed))],
                    )
                reject(404, "not_found", f"no such endpoint: {request.path[:200]}")
            owner = None
            if handler != self._openapi:  # (a bound method: never "is" another)
                if self.owner is None:  # a session cookie: the browser sends it anyway
                    check_origin(request, self.trusted_origins)
                owner, cookie_headers = self._identify(request, identity)
            response = handler(request, owner, **params)
            if response.status < 400:
                self._outages.answered(_SERVED_BY.get(handler.__name__, ("store",)))
        except Reject as exc:
            response = error_response(exc.status, exc.code, exc.message, exc.headers)
        except BodyTooLarge:
            response = error_response(413, "too_large", "the request body is too large")
        except StoreError as exc:
            response = self._unavailable(request, exc)
        except Exception as exc:
            if disk_full(exc):  # a request body spooled to a full disk
                self._outages.failed("full", _what(request), exc)
                response = error_response(
                    507, "storage_full", "the server's disk is full; nothing was kept"
                )
            else:
                log.exception("batchtrack: %s %s failed", request.method, request.path[:200])
                response = error_response(500, "internal", "internal error; it has been logged")
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

    def _identify(
        self, request: Request, identity: Identity | None = None
    ) -> tuple[str, list[tuple[str, str]]]:
        if self.owner is not None:
            if identity is None:
                owner = _resolve(self.owner(request.headers))
            elif identity.error is not None:
                raise identity.error
            else:
                owner = identity.owner
            if not owner:
                reject(401, "unauthorized", "sign in to use this service")
            return str(owner), []
        for part in request.headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and (found := _COOKIE_VALUE.match(value)):
                token, signature = found.groups()
                if self.session_secret is None or (
                    signature is not None
                    and hmac.compare_digest(signature, _sign(self.session_secret, token))
                ):
                    return f"session:{token}", []
        token = value = secrets.token_hex(16)
        if self.session_secret is not None:
            value = f"{token}.{_sign(self.session_secret, token)}"
        attributes = f"{COOKIE}={value}; Path=/; HttpOnly; SameSite=Lax"
        if self.secure_cookies or request.scheme == "https":
            attributes += "; Secure"
        return f"session:{token}", [("Set-Cookie", attributes)]

    # -- endpoints ------------------------------------------------------------------------

    def _upload(self, request: Request, owner: str) -> Response:
        from ._multipart import read_uploads  # needs python-multipart: the server extra

        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            reject(415, "unsupported_media_type", "send the files as multipart/form-data")
        charge = _Charge(self._quota, self._client_key(request))
        writers: list[UploadWriter] = []
        stored: list[StoredFile] | None = None
        try:
            charge.check()
            read_uploads(request.body, content_type, self._begin(owner, writers, charge))
            if not writers:
                reject(400, "no_files", "no files were sent: use the field 'files'")
            stored = _commit(self.uploads, writers)
        except FileTooLarge as exc:
            _abort(writers)
            reject(413, "too_large", f"{exc.filename} is larger than {exc.limit:,} bytes")
        except StorageFull as exc:
            _abort(writers)
            reject(507, "storage_full", f"{exc}; nothing of this request was kept")
        except QuotaExceeded as exc:
            _abort(writers)
            raise Reject(
                429,
                "too_many_uploads",
                f"one client may upload at most {exc.limit:,} bytes per {exc.window:g} s; "
                f"try again in {exc.retry_after} s (nothing of this request was kept)",
                [("Retry-After", str(exc.retry_after))],
            ) from None
        except (Reject, BodyTooLarge):
            _abort(writers)
            raise
        except ValueError as exc:
            _abort(writers)
            reject(400, "bad_multipart", f"the multipart body is malformed: {exc}")
        except BaseException:
            _abort(writers)
            raise
        finally:
            charge.end(kept=stored is not None)
        return json_response(
            201, {"files": [{"id": f.id, "filename": f.filename, "size": f.size} for f in stored]}
        )

    def _begin(
        self, owner: str, writers: list[UploadWriter], charge: _Charge
    ) -> Callable[[str, str], UploadWriter | _Charged | None]:
        def begin(field: str, filename: str) -> UploadWriter | _Charged | None:
            if field != "files" or not filename:
                return None  # other fields, and empty file inputs, are ignored
            if len(writers) >= self.max_files:
                reject(400, "too_many_files", f"at most {self.max_files} files per request")
            try:
                writer = self.uploads.begin(filename, owner=owner)
            except ValidationError as exc:
                reject(400, "bad_filename", str(exc))
            writers.append(writer)
            return writer if charge.quota is None else _Charged(writer, charge)

        return begin

    def _client_key(self, request: Request) -> str | None:
        """Who the upload quota counts this request against; None: not counted."""
        if self._quota is None:
            return None
        if self.client_key is None:
            return _address_key(request.client)
        key = self.client_key(request.headers, request.client)
        return None if key is None else str(key)

    def _process_batch(self, request: Request, owner: str) -> Response:
        key = request.headers.get("idempotency-key")
        keyed: dict[str, Any] = {}
        if key is not None:
            try:
                keyed["key"] = _keys.check_key(key)
            except ValidationError as exc:
                reject(400, "bad_idempotency_key", f"the Idempotency-Key header is bad: {exc}")
            if not _keys.takes_key(self.runner.submit):
                reject(
                    501,
                    "idempotency_not_supported",
                    f"this server's runner ({type(self.runner).__name__}) takes no "
                    "idempotency keys; send the request without Idempotency-Key",
                )
        payload = read_json(request)
        ids = payload.get("fileIds") if isinstance(payload, dict) else None
        if not isinstance(payload, dict) or "fileIds" not in payload:
            reject(400, "missing_file_ids", 'send {"fileIds": [...]}')
        if not isinstance(ids, list) or not ids:
            reject(400, "bad_file_ids", "fileIds must be a non-empty list of file ids")
        if len(ids) > self.max_files:
            reject(400, "too_many_files", f"at most {self.max_files} files per batch")
        if not all(isinstance(i, str) for i in ids):
            reject(400, "bad_file_ids", "every file id must be a string")
        normal = [check_uuid(i, "every file id") for i in ids]
        if len(set(normal)) != len(normal):
            reject(400, "duplicate_file_ids", "a file id appears more than once")
        if payload.get("metadata") is not None:
            meta = payload["metadata"]
            if not isinstance(meta, dict):
                reject(
                    400,
                    "bad_metadata",
                    f"metadata must be an object of strings, not {_json_kind(meta)}",
                )
            for key, value in meta.items():
                if not isinstance(value, str):
                    reject(
                        400,
                        "bad_metadata",
                        f"metadata value of {key!r} must be a string, not {_json_kind(value)}",
                    )
            try:
                keyed["metadata"] = dict(check_metadata(meta))
            except ValidationError as exc:
                reject(400, "bad_metadata", str(exc))
            if not _takes(self.runner.submit, "metadata"):
                reject(
                    501,
                    "metadata_not_supported",
                    f"this server's runner ({type(self.runner).__name__}) takes no "
                    "metadata; send the request without it",
                )
        try:
            files = [self.uploads.get(i, owner=owner) for i in normal]
        except FileNotFound as exc:
            reject(404, "file_not_found", f"no uploaded file {exc.file_id!r} (expired?)")
        try:
            # A str source is stored with the item, so that retry and resume find it.
            snap = self.runner.submit(
                [Item(f.filename, source=f.location) for f in files],
                owner=owner,
                **keyed,
                **self._progress,
            )
        except _keys.KeyConflict:
            reject(
                409,
                "idempotency_conflict",
                f"the Idempotency-Key {key!r} was used for other fileIds; "
                "send a new key for a new batch",
            )
        except OrchestratorClosed:
            reject(503, "shutting_down", "the service is shutting down; try again shortly")
        url = status_url(request, self.prefix, snap.batch_id)
        return json_response(
            202,
            {"batchId": snap.batch_id, "status": snap.status.value, "statusUrl": url},
            [("Location", url)],
        )

    def _list_batches(self, request: Request, owner: str) -> Response:
        given = query_parameters(request, frozenset({"status", "limit", "after"}))
        status = None
        if "status" in given:
            try:
                status = Status(given["status"])
            except ValueError:
                names = ", ".join(s.value for s in Status)
                reject(
                    400,
                    "invalid_query",
                    f"status must be one of {names}, got {given['status'][:40]!r}",
                )
        limit = whole_number(given["limit"], "limit", 1, MAX_LIMIT) if "limit" in given else 100
        after = given.get("after")
        if after is not None:
            if not _BATCH_ID.fullmatch(after):
                reject(
                    400, "invalid_query", f"after must be a batch id (a UUID), got {after[:80]!r}"
                )
            after = after.lower()
        try:
            page = self.tracker.list_batches(owner=owner, status=status, limit=limit, after=after)
        except ValidationError:
            # The only check left to the tracker: a well-formed id that names none of the
            # caller's batches (as batch-status answers an unknown image's after).
            reject(
                404,
                "after_not_found",
                "after names none of your batches (unknown, or removed since): "
                "start again from the first page",
            )
        batches = []
        for snap in page.batches:
            body = snap._body([])
            del body["images"]
            batches.append(body)
        return json_response(
            200,
            {"batches": batches, "nextAfter": page.next_after},
            [("Cache-Control", "no-store")],
        )

    def _batch_status(self, request: Request, owner: str, batch: str) -> Response:
        batch_id = check_uuid(batch, "batchId")
        # A body is kept per batch and query (a page, a status, a since), stamped with the
        # batch version it shows and the whole second of the tracker's clock its ETA was
        # computed in. While the version is the same in that same second, the answer is
        # that body again: one light read (version, owner, expiry) and nothing else.
        key = f"{batch_id}?{request.query}" if request.query else batch_id
        now = self.tracker.clock()
        second = math.floor(now)
        made = self._bodies.stamped(key)
        if made is not None:
            head = self.tracker.store.version_of(batch_id)
            if (
                head is not None
                and made[2] == (head.version, second)
                and head.owner == owner
                and head.expires_at > now
            ):
                return _status_answer(request, made[0], lambda: made[1])
        if request.query:
            snap = find_items(self.tracker, batch_id, owner, request)
            tag = _etag(snap.version, snap.estimated_time_remaining, snap.eta_range)
            return self._made(request, key, tag, (snap.version, second), snap)
        # The counts, version and ETA cost the same for any batch: enough to answer 304,
        # or with the body made for this same state before.
        try:
            version, eta, eta_range = self.tracker._state(batch_id, owner)
        except BatchNotFound:
            batch_not_found()
        tag = _etag(version, eta, eta_range)
        if made is not None and made[0] == tag:
            self._bodies.put(key, tag, made[1], (version, second))
            return _status_answer(request, tag, lambda: made[1])
        if _not_modified(request, tag):
            return _status_answer(request, tag, lambda: b"")
        snap = find_batch(self.tracker, batch_id, owner)
        # It may have moved on since the state was read.
        tag = _etag(snap.version, snap.estimated_time_remaining, snap.eta_range)
        return self._made(request, key, tag, (snap.version, second), snap)

    def _made(
        self, request: Request, key: str, tag: str, stamp: tuple[int, int], snap: BatchSnapshot
    ) -> Response:
        """The status answer for ``snap``; its body kept under ``key`` (when it is made:
        not for a 304) with ``stamp``, for the next polls of the same state."""
        if _not_modified(request, tag):
            return _status_answer(request, tag, lambda: b"")
        body = status_body(snap)
        if len(body) <= _CACHED_BODY_BYTES:
            self._bodies.put(key, tag, body, stamp)
        return _status_answer(request, tag, lambda: body)

    def _batch_events(self, request: Request, owner: str, batch: str) -> Response:
        delta = wants_delta(request)
        headers = [
            ("Content-Type", "text/event-stream"),
            ("Cache-Control", "no-store"),
            ("X-Accel-Buffering", "no"),
        ]
        try:
            batch_id = find_batch(self.tracker, batch, owner, items=False).batch_id
        except StoreError as exc:
            if "text/event-stream" not in request.headers.get("accept", ""):
                raise
            # An EventSource gives up for good on an answer that is not a stream (a 503):
            # this one tells it to come back later instead.
            return Response(200, headers, self._stream_failed(batch, exc))
        return Response(200, headers, stream=EventStream(self, batch_id, owner, delta=delta))

    def _stream_failed(self, batch_id: str, exc: StoreError) -> bytes:
        """The last event of a stream of ``batch_id`` whose store is away (logged once)."""
        self._outages.failed("store", f"events of batch {batch_id[:40]}", exc)
        return _sse_unavailable(
            "store_unavailable",
            f"the batch store cannot be reached just now; reconnect in {RETRY_MS // 1000} s",
        )

    def _batch_results(self, request: Request, owner: str, batch: str, item: str) -> Response:
        snap = find_batch(self.tracker, batch, owner)
        item_id = check_uuid(item, "itemId")
        found = next((i for i in snap.items if i.id == item_id), None)
        if found is None or found.status.value != "completed":
            reject(404, "result_not_found", "no processed file for this item (yet)")
        results = self.results_dir
        key = results.find(item_id) if results is not None else None
        if results is None or key is None:
            reject(404, "result_not_found", "the processed file is not available")
        try:
            data = results.storage.read_bytes(key)
        except FileNotFoundError:  # removed with its batch meanwhile
            reject(404, "result_not_found", "the processed file is not available")
        suffix = PurePosixPath(key).suffix
        name = Path(found.filename).stem + suffix
        kind = mimetypes.guess_type(f"x{suffix}")[0] or "application/octet-stream"
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

    def _unavailable(self, request: Request, exc: StoreError) -> Response:
        """503 for a store or file storage that cannot be reached: nothing was changed.

        Logged once per outage (see :class:`~batchtrack._outages.Outages`), not once per request.
        """
        if isinstance(exc, FileStorageError):
            if exc.full:
                self._outages.failed("full", _what(request), exc)
                return error_response(507, "storage_full", "the file storage is full")
            self._outages.failed("files", _what(request), exc)
            code, what = "storage_unavailable", "the file storage"
        else:
            self._outages.failed("store", _what(request), exc)
            code, what = "store_unavailable", "the batch store"
        if isinstance(exc, DatabaseDamaged):
            # Not a passing outage: the operator must repair the file (the log says how).
            return error_response(
                503, code, "the batch store is damaged and needs repair; nothing was changed"
            )
        return error_response(
            503,
            code,
            f"{what} cannot be reached just now; nothing was changed, try again shortly",
            [("Retry-After", str(RETRY_MS // 1000))],
        )

    def _openapi(self, request: Request, owner: str | None) -> Response:
        from ._openapi import document

        base = f"{request.root_path}{self.prefix}"
        return json_response(200, document(base, self.max_files, self.max_json_bytes))


_CACHED_BYTES = 8 * 2**20  # status bodies kept (one per batch), in all at most this
_CACHED_BODIES = 2048  # and at most this many: small ones still cost their objects
_ENTRY_BYTES = 256  # what an entry's objects cost beyond its text, as counted
_CACHED_BODY_BYTES = 32 * 1024  # bigger ones are joined from cached item JSON anyway


class BodyCache:
    """Per batch (and query), the ETag and JSON body of its last full status answer, and
    the stamp that says which state it shows, least recently used first: at most
    ``max_entries`` of them, whose bodies, keys and tags (plus ``_ENTRY_BYTES`` each for
    their objects) never add up to more than ``max_bytes``; the least recently used go
    first. Thread-safe."""

    def __init__(self, max_bytes: int, max_entries: int = _CACHED_BODIES) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[str, bytes, object]] = OrderedDict()
        self._bytes = 0

    @property
    def held(self) -> int:
        """What the kept entries are counted as (key, tag and body lengths, and objects)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> tuple[str, bytes] | None:
        """The ETag and body kept under ``key``, or None."""
        entry = self.stamped(key)
        return None if entry is None else (entry[0], entry[1])

    def stamped(self, key: str) -> tuple[str, bytes, object] | None:
        """The ETag, body and stamp kept under ``key``, or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, tag: str, body: bytes, stamp: object = None) -> None:
        """Keep ``tag`` and ``body`` under ``key``, with ``stamp`` (what state they show)."""
        cost = _cost(key, tag, body)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= _cost(key, old[0], old[1])
            if cost > self.max_bytes:
                return
            while self._entries and (
                self._bytes + cost > self.max_bytes or len(self._entries) >= self.max_entries
            ):
                gone, entry = self._entries.popitem(last=False)
                self._bytes -= _cost(gone, entry[0], entry[1])
            self._entries[key] = (tag, body, stamp)
            self._bytes += cost


def _json_kind(value: object) -> str:
    """What a parsed JSON value is, in JSON's words (for messages to JSON clients)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _takes(method: object, name: str) -> bool:
    """Whether a runner's ``submit`` accepts the keyword argument ``name`` (runners
    written before it existed do not: the HTTP API then refuses requests that need it)."""
    try:
        parameters = inspect.signature(method).parameters.values()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return any(
        (p.name == name and p.kind is not p.POSITIONAL_ONLY) or p.kind is p.VAR_KEYWORD
        for p in parameters
    )


def _cost(key: str, tag: str, body: bytes) -> int:
    """What a cached status body counts for against the cache's byte cap."""
    return len(key) + len(tag) + len(body) + _ENTRY_BYTES


def _what(request: Request) -> str:
    """The request, as the log names it."""
    return f"{request.method} {request.path[:200]}"


def _etag(version: int, eta: int | None, eta_range: tuple[int, int] | None) -> str:
    """The status body's ETag: what changes it is the version and the ETA."""
    low, high = eta_range or ("", "")
    return f'"{version}.{eta}.{low}-{high}"'


def _not_modified(request: Request, etag: str) -> bool:
    """Whether the client already has ``etag`` (its ``If-None-Match``)."""
    wanted = request.headers.get("if-none-match")
    if not wanted:
        return False
    return wanted.strip() == "*" or etag in [
        t.strip().removeprefix("W/") for t in wanted.split(",")
    ]


def _status_answer(request: Request, etag: str, body: Callable[[], bytes]) -> Response:
    """304 when the client has ``etag``, else 200 with ``body()``."""
    headers = [("ETag", etag), ("Cache-Control", "no-store")]
    if _not_modified(request, etag):
        return Response(304, headers)
    data = body()
    headers += [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    return Response(200, headers, data)


def _abort(writers: list[UploadWriter]) -> None:
    for writer in writers:
        writer.abort()


def _commit(uploads: UploadStore, writers: list[UploadWriter]) -> list[StoredFile]:
    """Keep every upload of a request, or none: one that cannot be kept undoes the others."""
    stored: list[StoredFile] = []
    try:
        for writer in writers:
            stored.append(writer.commit())
    except BaseException:
        _abort(writers)
        for done in stored:
            uploads.delete(done.id)
        raise
    return stored


def _upload_quota(per_client: object, window: object, client_key: object) -> UploadQuota | None:
    """The per-client quota the options ask for, or None.

    Raises:
        ValidationError: A bad ``upload_bytes_per_client``, ``upload_window`` or
            ``client_key``.
    """
    if per_client is not None and (
        isinstance(per_client, bool) or not isinstance(per_client, int) or per_client < 1
    ):
        raise ValidationError(
            f"upload_bytes_per_client must be None or a whole number of bytes >= 1, "
            f"not {per_client!r}"
        )
    if (
        isinstance(window, bool)
        or not isinstance(window, (int, float))
        or not 0 < window < math.inf
    ):
        raise ValidationError(f"upload_window must be a positive number of seconds, not {window!r}")
    if client_key is not None and not callable(client_key):
        raise ValidationError("client_key must be a callable taking (headers, client address)")
    return None if per_client is None else UploadQuota(per_client, window)


def _address_key(client: str | None) -> str:
    """The quota key of a peer address.

    An IPv4 address is itself; an IPv6 address is the /64 it is in (one host usually has a
    whole /64); no address at all (a Unix socket) is ``"unknown"``.
    """
    if not client:
        return "unknown"
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@attrs.define(eq=False)
class _Charge:
    """What one upload request counts against its client's quota (nothing without one)."""

    quota: UploadQuota | None
    key: str | None
    nbytes: int = 0

    def check(self) -> None:
        """Raise :class:`QuotaExceeded` when the client has no room left at all."""
        if self.quota is not None and self.key is not None:
            self.quota.check(self.key)

    def add(self, nbytes: int) -> None:
        """Count ``nbytes`` more, or raise :class:`QuotaExceeded`."""
        if self.quota is not None and self.key is not None:
            self.quota.reserve(self.key, nbytes)
            self.nbytes += nbytes

    def end(self, *, kept: bool) -> None:
        """The request is over: its bytes count in the window when ``kept``."""
        if self.quota is not None and self.key is not None:
            self.quota.release(self.key, self.nbytes, kept=kept)
            self.nbytes = 0


@attrs.define(eq=False)
class _Charged:
    """An upload's sink that counts each chunk against the client's quota first."""

    writer: UploadWriter
    charge: _Charge

    def write(self, data: bytes) -> None:
        self.charge.add(len(data))
        self.writer.write(data)
