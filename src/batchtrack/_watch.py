"""Watchers of batches, woken by their store instead of each polling it.

A watcher (an events stream, :meth:`Orchestrator.wait <batchtrack.Orchestrator.wait>`)
calls :func:`subscribe` with a batch id and a ``wake`` callable, and reads the batch
when woken. Per store object and process there is one :class:`Watch`: the first watcher
of a store that can listen (:attr:`~batchtrack.stores.base.Store.can_listen`) starts a
daemon thread that runs :meth:`~batchtrack.stores.base.Store.listen`; each change the
store reports bumps that batch's change count and wakes its watchers, whatever their
number, at the cost of one callback each.

- While the subscription is not in place (:attr:`Subscription.live` is False: the
  listener is starting, or the store's channel dropped), watchers poll as they would
  without it. When ``listen`` raises, every watcher is woken (to start polling) and the
  listener tries again after 0.5 s, doubling up to 30 s. Once subscribed (again), the
  store reports ``on_change(None)`` and every watcher is woken to read once more: what
  changed in between is then seen.
- Watchers of one batch share their reads (:meth:`Subscription.shared`): after a change,
  the first one to read it reads the store, and the others take that answer.
- A listener outlives its last watcher by :data:`LINGER` seconds (less if listening
  fails meanwhile), then stops and drops its store, so a store nobody watches holds no
  thread and no connection.

``wake`` is called from the listener's thread and must return at once: a threading
event's ``set``, or ``loop.call_soon_threadsafe`` for an asyncio waiter.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar, cast

import attrs

from .exceptions import StoreError
from .stores.base import Store

__all__ = ["FIRST_RETRY", "LAST_RETRY", "LINGER", "Subscription", "Watch", "subscribe"]

log = logging.getLogger("batchtrack")

LINGER = 10.0
"""Seconds a listener goes on after its last watcher left (one that comes back soon,
such as a browser reopening its event stream, finds it still subscribed)."""
FIRST_RETRY = 0.5
"""Seconds before listening again after the first failure; doubled after each."""
LAST_RETRY = 30.0
"""The longest wait between two attempts to listen."""

T = TypeVar("T")
Wake = Callable[[], None]

_registry_lock = threading.Lock()
_watches: dict[int, Watch] = {}  # by id(store); a watch holds its store, so ids stay unique


def subscribe(store: Store, batch_id: str, wake: Wake) -> Subscription | None:
    """Have ``wake()`` called whenever the store reports a change of ``batch_id``.

    Returns:
        The subscription (close it when done), or None when the store cannot listen.
    """
    if not store.can_listen:
        return None
    with _registry_lock:
        watch = _watches.get(id(store))
        if watch is None:
            watch = _watches[id(store)] = Watch(store)
        return watch._subscribe(batch_id, wake)


@attrs.define(eq=False)
class _Topic:
    """One watched batch: its change count, its watchers, and the reads they share."""

    changes: int = 0  # changes reported since the topic was made (and re-subscriptions)
    subscribers: set[Subscription] = attrs.Factory(set)
    read_lock: threading.Lock = attrs.Factory(threading.Lock)
    # key -> (the change count when the read began, what it read)
    reads: dict[Hashable, tuple[int, Any]] = attrs.Factory(dict)


@attrs.define(eq=False)
class Subscription:
    """One watcher of one batch (see :func:`subscribe`)."""

    batch_id: str
    wake: Wake
    _watch: Watch
    _topic: _Topic
    _closed: bool = False

    @property
    def live(self) -> bool:
        """Whether the store is listened to now: False while watchers must poll."""
        return self._watch.live

    @property
    def changes(self) -> int:
        """How many changes of the batch were reported so far (a re-subscription counts
        as one): when it moves, read the batch again."""
        return self._topic.changes

    def shared(self, key: Hashable, fresh_after: int, read: Callable[[], T]) -> T:
        """``read()``'s answer, read once for every watcher of the batch in this process.

        The answer kept under ``key`` is reused when its read began once :attr:`changes`
        had reached ``fresh_after`` (so it saw every change reported until then); else
        ``read()`` runs now, and its answer is kept for the others. Watchers of one batch
        read one after another: the first reads, the rest take its answer.

        Args:
            key: What is read (answers under different keys are different reads).
            fresh_after: :attr:`changes` as the caller saw it before deciding to read.
            read: Reads the store; what it raises is raised, and nothing is kept.
        """
        topic = self._topic
        with topic.read_lock:
            kept = topic.reads.get(key)
            if kept is not None and kept[0] >= fresh_after:
                return cast(T, kept[1])
            began = topic.changes
            value = read()
            if any(at < began for at, _ in topic.reads.values()):
                topic.reads = {k: v for k, v in topic.reads.items() if v[0] >= began}
            topic.reads[key] = (began, value)
            return value

    def close(self) -> None:
        """Stop watching; closing twice is fine."""
        self._watch._unsubscribe(self)


@attrs.define(eq=False)
class Watch:
    """The listener of one store in this process, and the watchers it wakes."""

    store: Store
    live: bool = False  # the store's subscription is in place
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _topics: dict[str, _Topic] = attrs.field(factory=dict, init=False)
    _count: int = attrs.field(default=0, init=False)  # open subscriptions
    _thread: threading.Thread | None = attrs.field(default=None, init=False)
    _stop: threading.Event = attrs.field(factory=threading.Event, init=False)
    _idle_since: float | None = attrs.field(default=None, init=False)  # when the last left
    _timer: threading.Timer | None = attrs.field(default=None, init=False)  # ends lingering
    _down_since: float | None = attrs.field(default=None, init=False)  # when listening failed

    def _subscribe(self, batch_id: str, wake: Wake) -> Subscription:
        """A new subscription; the listener starts when none runs. Called under the
        registry's lock, so it never meets a watch that is retiring."""
        with self._lock:
            topic = self._topics.get(batch_id)
            if topic is None:
                topic = self._topics[batch_id] = _Topic()
            subscription = Subscription(batch_id, wake, self, topic)
            topic.subscribers.add(subscription)
            self._count += 1
            self._idle_since = None
            if self._thread is None:
                self._stop = threading.Event()
                self._thread = threading.Thread(
                    target=self._run, name="batchtrack-watch", daemon=True
                )
                self._thread.start()
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            if subscription._closed:
                return
            subscription._closed = True
            topic = subscription._topic
            topic.subscribers.discard(subscription)
            if not topic.subscribers and self._topics.get(subscription.batch_id) is topic:
                del self._topics[subscription.batch_id]
            self._count -= 1
            if self._count:
                return
            self._idle_since = time.monotonic()
            if self._timer is None:  # one timer at most, however often watchers come and go
                self._arm(LINGER)

    def _arm(self, seconds: float) -> None:
        """Check for the end of lingering in ``seconds`` (under the lock)."""
        self._timer = threading.Timer(seconds, self._linger_over)
        self._timer.daemon = True
        self._timer.name = "batchtrack-watch-linger"
        self._timer.start()

    def _linger_over(self) -> None:
        with self._lock:
            self._timer = None
            if self._count or self._idle_since is None:
                return  # watched again
            left = self._idle_since + LINGER - time.monotonic()
            if left > 0:
                self._arm(left)  # watchers came and went meanwhile
            else:
                self._stop.set()

    def _run(self) -> None:
        """The listener's thread: listen, fall back and retry, until stopped for good."""
        failures = 0
        while True:
            stop = self._stop
            began = time.monotonic()
            try:
                self.store.listen(self._changed, stop)
                if not stop.is_set():
                    raise StoreError("listen() returned before it was stopped")
            except Exception as exc:
                with self._lock:
                    if not self._count:  # nobody watches: no need to listen again
                        stop.set()
                if not stop.is_set():  # (a failure on the way out is no news)
                    if time.monotonic() - began > LAST_RETRY:
                        failures = 0  # it had been working for a while: start over
                    failures += 1
                    delay = min(FIRST_RETRY * 2 ** (failures - 1), LAST_RETRY)
                    self._down(exc, delay, loud=failures == 1)
                    stop.wait(delay)
            if not stop.is_set():
                continue
            with _registry_lock, self._lock:
                self.live = False
                if self._count == 0:
                    self._thread = None
                    if _watches.get(id(self.store)) is self:
                        del _watches[id(self.store)]
                    return
                self._stop = threading.Event()  # watchers came back while it stopped

    def _changed(self, batch_id: str | None) -> None:
        """The store's ``on_change``: wake the batch's watchers (None: everyone's)."""
        try:
            with self._lock:
                if batch_id is None:
                    if self._down_since is not None:
                        log.info(
                            "batchtrack: change notifications of %s are back after %.1f s",
                            type(self.store).__name__,
                            time.monotonic() - self._down_since,
                        )
                        self._down_since = None
                    self.live = True
                    topics = list(self._topics.values())
                else:
                    topic = self._topics.get(batch_id)
                    if topic is None:
                        return
                    topics = [topic]
                wakes: list[Wake] = []
                for topic in topics:
                    topic.changes += 1
                    wakes += [s.wake for s in topic.subscribers]
            _wake(wakes)
        except Exception:  # on_change must never raise into the store
            log.exception("batchtrack: could not wake the watchers of batch %s", batch_id)

    def _down(self, error: Exception, delay: float, *, loud: bool) -> None:
        """Listening failed: every watcher polls until the store is listened to again."""
        with self._lock:
            self.live = False
            if self._down_since is None:
                self._down_since = time.monotonic()
            wakes = [s.wake for topic in self._topics.values() for s in topic.subscribers]
        (log.warning if loud else log.debug)(
            "batchtrack: change notifications of %s are down (%s); watchers poll the store "
            "until they are back (next try in %.1f s)",
            type(self.store).__name__,
            error,
            delay,
        )
        _wake(wakes)


def _wake(wakes: list[Wake]) -> None:
    for wake in wakes:
        try:
            wake()
        except Exception:
            log.exception("batchtrack: a watcher's wake-up failed")
