"""Prometheus metrics of items, batches, the store and the HTTP API.

Needs the ``metrics`` extra (``prometheus-client``); ``import batchtrack`` never
imports it. In the spirit of
stamina's instrumentation, nothing here touches the tracker's rules: a :class:`Metrics`
wraps a tracker's store in an :class:`InstrumentedStore`, which times every store call
and reads each transition the store reports as applied (so an event is counted once, by
the process that applied it, whichever process or host started the batch). The HTTP app
counts its requests by route pattern and answers ``GET /metrics``
(``create_app(metrics=True)``). What the store holds (open batches, running and pending
items) is read from the store when Prometheus scrapes, never kept as counters that drift
between processes.

Every metric's name starts with ``batchtrack_``; see :doc:`/operating` for the list and
for several processes (``PROMETHEUS_MULTIPROC_DIR``). What goes wrong in here is logged,
never raised into a batch.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.registry import Collector
except ImportError as exc:
    from ._extras import missing

    raise ImportError(
        missing("batchtrack.metrics", "prometheus-client", "metrics"), name="prometheus_client"
    ) from exc

import attrs

from ._models import ItemSnapshot, Progress, Status
from ._tracker import BatchTracker
from ._wire import Request, Response, error_response
from .exceptions import ValidationError
from .stores.base import (
    BatchRecord,
    BulkResult,
    EventStats,
    LostItem,
    Outcome,
    Store,
    Transition,
    TransitionResult,
)

if TYPE_CHECKING:
    from ._http import Api

__all__ = [
    "ITEM_BUCKETS",
    "PATH",
    "STORE_BUCKETS",
    "InstrumentedStore",
    "Metrics",
    "default",
]

log = logging.getLogger("batchtrack")

T = TypeVar("T")

ITEM_BUCKETS: tuple[float, ...] = (
    0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
)  # fmt: skip
"""The default buckets of ``batchtrack_item_duration_seconds``, in seconds: up to an hour,
since an image (or a video) may well take more than the 10 s prometheus-client stops at."""

STORE_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
)  # fmt: skip
"""The default buckets of ``batchtrack_store_call_duration_seconds``, in seconds."""

PATH = "/metrics"
"""Where ``create_app(metrics=...)`` answers Prometheus (below the app's mount point)."""

_FINAL = (Status.COMPLETED, Status.FAILED, Status.CANCELLED)
_TIMED = (Status.COMPLETED, Status.FAILED)  # a cancelled item never ran
_MAX_STARTED = 100_000  # start times kept for the duration histogram
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _check_buckets(value: object, what: str) -> tuple[float, ...]:
    """Histogram bucket bounds: a non-empty, increasing sequence of positive numbers.

    Raises:
        ValidationError: Anything else.
    """
    bounds: tuple[Any, ...] = ()
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        bounds = tuple(value)
    numbers = all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
    if bounds and numbers and bounds[0] > 0 and all(a < b for a, b in itertools.pairwise(bounds)):
        return tuple(float(b) for b in bounds)
    raise ValidationError(
        f"{what} must be increasing positive numbers of seconds, such as (1, 10, 60), not {value!r}"
    )


@attrs.define(eq=False)
class Metrics:
    """batchtrack's Prometheus metrics, in one registry.

    Make one per process (:func:`default` is the one on prometheus-client's default
    registry), :meth:`instrument` each tracker with it, and expose it: with
    ``create_app(metrics=...)``, or :meth:`exposition` in an endpoint of your own, or
    prometheus-client's own servers over :attr:`registry`.

    Args:
        registry: Where the metrics are registered (prometheus-client's default
            ``REGISTRY`` unless given; a second ``Metrics`` needs a registry of its own).
        buckets: Upper bounds, in seconds, of ``batchtrack_item_duration_seconds``'s
            buckets (``+Inf`` is added); :data:`ITEM_BUCKETS` by default.
        store_buckets: The same for ``batchtrack_store_call_duration_seconds``;
            :data:`STORE_BUCKETS` by default.

    Raises:
        ValidationError: Buckets that are not increasing positive numbers, or metrics of
            batchtrack already in ``registry``.
    """

    registry: CollectorRegistry = attrs.field(default=REGISTRY)
    buckets: Sequence[float] = attrs.field(default=ITEM_BUCKETS, kw_only=True)
    store_buckets: Sequence[float] = attrs.field(default=STORE_BUCKETS, kw_only=True)
    _gauges: _StoreGauges = attrs.field(init=False)
    _finished: dict[Status, Any] = attrs.field(init=False)
    _durations: dict[Status, Any] = attrs.field(init=False)
    _started: Any = attrs.field(init=False)
    _retried: Any = attrs.field(init=False)
    _reclaimed: dict[Status, Any] = attrs.field(init=False)
    _created: Any = attrs.field(init=False)
    _store_seconds: Histogram = attrs.field(init=False)
    _store_errors: Counter = attrs.field(init=False)
    _requests: Counter = attrs.field(init=False)
    _multiprocess: bool = attrs.field(init=False)
    _complained: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        global _default
        if not isinstance(self.registry, CollectorRegistry):
            raise ValidationError(
                "registry must be a prometheus_client.CollectorRegistry, "
                f"not {type(self.registry).__name__}"
            )
        self.buckets = _check_buckets(self.buckets, "buckets")
        self.store_buckets = _check_buckets(self.store_buckets, "store_buckets")
        self._multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        registry = self.registry
        try:
            finished = Counter(
                "batchtrack_items_finished",
                "Items that ended, by outcome: completed, failed or cancelled.",
                ["outcome"],
                registry=registry,
            )
            durations = Histogram(
                "batchtrack_item_duration_seconds",
                "Seconds from an item's start to its end (both in this process), by outcome.",
                ["outcome"],
                registry=registry,
                buckets=self.buckets,
            )
            self._started = Counter(
                "batchtrack_items_started", "Starts of items (each attempt).", registry=registry
            )
            self._retried = Counter(
                "batchtrack_items_retried",
                "Failed or cancelled items put back to pending by a retry.",
                registry=registry,
            )
            reclaimed = Counter(
                "batchtrack_items_reclaimed",
                "Items whose worker was lost (no heartbeat), by what became of them: put "
                "back to pending, or failed after their last attempt.",
                ["to"],
                registry=registry,
            )
            self._created = Counter(
                "batchtrack_batches_created", "Batches created.", registry=registry
            )
            self._store_seconds = Histogram(
                "batchtrack_store_call_duration_seconds",
                "Seconds each call of the store took, by store class and operation.",
                ["store", "operation"],
                registry=registry,
                buckets=self.store_buckets,
            )
            self._store_errors = Counter(
                "batchtrack_store_errors",
                "Store calls that raised (not counting 'not found' answers), by store "
                "class, operation and exception class.",
                ["store", "operation", "error"],
                registry=registry,
            )
            self._requests = Counter(
                "batchtrack_http_requests",
                "HTTP requests answered, by method, route pattern and status code.",
                ["method", "route", "status"],
                registry=registry,
            )
            self._gauges = _StoreGauges()
            registry.register(self._gauges)
        except ValueError as exc:  # prometheus-client: "Duplicated timeseries in ..."
            raise ValidationError(
                "this registry has batchtrack's metrics already: use that Metrics "
                "(batchtrack.metrics.default() for the default registry), or give this one "
                f"a registry of its own ({exc})"
            ) from None
        self._finished = {status: finished.labels(status.value) for status in _FINAL}
        self._durations = {status: durations.labels(status.value) for status in _TIMED}
        self._reclaimed = {s: reclaimed.labels(s.value) for s in (Status.PENDING, Status.FAILED)}
        if registry is REGISTRY:
            with _default_lock:
                if _default is None:
                    _default = self

    def instrument(self, tracker: BatchTracker) -> BatchTracker:
        """Count ``tracker``'s events and time its store calls, from now on.

        Replaces ``tracker.store`` with an :class:`InstrumentedStore` around it (call this
        before the tracker is used: whatever holds the bare store is not measured). The
        gauges of open batches and running items read this tracker's store from now on.
        Instrumenting a tracker twice with the same ``Metrics`` changes nothing.

        Returns:
            ``tracker``.

        Raises:
            ValidationError: ``tracker`` is not a :class:`~batchtrack.BatchTracker`.
        """
        if not isinstance(tracker, BatchTracker):
            raise ValidationError(f"tracker must be a BatchTracker, not {type(tracker).__name__}")
        store = tracker.store
        if not (isinstance(store, InstrumentedStore) and store._metrics is self):
            tracker.store = InstrumentedStore(store, self)
        self._gauges.tracker = weakref.ref(tracker)
        return tracker

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The metrics as Prometheus scrapes them: ``(body, content type)``.

        Args:
            accept: The request's ``Accept`` header: OpenMetrics when it asks for it,
                else the Prometheus text format.

        Under ``PROMETHEUS_MULTIPROC_DIR`` the counters and histograms are those of every
        process writing there (prometheus-client's multi-process mode); the gauges are
        read from the store either way.
        """
        registry = self.registry
        if self._multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            registry.register(self._gauges)
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type

    # -- what the instrumented store and the app report ----------------------------------

    def _applied(
        self,
        started: dict[tuple[str, str], float],
        batch_id: str,
        item_id: str,
        target: Status,
        previous: Status,
        at: float,
    ) -> None:
        """Count one transition the store applied (never raises)."""
        try:
            key = (batch_id, item_id)
            if target is Status.PROCESSING:
                self._started.inc()
                if len(started) >= _MAX_STARTED:  # items started here, ended elsewhere
                    with contextlib.suppress(RuntimeError, StopIteration):  # another thread
                        started.pop(next(iter(started)), None)
                started[key] = at
                return
            began = started.pop(key, None) if previous is Status.PROCESSING else None
            counter = self._finished.get(target)
            if counter is not None:
                counter.inc()
                timer = self._durations.get(target)
                if began is not None and timer is not None:
                    timer.observe(max(at - began, 0.0))
        except Exception:
            self._complain()

    def _reclaim(self, target: Status) -> None:
        try:
            self._reclaimed[target].inc()
        except Exception:
            self._complain()

    def _bulk(self, target: Status, count: int) -> None:
        try:
            if target is Status.PENDING:
                self._retried.inc(count)
            elif target in self._finished:
                self._finished[target].inc(count)
        except Exception:
            self._complain()

    def _batch_created(self) -> None:
        try:
            self._created.inc()
        except Exception:
            self._complain()

    def _timer(self, store: str, operation: str) -> Any:
        return self._store_seconds.labels(store, operation)

    def _store_failed(self, store: str, operation: str, error: BaseException) -> None:
        try:
            self._store_errors.labels(store, operation, type(error).__name__).inc()
        except Exception:
            self._complain()

    def _requested(self, method: str, route: str, status: int) -> None:
        try:
            shown = method if method in _METHODS else "other"
            self._requests.labels(shown, route, str(status)).inc()
        except Exception:
            self._complain()

    def _complain(self) -> None:
        """Log a failure of the metrics themselves: the first with its traceback."""
        if self._complained:
            log.debug("batchtrack: metrics failed again", exc_info=True)
            return
        self._complained = True
        log.exception("batchtrack: metrics failed (the batch goes on; later failures at DEBUG)")


_default: Metrics | None = None
_default_lock = threading.RLock()


def default() -> Metrics:
    """The process's :class:`Metrics` on prometheus-client's default registry, made on
    first use (or the first one made there); ``create_app(metrics=True)`` uses it."""
    with _default_lock:
        if _default is None:
            Metrics()  # sets _default
        assert _default is not None
        return _default


# -- the store's side ---------------------------------------------------------------------


class InstrumentedStore(Store):
    """A store that times every call of the store it wraps and counts what it applied.

    It answers exactly as the wrapped store does (errors included); what the metrics
    themselves raise is logged. Attributes it does not know are the wrapped store's.
    """

    def __init__(self, inner: Store, metrics: Metrics) -> None:
        self._inner = inner
        self._metrics = metrics
        self._name = type(inner).__name__
        self._timers: dict[str, Any] = {}
        self._started: dict[tuple[str, str], float] = {}
        self.can_listen = inner.can_listen

    @property
    def inner(self) -> Store:
        """The wrapped store."""
        return self._inner

    def __getattr__(self, name: str) -> Any:
        # Only reached for what Store does not define: the wrapped store's own attributes.
        if name.startswith("__") or name in ("_inner", "_metrics"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __repr__(self) -> str:
        return f"InstrumentedStore({self._inner!r})"

    def _took(self, operation: str, seconds: float) -> None:
        try:
            timer = self._timers.get(operation)
            if timer is None:
                timer = self._timers[operation] = self._metrics._timer(self._name, operation)
            timer.observe(seconds)
        except Exception:
            self._metrics._complain()

    def _call(self, operation: str, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``method(*args, **kwargs)``, timed; what it raises is counted and re-raised."""
        began = time.perf_counter()
        try:
            return method(*args, **kwargs)
        except LookupError:  # a batch or item not found: an answer, not a failure
            raise
        except Exception as exc:
            self._metrics._store_failed(self._name, operation, exc)
            raise
        finally:
            self._took(operation, time.perf_counter() - began)

    # The tracker's hot path: start, complete, fail and cancel of one item.
    def _apply_parts(
        self,
        batch_id: str,
        item_id: str,
        target: Status,
        sources: frozenset[Status],
        at: float,
        error: str | None,
        expires_at_open: float,
        expires_at_finished: float,
        stats: EventStats,
        lease_until: float | None,
    ) -> tuple[Outcome, Status, ItemSnapshot, Progress, int, float, float, Mapping[str, float]]:
        answer = self._call(
            "apply",
            self._inner._apply_parts,
            batch_id,
            item_id,
            target,
            sources,
            at,
            error,
            expires_at_open,
            expires_at_finished,
            stats,
            lease_until,
        )
        if answer[0] is Outcome.APPLIED:
            self._metrics._applied(self._started, batch_id, item_id, target, answer[1], at)
        return answer

    def apply(self, batch_id: str, transition: Transition) -> TransitionResult:
        result = self._call("apply", self._inner.apply, batch_id, transition)
        self._count(batch_id, transition, result)
        return result

    def _count(self, batch_id: str, transition: Transition, result: TransitionResult) -> None:
        """Count a transition the store applied (once: by the process that applied it)."""
        if result.outcome is not Outcome.APPLIED:
            return
        if transition.lost_before is not None:  # the tracker's reclaim of a lost item
            self._metrics._reclaim(transition.target)
            # No duration: how long it ran before its worker was lost is not known.
            self._started.pop((batch_id, transition.item_id), None)
        self._metrics._applied(
            self._started,
            batch_id,
            transition.item_id,
            transition.target,
            result.previous,
            transition.at,
        )

    def apply_all(self, batch_id: str, transitions: Sequence[Transition]) -> list[TransitionResult]:
        # One store call, timed as an "apply" (the tracker's transitions, however many go
        # in one call); each applied transition counted once, as by apply().
        results = self._call("apply", self._inner.apply_all, batch_id, transitions)
        for transition, result in zip(transitions, results, strict=True):
            self._count(batch_id, transition, result)
        return results

    def apply_many(
        self, batch_id: str, transition: Transition, item_ids: Sequence[str] | None = None
    ) -> BulkResult:
        result = self._call("apply_many", self._inner.apply_many, batch_id, transition, item_ids)
        if result.applied:
            self._metrics._bulk(transition.target, result.applied)
        return result

    def create(self, batch: BatchRecord, items: Sequence[ItemSnapshot]) -> None:
        self._call("create", self._inner.create, batch, items)
        self._metrics._batch_created()

    def renew(
        self, batch_id: str, item_id: str, at: float, lease_until: float, expires_at_open: float
    ) -> TransitionResult:
        return self._call(
            "renew", self._inner.renew, batch_id, item_id, at, lease_until, expires_at_open
        )

    def lost(self, now: float, limit: int) -> list[LostItem]:
        return self._call("lost", self._inner.lost, now, limit)

    def open_batches(self, now: float) -> list[str]:
        return self._call("open_batches", self._inner.open_batches, now)

    def load(self, batch_id: str, *, items: bool = True) -> BatchRecord | None:
        return self._call("load", self._inner.load, batch_id, items=items)

    def list_batches(
        self, owner: str | None, now: float, limit: int, after: str | None
    ) -> list[BatchRecord]:
        return self._call("list_batches", self._inner.list_batches, owner, now, limit, after)

    def delete(self, batch_id: str) -> bool:
        return self._call("delete", self._inner.delete, batch_id)

    def purge_expired(self, now: float) -> int:
        return self._call("purge_expired", self._inner.purge_expired, now)

    def expired(self, now: float, limit: int) -> list[str]:
        return self._call("expired", self._inner.expired, now, limit)

    def listen(self, on_change: Callable[[str | None], None], stop: threading.Event) -> None:
        self._inner.listen(on_change, stop)  # blocks until stopped: nothing to time

    def close(self) -> None:
        self._inner.close()


def _forwarder(name: str) -> Callable[..., Any]:
    def forward(self: InstrumentedStore, *args: Any, **kwargs: Any) -> Any:
        return self._call(name, getattr(self._inner, name), *args, **kwargs)

    forward.__name__ = forward.__qualname__ = name
    forward.__doc__ = getattr(Store, name).__doc__
    return forward


# Every other method of Store (those with a default, like set_paused and load_items, and
# any added later) is the wrapped store's, timed: inheriting Store's default instead would
# silently hide what the wrapped store does.
_OWN = frozenset(vars(InstrumentedStore))
for _name, _value in list(vars(Store).items()):
    if inspect.isfunction(_value) and not _name.startswith("__") and _name not in _OWN:
        setattr(InstrumentedStore, _name, _forwarder(_name))
del _name, _value


class _StoreGauges(Collector):
    """Open batches, running and pending items, read from the store at each scrape."""

    def __init__(self) -> None:
        self.tracker: weakref.ref[BatchTracker] | None = None

    def describe(self) -> list[GaugeMetricFamily]:
        return list(self._families(None))

    def collect(self) -> list[GaugeMetricFamily]:
        tracker = None if self.tracker is None else self.tracker()
        if tracker is None:
            return []
        store = tracker.store
        if isinstance(store, InstrumentedStore):
            store = store.inner  # a scrape is not the service's store traffic
        try:
            open_ids = store.open_batches(tracker.clock())
            running = pending = 0
            for batch_id in open_ids:
                record = store.load(batch_id, items=False)
                if record is not None:
                    running += record.progress.processing
                    pending += record.progress.pending
        except Exception:
            log.warning("batchtrack: metrics could not read the store", exc_info=True)
            return []
        return list(self._families((len(open_ids), running, pending)))

    @staticmethod
    def _families(values: tuple[int, int, int] | None) -> Iterable[GaugeMetricFamily]:
        described = (
            ("batchtrack_open_batches", "Batches neither finished nor expired, in the store."),
            ("batchtrack_running_items", "Items processing now, in the store's open batches."),
            ("batchtrack_pending_items", "Items waiting to start, in the store's open batches."),
        )
        for position, (name, documentation) in enumerate(described):
            family = GaugeMetricFamily(name, documentation)
            if values is not None:
                family.add_metric([], values[position])
            yield family


# -- the HTTP app's side ------------------------------------------------------------------


@attrs.define(eq=False)
class AppMetrics:
    """What an app made with ``create_app(metrics=...)`` does: answer ``GET /metrics``
    and count every request by route pattern and status."""

    metrics: Metrics

    def handle(self, api: Api, request: Request, answer: Callable[[Request], Response]) -> Response:
        if request.path == PATH:
            response = self._scrape(request)
            route = PATH
        else:
            response = answer(request)
            try:
                route = api.route_of(request)
            except Exception:
                self.metrics._complain()
                route = "other"
        self.metrics._requested(request.method, route, response.status)
        return response

    def _scrape(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            allow = [("Allow", "GET, HEAD")]
            return error_response(405, "method_not_allowed", "use GET or HEAD here", allow)
        try:
            body, content_type = self.metrics.exposition(request.headers.get("accept", ""))
        except Exception:
            log.exception("batchtrack: GET %s failed", PATH)
            return error_response(500, "internal", "internal error; it has been logged")
        headers = [("Content-Type", content_type), ("Cache-Control", "no-store")]
        return Response(200, headers, body)


def for_app(option: object, tracker: BatchTracker) -> AppMetrics:
    """The metrics of an app: ``option`` is ``create_app``'s ``metrics`` (True for
    :func:`default`, or a :class:`Metrics`); ``tracker`` is instrumented with them.

    Raises:
        ValidationError: ``option`` is neither.
    """
    if option is True:
        metrics = default()
    elif isinstance(option, Metrics):
        metrics = option
    else:
        raise ValidationError(
            f"metrics must be True, False or a batchtrack.metrics.Metrics, not {option!r}"
        )
    metrics.instrument(tracker)
    return AppMetrics(metrics)
