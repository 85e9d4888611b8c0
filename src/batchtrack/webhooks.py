"""Signed webhooks when a batch ends, delivered at least once from the store's outbox.

When a transition ends a batch (every item final), the store writes an *end marker* in the
same atomic step (:meth:`batchtrack.stores.base.Store.apply`), so a process killed right
after the last item loses nothing. A :class:`WebhookSender`, running on a thread of its
own in any process that shares the store (``create_app(webhooks=[...])`` and
``batchtrack serve --webhook URL`` start one), claims each marker under a lease, turns it
into one delivery per matching :class:`Webhook` (the body is made then, from the batch as
the store holds it), and POSTs each, signed as the `Standard Webhooks
<https://www.standardwebhooks.com/>`_ specification says::

    webhook-id: msg_<batch id>_<version>_<hash of the URL>   (the same on every attempt)
    webhook-timestamp: <seconds since the epoch, of this attempt>
    webhook-signature: v1,<base64 of HMAC-SHA256(key, "{id}.{timestamp}.{body}")>

where ``key`` is the base64 after ``whsec_`` in the secret. The body::

    {"type": "batch.completed" | "batch.cancelled" | "batch.failed",
     "batchId": ..., "status": ..., "progress": {...}, "metadata": {...}}

A 2xx answer settles a delivery; 410 Gone unsubscribes its URL (kept in the store, so
every process and restart honours it); anything else (another status, a timeout, a
refused connection, garbage) is retried after the next delay of the schedule
(:data:`DEFAULT_SCHEDULE`: 5 s, then doubling up to 3 h apart, for about a day), then
given up with an error in the log. Delivery is *at least once*: a sender killed while it
holds a delivery leaves it to be claimed again when its lease runs out, so receivers
dedupe by ``webhook-id``. Transitions and requests never wait for a receiver: they write a
marker at most; the sender's requests time out after ``timeout`` seconds.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import http.client
import json
import logging
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence

import attrs

from ._models import Status
from ._tracker import BatchTracker
from .exceptions import ValidationError
from .stores.base import OutboxEntry, Store

__all__ = ["DEFAULT_SCHEDULE", "Webhook", "WebhookSender", "schedule_of", "sign"]

log = logging.getLogger("batchtrack")

_TYPES = {
    Status.COMPLETED: "batch.completed",
    Status.CANCELLED: "batch.cancelled",
    Status.FAILED: "batch.failed",
}


def schedule_of(
    first: float = 5.0, longest: float = 3 * 3600.0, total: float = 86400.0
) -> tuple[float, ...]:
    """Retry delays: ``first``, then doubling, none longer than ``longest``, while their
    sum stays within ``total`` seconds."""
    delays: list[float] = []
    delay = first
    while sum(delays) + delay <= total:
        delays.append(delay)
        delay = min(delay * 2, longest)
    return tuple(delays)


DEFAULT_SCHEDULE = schedule_of()
"""The seconds to wait before each retry: 5, 10, 20, … 10,240, then every 3 hours; 18
retries over about 23.7 hours after the first attempt."""


def _key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret.

    Raises:
        ValidationError: The secret is not ``whsec_`` followed by base64 of 24 to 64 bytes.
    """
    if not isinstance(secret, str) or not secret.startswith("whsec_"):
        raise ValidationError("a webhook secret must look like whsec_<base64>")
    try:
        key = base64.b64decode(secret[6:], validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError("a webhook secret must be whsec_ then base64") from None
    if not 24 <= len(key) <= 64:
        raise ValidationError(
            f"a webhook secret must hold 24 to 64 bytes after whsec_, not {len(key)}"
        )
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header of a message: ``v1,`` and the base64 HMAC-SHA256
    of ``"{msg_id}.{timestamp}.{body}"`` under the secret's key."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def _check_url(instance: object, attribute: attrs.Attribute[str], url: str) -> None:
    if not isinstance(url, str):
        raise ValidationError(f"a webhook URL must be a string, not {type(url).__name__}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError(f"a webhook URL must be http(s)://host/..., not {url!r}")
    try:
        port = parts.port  # urllib checks the port only when asked
    except ValueError:
        port = 0
    if port == 0:
        raise ValidationError(f"a webhook URL's port must be 1 to 65535, in {url!r}")
    if not (url.isascii() and url.isprintable()) or " " in url:
        raise ValidationError(
            f"a webhook URL must be printable ASCII without spaces (percent-encoded), not {url!r}"
        )


def _check_secret(instance: object, attribute: attrs.Attribute[str], secret: str) -> None:
    _key(secret)


@attrs.frozen
class Webhook:
    """A URL that gets a signed POST when a batch ends.

    Attributes:
        url: Where to POST (http or https).
        secret: ``whsec_`` and the base64 of 24 to 64 random bytes, known to the receiver.
        owner: Only batches of this owner (None: every batch).

    Raises:
        ValidationError: A bad URL or secret.
    """

    url: str = attrs.field(validator=_check_url)
    secret: str = attrs.field(validator=_check_secret, repr=False)
    owner: str | None = None


def _connection(
    url: str, headers: dict[str, str], timeout: float
) -> tuple[http.client.HTTPConnection, str, dict[str, str]]:
    """The connection, request target and headers of a POST to ``url`` (through the
    proxy the environment names, as urllib does).

    Raises:
        ValueError: A proxy setting that is not a URL.
    """
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection: http.client.HTTPConnection
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and urllib.request.proxy_bypass(host):
        proxy = None
    proxy = proxy or ""
    through = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    proxy_host = through.hostname or ""
    tunnel: dict[str, str] = {}
    if proxy and through.username is not None:
        login = f"{urllib.parse.unquote(through.username)}:"
        login += urllib.parse.unquote(through.password or "")
        tunnel["Proxy-Authorization"] = "Basic " + base64.b64encode(login.encode()).decode()
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(
            proxy_host if proxy else host,
            (through.port or 80) if proxy else port,
            timeout=timeout,
            context=ssl.create_default_context(),
        )
        if proxy:
            connection.set_tunnel(host, port, headers=tunnel)
    elif proxy:
        connection = http.client.HTTPConnection(proxy_host, through.port or 80, timeout=timeout)
        target = urllib.parse.urlunsplit(parts._replace(fragment=""))
        headers = {**headers, **tunnel}
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    return connection, target, headers


def _connector(deadline: float) -> Callable[..., socket.socket]:
    """``socket.create_connection`` with its name lookup bounded by ``deadline`` (a
    :func:`time.monotonic` time). ``getaddrinfo`` cannot be interrupted, so it runs on a
    thread of its own, left to the resolver's own time-outs when it takes too long: a
    receiver whose DNS hangs does not hold the sender past the attempt's timeout."""

    def connect(
        address: tuple[str, int], timeout: float | None, source: tuple[str, int] | None = None
    ) -> socket.socket:
        host, port = address
        found: list[list[tuple[int, int, int, str, tuple[object, ...]]] | OSError] = []
        done = threading.Event()

        def lookup() -> None:
            try:
                found.append(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))  # type: ignore[arg-type]
            except OSError as exc:
                found.append(exc)
            done.set()

        threading.Thread(target=lookup, name="batchtrack-webhook-lookup", daemon=True).start()
        if not done.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"looking up {host} timed out")
        if isinstance(found[0], OSError):
            raise found[0]
        failure: OSError = OSError(f"no address for {host}")
        for family, kind, proto, _, where in found[0]:
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(timeout)
                if source:
                    sock.bind(source)
                sock.connect(where)
                return sock
            except OSError as exc:
                sock.close()
                failure = exc
        raise failure

    return connect


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    """POST and answer the status code (0: no answer at all). ``timeout`` bounds the
    whole attempt, not only each socket operation: the name lookup gives up when the time
    is up, and a receiver that trickles its answer a byte at a time is cut off (its
    socket shut down). A redirect is an answer like any other that is not 2xx (not
    followed: retried)."""
    try:
        connection, target, headers = _connection(url, headers, timeout)
    except ValueError as exc:
        log.info("batchtrack: webhook %s: %s", url, exc)
        return 0
    connection._create_connection = _connector(time.monotonic() + timeout)  # type: ignore[attr-defined]
    expired = threading.Event()

    def cut_off() -> None:
        expired.set()
        sock = connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(timeout, cut_off)
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.request("POST", target, body=body, headers=headers)
        response = connection.getresponse()
        response.read(65536)
        return 0 if expired.is_set() else int(response.status)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        log.info("batchtrack: webhook %s: %s", url, "timed out" if expired.is_set() else exc)
        return 0
    except Exception:  # garbage the HTTP client chokes on
        log.info("batchtrack: webhook %s: no answer", url, exc_info=True)
        return 0
    finally:
        watchdog.cancel()
        connection.close()


class WebhookSender:
    """Delivers the webhooks of a tracker's store (see the module).

    Several processes may run one on the same store: a lease makes exactly one of them
    handle each attempt at a time. :meth:`start` and :meth:`stop` are thread-safe.

    Args:
        tracker: Whose store holds the outbox (times come from its clock).
        webhooks: Where to send.
        schedule: The seconds to wait before each retry (:data:`DEFAULT_SCHEDULE`); after
            the last one a delivery is given up.
        timeout: Seconds an attempt may take (connect, send, answer).
        poll: Seconds between looks at the outbox when it has nothing due.

    Raises:
        ValidationError: A bad webhook, schedule, timeout or poll, or a store without an
            outbox.
    """

    def __init__(
        self,
        tracker: BatchTracker,
        webhooks: Iterable[Webhook],
        *,
        schedule: Sequence[float] = DEFAULT_SCHEDULE,
        timeout: float = 10.0,
        poll: float = 1.0,
    ) -> None:
        self.webhooks = tuple(webhooks)
        for hook in self.webhooks:
            if not isinstance(hook, Webhook):
                raise ValidationError(
                    f"webhooks must be batchtrack.webhooks.Webhook, not {type(hook).__name__}"
                )
        self.schedule = tuple(schedule)
        if any(not isinstance(d, int | float) or not d > 0 for d in self.schedule):
            raise ValidationError("schedule must be positive numbers of seconds")
        for name, value in (("timeout", timeout), ("poll", poll)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValidationError(f"{name} must be a positive number of seconds")
        self.tracker = tracker
        self.store = tracker.store
        self.timeout = float(timeout)
        self.poll = float(poll)
        self._clock: Callable[[], float] = tracker.clock
        # One delivery per URL and batch end: the hooks of a URL share its secret, and
        # the URL hears of a batch when any of them matches the batch's owner.
        self._by_url: dict[str, list[Webhook]] = {}
        for hook in self.webhooks:
            same = self._by_url.setdefault(hook.url, [])
            if same and same[0].secret != hook.secret:
                raise ValidationError(
                    f"webhook {hook.url!r} is registered with two secrets: give it one"
                )
            same.append(hook)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        inner = getattr(self.store, "inner", self.store)  # an InstrumentedStore's own
        if type(inner).outbox_claim is Store.outbox_claim:
            raise ValidationError(
                f"{type(inner).__name__} has no outbox: webhooks need a store that "
                "keeps one (every built-in store does)"
            )

    def start(self) -> None:
        """Start delivering on a daemon thread (once; nothing after :meth:`stop`)."""
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(
                target=self._loop, name="batchtrack-webhooks", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop, waiting a moment (2 s at most) for an attempt in progress: a receiver
        that hangs does not hold up a shutdown, and an attempt cut short is made again
        once its lease runs out."""
        with self._lock:
            self._stop.set()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(min(self.timeout, 2.0))

    def _loop(self) -> None:
        try:
            gone = self.store.outbox_unsubscribed()
        except Exception:  # said again by the first round that fails
            gone = frozenset()
        for url in sorted(gone & self._by_url.keys()):
            log.warning(
                "batchtrack: webhook %s answered 410 before: it is unsubscribed and gets "
                "nothing (register another URL to receive again)",
                url,
            )
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # the store may be back next round
                log.warning("batchtrack: webhook round failed", exc_info=True)
            self._stop.wait(self.poll)

    def run_once(self) -> int:
        """Handle every outbox entry due now (markers and deliveries); return how many."""
        handled = 0
        gone = self.store.outbox_unsubscribed()
        while not self._stop.is_set():
            now = self._clock()
            # The lease outlasts an attempt (its timeout bounds each socket operation).
            claimed = self.store.outbox_claim(now, 1, now + 2 * self.timeout + 5)
            if not claimed:
                return handled
            entry = claimed[0]
            handled += 1
            if entry.url is None:
                self._expand(entry, gone, now)
            elif entry.url in gone:
                self.store.outbox_done(entry.entry_id)
            elif self._deliver(entry) == 410:
                gone = self.store.outbox_unsubscribed()
        return handled

    def _expand(self, marker: OutboxEntry, gone: frozenset[str], now: float) -> None:
        """Turn an end marker into its deliveries (or drop it: nothing to tell)."""
        record = self.store.load(marker.batch_id, items=False)
        kind = None if record is None else _TYPES.get(record.progress.status)
        if record is None or kind is None or record.finished_at != marker.ended_at:
            # Removed, or open again (retried) or ended again since: that end has a marker.
            self.store.outbox_done(marker.entry_id)
            return
        body = json.dumps(
            {
                "type": kind,
                "batchId": record.batch_id,
                "status": record.progress.status.value,
                "progress": record.progress.to_dict(),
                "metadata": dict(record.metadata),
            },
            separators=(",", ":"),
        )
        deliveries = [
            OutboxEntry(
                _msg_id(record.batch_id, marker.version, url),
                record.batch_id,
                marker.version,
                marker.ended_at,
                url,
                body,
            )
            for url, hooks in self._by_url.items()
            if url not in gone
            and any(hook.owner is None or hook.owner == record.owner for hook in hooks)
        ]
        self.store.outbox_expand(marker.entry_id, deliveries, now)

    def _deliver(self, entry: OutboxEntry) -> int:
        """One attempt at a delivery, settled in the store; answer the status (0: none)."""
        assert entry.url is not None
        assert entry.body is not None
        hooks = self._by_url.get(entry.url)
        if not hooks:
            log.warning(
                "batchtrack: webhook %s is no longer registered: dropped %s",
                entry.url,
                entry.entry_id,
            )
            self.store.outbox_done(entry.entry_id)
            return 0
        body = entry.body.encode()
        timestamp = int(time.time())
        status = _post(
            entry.url,
            body,
            {
                "content-type": "application/json",
                "user-agent": "batchtrack-webhooks",
                "webhook-id": entry.entry_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(hooks[0].secret, entry.entry_id, timestamp, body),
            },
            self.timeout,
        )
        if 200 <= status < 300:
            self.store.outbox_done(entry.entry_id)
        elif status == 410:
            log.info("batchtrack: webhook %s answered 410: unsubscribed", entry.url)
            self.store.outbox_unsubscribe(entry.url)
        else:
            attempts = entry.attempts + 1
            if attempts > len(self.schedule):
                log.error(
                    "batchtrack: webhook %s gave up on %s after %d attempts",
                    entry.url,
                    entry.entry_id,
                    attempts,
                )
                self.store.outbox_done(entry.entry_id)
            else:
                delay = self.schedule[attempts - 1]
                self.store.outbox_retry(entry.entry_id, attempts, self._clock() + delay)
        return status


def _msg_id(batch_id: str, version: int, url: str) -> str:
    """The ``webhook-id`` of a batch end's delivery to ``url``: the same for every
    attempt and every process."""
    return f"msg_{batch_id}_{version}_{hashlib.sha256(url.encode()).hexdigest()[:16]}"
