"""Watchers woken by the store instead of polling it.

- The ``listen`` contract, run for every store that can listen (``store_factory``).
- One listener per store and process (``batchtrack._watch``): who is woken, shared reads,
  falling back to polling and coming back, stopping when nobody watches.
- Events streams under real HTTP servers, and ``Orchestrator.wait``, woken by changes that
  another store object or another process made; Redis's pub/sub connection killed.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batchtrack import (
    BatchTracker,
    MemoryStore,
    Orchestrator,
    SQLiteStore,
    Status,
    StoreError,
    _orchestrator,
    _watch,
)
from batchtrack import asgi as asgi_module
from batchtrack import wsgi as wsgi_module
from batchtrack.stores.base import Store
from batchtrack.testing import FakeClock
from batchtrack.uploads import UploadStore
from conftest import StoreFactory
from counting_store import CountingStore
from http_support import raw_request, threaded_wsgiref_server, uvicorn_server

SESSION = "c" * 32
OWNER = f"session:{SESSION}"
COOKIES = {"batchtrack_session": SESSION}


def _until(condition: Callable[[], object], timeout: float = 10.0) -> bool:
    """Whether ``condition()`` became true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# -- the listen contract, for every store that can listen ------------------------------------


@pytest.fixture
def listening(store_factory: StoreFactory) -> Store:
    """A fresh store of each kind that can listen (the others are skipped)."""
    store = store_factory()
    if not store.can_listen:
        pytest.skip(f"{type(store).__name__} cannot listen")
    return store


class Heard:
    """``store.listen`` in a thread of its own, recording every ``on_change`` call."""

    def __init__(self, store: Store) -> None:
        self.calls: list[str | None] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._listen, args=(store,), daemon=True)
        self._thread.start()

    def _listen(self, store: Store) -> None:
        try:
            store.listen(self._on_change, self.stop)
        except BaseException as exc:
            self.error = exc

    def _on_change(self, batch_id: str | None) -> None:
        with self._lock:
            self.calls.append(batch_id)

    def seen(self) -> list[str | None]:
        with self._lock:
            return list(self.calls)

    def reports(self, change: Callable[[], object], batch_id: str) -> bool:
        """Whether ``change()`` is reported as ``batch_id`` within 10 s."""
        before = len(self.seen())
        change()
        return _until(lambda: batch_id in self.seen()[before:])

    def subscribed(self) -> bool:
        """Whether the subscription was reported in place within 10 s."""
        return _until(lambda: self.seen())

    def close(self) -> float:
        """Set stop; the seconds listen took to return."""
        self.stop.set()
        began = time.monotonic()
        self._thread.join(10)
        assert not self._thread.is_alive(), "listen did not return after stop was set"
        return time.monotonic() - began


@pytest.fixture
def heard(listening: Store) -> Iterator[Heard]:
    """What a listener on the store hears, once its subscription is in place."""
    heard = Heard(listening)
    try:
        assert heard.subscribed(), "listen never reported on_change(None)"
        yield heard
    finally:
        heard.close()
    assert heard.error is None


def test_listen_reports_none_once_first_when_subscribed(listening: Store, heard: Heard) -> None:
    """listen's first call is on_change(None), once; a change made right after is heard."""
    batch = BatchTracker(listening).create_batch(["a.jpg"])
    assert _until(lambda: batch.batch_id in heard.seen())
    assert heard.seen()[0] is None
    assert heard.seen().count(None) == 1


def test_listen_reports_every_kind_of_change(listening: Store, heard: Heard) -> None:
    """Creation, start, complete, fail, retry, pause, unpause, cancel, delete and expiry
    (cleanup) each report the batch's id."""
    clock = FakeClock()
    tracker = BatchTracker(listening, ttl=60.0, clock=clock)
    expiring = tracker.create_batch(["d.jpg"])
    snap = tracker.create_batch(["a.jpg", "b.jpg", "c.jpg"])
    batch_id, (a, b, _) = snap.batch_id, [i.id for i in snap.items]
    created = {expiring.batch_id, batch_id}
    assert _until(lambda: created <= set(heard.seen())), "creation was not reported"
    steps: list[tuple[str, Callable[[], object]]] = [
        ("start", lambda: tracker.start_item(batch_id, a)),
        ("complete", lambda: tracker.complete_item(batch_id, a)),
        ("fail", lambda: tracker.fail_item(batch_id, b, "boom")),
        ("retry", lambda: tracker.retry(batch_id)),
        ("pause", lambda: tracker.pause(batch_id)),
        ("unpause", lambda: tracker.unpause(batch_id)),
        ("cancel", lambda: tracker.cancel(batch_id)),
        ("delete", lambda: tracker.delete(batch_id)),
    ]
    for what, step in steps:
        assert heard.reports(step, batch_id), f"{what} was not reported"
    tracker.fail_item(expiring.batch_id, expiring.items[0].id, "boom")  # expires in 60 s
    clock.advance(61)
    assert heard.reports(tracker.cleanup, expiring.batch_id), "expiry was not reported"


def test_listen_returns_soon_after_stop(listening: Store) -> None:
    """listen checks stop at least once a second: it returns within a few seconds of it,
    without raising."""
    heard = Heard(listening)
    assert heard.subscribed()
    time.sleep(0.2)
    assert heard.close() < 3.0
    assert heard.error is None


def test_a_store_without_listen_says_so(tmp_path: Path) -> None:
    """A store that does not implement listen (SQLite) says it cannot, and listen raises."""
    with SQLiteStore(tmp_path / "batches.db") as store:
        assert not store.can_listen
        with pytest.raises(NotImplementedError):
            store.listen(lambda batch_id: None, threading.Event())


# -- Redis: changes from other store objects and processes, prefixes -------------------------


@pytest.fixture
def redis_pair(redis_url: str) -> Iterator[tuple[Any, Any]]:
    """Two RedisStore objects on the same server and prefix."""
    from batchtrack.stores.redis import RedisStore

    prefix = f"test-{uuid.uuid4()}:"
    one, two = RedisStore(redis_url, prefix=prefix), RedisStore(redis_url, prefix=prefix)
    yield one, two
    one.close()
    two.close()


@pytest.fixture
def postgres_pair(postgres_url: str) -> Iterator[tuple[Any, Any]]:
    """Two PostgresStore objects on the same server and tables (dropped after)."""
    from batchtrack.stores.postgres import PostgresStore

    prefix = f"w{uuid.uuid4().hex[:16]}_"
    one = PostgresStore(postgres_url, table_prefix=prefix)
    two = PostgresStore(postgres_url, table_prefix=prefix)
    yield one, two
    two.close()
    with one._pool.connection() as conn:
        for table in ("items", "batches", "schema"):
            conn.execute(f"DROP TABLE IF EXISTS {prefix}{table} CASCADE")
    one.close()


_CHANGE_ELSEWHERE = """
import sys
from batchtrack import BatchTracker
from batchtrack.stores.redis import RedisStore
url, prefix, batch_id, item_id = sys.argv[1:]
with RedisStore(url, prefix=prefix) as store:
    BatchTracker(store).start_item(batch_id, item_id)
"""


def _start_in_another_process(url: str, prefix: str, batch_id: str, item_id: str) -> None:
    """Start an item through a RedisStore of a process of its own."""
    subprocess.run(
        [sys.executable, "-c", _CHANGE_ELSEWHERE, url, prefix, batch_id, item_id],
        check=True,
        timeout=60,
        env={"PYTHONPATH": ":".join(sys.path)},
    )


def test_redis_listen_hears_another_process(redis_url: str, redis_pair: tuple[Any, Any]) -> None:
    """A change made by another process through its own store object is heard."""
    one, _ = redis_pair
    snap = BatchTracker(one).create_batch(["a.jpg"])
    heard = Heard(one)
    try:
        assert heard.subscribed()
        _start_in_another_process(redis_url, one.prefix, snap.batch_id, snap.items[0].id)
        assert _until(lambda: snap.batch_id in heard.seen())
    finally:
        heard.close()


def test_redis_listen_hears_its_prefix_only(redis_url: str, redis_pair: tuple[Any, Any]) -> None:
    """A store with another prefix on the same server is not heard."""
    from batchtrack.stores.redis import RedisStore

    one, _ = redis_pair
    other = RedisStore(redis_url, prefix=f"test-{uuid.uuid4()}:")
    heard = Heard(one)
    try:
        assert heard.subscribed()
        elsewhere = BatchTracker(other).create_batch(["a.jpg"])
        here = BatchTracker(one).create_batch(["a.jpg"])  # published after the other
        assert _until(lambda: here.batch_id in heard.seen())
        assert elsewhere.batch_id not in heard.seen()
    finally:
        heard.close()
        other.close()


def test_redis_listen_raises_store_error_when_its_connection_is_killed(
    redis_pair: tuple[Any, Any],
) -> None:
    """CLIENT KILL of the subscription makes listen raise StoreError (no silent reconnect)."""
    one, _ = redis_pair
    heard = Heard(one)
    try:
        assert heard.subscribed()
        one._client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        assert _until(lambda: heard.error is not None)
        assert isinstance(heard.error, StoreError)
    finally:
        heard.close()


# -- one listener per process ----------------------------------------------------------------


class Wakes:
    """A wake callable that counts its calls."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.count += 1


def test_watchers_are_woken_by_their_batch_only() -> None:
    """A change wakes every watcher of that batch and none of another batch."""
    store = MemoryStore()
    tracker = BatchTracker(store)
    x, y = tracker.create_batch(["a.jpg"]), tracker.create_batch(["a.jpg"])
    on_x, also_x, on_y = Wakes(), Wakes(), Wakes()
    subs = [
        _watch.subscribe(store, x.batch_id, on_x),
        _watch.subscribe(store, x.batch_id, also_x),
        _watch.subscribe(store, y.batch_id, on_y),
    ]
    try:
        assert all(s is not None for s in subs)
        _settle(store)
        counts = on_x.count, also_x.count, on_y.count
        tracker.start_item(x.batch_id, x.items[0].id)
        tracker.start_item(y.batch_id, y.items[0].id)  # reported after x's change
        assert _until(lambda: on_y.count == counts[2] + 1)
        assert (on_x.count, also_x.count) == (counts[0] + 1, counts[1] + 1)
    finally:
        for sub in subs:
            assert sub is not None
            sub.close()


def _settle(store: Store) -> None:
    """Wait until the store's listener has reported everything so far: it reports in
    order, from one thread, so once a change made now has woken its watcher, every
    earlier report has woken theirs."""
    marker = BatchTracker(store).create_batch(["marker.jpg"])
    wakes = Wakes()
    sub = _watch.subscribe(store, marker.batch_id, wakes)
    assert sub is not None
    try:
        assert _until(lambda: sub.live)
        before = wakes.count
        BatchTracker(store).start_item(marker.batch_id, marker.items[0].id)
        assert _until(lambda: wakes.count > before)
    finally:
        sub.close()


def test_a_store_that_cannot_listen_has_no_watch() -> None:
    """subscribe() on a store that cannot listen answers None: its watchers poll."""
    store = CountingStore(MemoryStore(), listen=False)
    assert _watch.subscribe(store, str(uuid.uuid4()), Wakes()) is None


def test_watchers_of_a_batch_share_one_read_per_change() -> None:
    """Ten watchers asking for the same read after a change cause one read, and the next
    change one more."""
    store = MemoryStore()
    batch = BatchTracker(store).create_batch(["a.jpg"])
    subs = [_watch.subscribe(store, batch.batch_id, Wakes()) for _ in range(10)]
    reads: list[int] = []

    def read() -> int:
        reads.append(1)
        return len(reads)

    try:
        live = [s for s in subs if s is not None]
        assert _until(lambda: live[0].changes >= 1)  # subscribed: everyone reads once
        seen = live[0].changes
        assert {s.shared("all", seen, read) for s in live} == {1}
        BatchTracker(store).start_item(batch.batch_id, batch.items[0].id)
        assert _until(lambda: live[0].changes == seen + 1)
        assert {s.shared("all", seen + 1, read) for s in live} == {2}
        assert {s.shared("other", seen + 1, read) for s in live} == {3}
    finally:
        for sub in subs:
            assert sub is not None
            sub.close()


class Flaky(MemoryStore):
    """A memory store whose first ``failures`` listens fail at once."""

    failures = 2

    def listen(self, on_change: Callable[[str | None], None], stop: threading.Event) -> None:
        if self.failures:
            self.failures -= 1
            raise StoreError("the channel is down")
        super().listen(on_change, stop)


def test_a_failing_listener_falls_back_wakes_everyone_and_comes_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While listen fails, watchers are not live (they poll); it is tried again with
    back-off, and once subscribed every watcher is woken to read again."""
    monkeypatch.setattr(_watch, "FIRST_RETRY", 0.3)
    store = Flaky()
    wakes = Wakes()
    sub = _watch.subscribe(store, str(uuid.uuid4()), wakes)
    assert sub is not None
    try:
        assert not sub.live
        assert _until(lambda: wakes.count >= 1)  # the first failure woke the watcher
        assert not sub.live
        assert _until(lambda: sub.live, timeout=10)  # after 0.3 s, then 0.6 s
        assert store.failures == 0
        assert _until(lambda: wakes.count == 3)  # two failures, one subscription
    finally:
        sub.close()


def test_the_listener_stops_after_its_last_watcher_left(monkeypatch: pytest.MonkeyPatch) -> None:
    """After LINGER seconds without watchers the listener stops and lets go of the store;
    a new watcher starts a new one."""
    monkeypatch.setattr(_watch, "LINGER", 0.2)
    store = MemoryStore()
    sub = _watch.subscribe(store, str(uuid.uuid4()), Wakes())
    assert sub is not None
    watch = _watch._watches[id(store)]
    assert _until(lambda: sub.live)
    sub.close()
    sub.close()  # twice is fine
    assert _until(lambda: id(store) not in _watches_now())
    assert not watch.live
    again = _watch.subscribe(store, str(uuid.uuid4()), Wakes())
    assert again is not None
    try:
        assert _until(lambda: again.live)
        assert _watch._watches[id(store)] is not watch
    finally:
        again.close()


def test_watchers_coming_and_going_keep_one_linger_timer() -> None:
    """A watcher opening and closing again and again arms one lingering timer, not one
    each time."""
    store = MemoryStore()
    batch_id = str(uuid.uuid4())
    for _ in range(20):
        sub = _watch.subscribe(store, batch_id, Wakes())
        assert sub is not None
        sub.close()
    watch = _watch._watches[id(store)]
    timers = [
        t
        for t in threading.enumerate()
        if isinstance(t, threading.Timer) and getattr(t.function, "__self__", None) is watch
    ]
    assert len(timers) == 1


def _watches_now() -> dict[int, Any]:
    with _watch._registry_lock:
        return dict(_watch._watches)


# -- events streams under real servers -------------------------------------------------------


class Follower:
    """One client of an events stream on a socket of its own, read in a thread: the
    events (their ``id``, the batch version) and when each arrived.

    A raw socket, so that :meth:`close` ends the reading thread at once (shutting the
    socket down wakes a blocked ``recv``), whatever the server sends next.
    """

    def __init__(self, base: str, batch_id: str) -> None:
        self.events: list[tuple[float, int]] = []
        self.ended = False
        self.error: BaseException | None = None
        head = (
            f"GET /api/batch-events/{batch_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Cookie: batchtrack_session={SESSION}\r\n\r\n"
        ).encode()
        self._sock = raw_request(base, head)
        self._sock.settimeout(None)
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        pending = b""
        try:
            while data := self._sock.recv(65536):
                pending += data
                # Every event is one write of the app ("id: N\ndata: ...\n\n"): its
                # lines are never split by the transfer encoding's chunk lines.
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.startswith(b"id: "):
                        self.events.append((time.monotonic(), int(line[4:])))
                    elif line.startswith(b"HTTP/1.") and b" 200 " not in line:
                        raise AssertionError(f"the stream was answered {line!r}")
            self.ended = True
        except OSError:
            pass  # closed by close()
        except BaseException as exc:
            self.error = exc

    def versions(self) -> list[int]:
        """The versions of the events received so far."""
        return [version for _, version in self.events]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(10)
        assert not self._thread.is_alive()


@contextlib.contextmanager
def serving(store: Store, server: str, folder: Path, **options: Any) -> Iterator[str]:
    """The app (ASGI under uvicorn, or WSGI under the threaded wsgiref) over ``store``;
    yields the base URL."""
    tracker = BatchTracker(store)
    runner = Orchestrator(tracker, lambda item: None, concurrency=1)
    uploads = UploadStore(folder / "uploads")
    try:
        if server == "uvicorn":
            with uvicorn_server(asgi_module.create_app(tracker, runner, uploads, **options)) as b:
                yield b
        else:
            app = wsgi_module.create_app(tracker, runner, uploads, **options)
            with threaded_wsgiref_server(app) as base:
                yield base
    finally:
        runner.close()


@pytest.fixture(params=["memory", "redis", "postgres"])
def shared_stores(request: pytest.FixtureRequest) -> Iterator[tuple[Store, Store]]:
    """(the server's store, another object on the same data): for memory, there is only
    one object, changed from another thread and tracker; for Redis and PostgreSQL,
    another store object on the same server."""
    if request.param == "memory":
        store = MemoryStore()
        yield store, store
        return
    yield request.getfixturevalue(f"{request.param}_pair")


def _batch(store: Store, items: int = 1) -> tuple[str, list[str]]:
    snap = BatchTracker(store).create_batch([f"{i}.jpg" for i in range(items)], owner=OWNER)
    return snap.batch_id, [i.id for i in snap.items]


@pytest.mark.parametrize("server", ["uvicorn", "wsgiref"])
def test_a_stream_is_woken_by_a_change_made_elsewhere(
    shared_stores: tuple[Store, Store], server: str, tmp_path: Path
) -> None:
    """With events_poll at 30 s, an events stream sends the change another store object
    (another thread's tracker, for memory) made within a few seconds: only the store's
    notification can explain it."""
    here, elsewhere = shared_stores
    batch_id, items = _batch(here)
    with serving(here, server, tmp_path, events_poll=30.0) as base:
        follower = Follower(base, batch_id)
        try:
            assert _until(lambda: follower.events)
            time.sleep(0.5)  # the subscription is in place (or its first wake-up comes)
            changed = time.monotonic()
            threading.Thread(
                target=BatchTracker(elsewhere).start_item, args=(batch_id, items[0])
            ).start()
            assert _until(lambda: follower.versions()[-1] == 1, timeout=10)
            arrived = follower.events[-1][0] - changed
            assert arrived < 5.0, f"the event took {arrived:.2f} s"
            assert follower.error is None
        finally:
            follower.close()


def test_a_redis_stream_is_woken_by_another_process(
    redis_url: str, redis_pair: tuple[Any, Any], tmp_path: Path
) -> None:
    """With events_poll at 30 s, a change made by another process reaches the stream in
    a few seconds."""
    here, _ = redis_pair
    batch_id, items = _batch(here)
    with serving(here, "uvicorn", tmp_path, events_poll=30.0) as base:
        follower = Follower(base, batch_id)
        try:
            assert _until(lambda: follower.events)
            time.sleep(0.5)
            changed = time.monotonic()
            _start_in_another_process(redis_url, here.prefix, batch_id, items[0])
            assert _until(lambda: follower.versions()[-1] == 1, timeout=10)
            assert follower.events[-1][0] - changed < 5.0 + 3.0  # the process starts too
        finally:
            follower.close()


@pytest.fixture(params=["memory", "redis", "postgres"])
def counting(request: pytest.FixtureRequest) -> Iterator[CountingStore]:
    """A store that counts its reads, over a memory store, a RedisStore or a
    PostgresStore."""
    if request.param == "memory":
        yield CountingStore(MemoryStore())
        return
    one, _ = request.getfixturevalue(f"{request.param}_pair")
    yield CountingStore(one)


def _followers(base: str, batch_id: str, count: int) -> list[Follower]:
    followers = [Follower(base, batch_id) for _ in range(count)]
    assert _until(lambda: all(f.events for f in followers), timeout=30)
    return followers


def test_fifty_streams_on_an_idle_batch_read_the_store_about_never(
    counting: CountingStore, tmp_path: Path
) -> None:
    """50 streams on a batch where nothing happens read the store about never over 3 s,
    though events_poll is 0.05 s (polling, they would read it some 3,000 times)."""
    batch_id, _ = _batch(counting.inner)
    with serving(counting, "uvicorn", tmp_path, events_poll=0.05) as base:
        followers = _followers(base, batch_id, 50)
        try:
            time.sleep(0.5)  # the re-read of the subscription's start, if it came late
            counting.take()
            time.sleep(3.0)
            assert counting.take() <= 2
            assert all(f.error is None and not f.ended for f in followers)
        finally:
            for follower in followers:
                follower.close()


def test_fifty_streams_on_a_busy_batch_read_it_about_once_per_change(
    counting: CountingStore, tmp_path: Path
) -> None:
    """20 changes watched by 50 streams cost about 20 reads, not 1,000; every stream sees
    the last one."""
    batch_id, items = _batch(counting.inner, 20)
    tracker = BatchTracker(counting.inner)
    with serving(counting, "uvicorn", tmp_path, events_poll=30.0) as base:
        followers = _followers(base, batch_id, 50)
        try:
            time.sleep(0.5)
            counting.take()
            for item_id in items:
                tracker.start_item(batch_id, item_id)
                time.sleep(0.05)
            assert _until(lambda: all(f.versions()[-1] == 20 for f in followers), timeout=30)
            reads = counting.take()
            assert 1 <= reads <= 2 * 20 + 5
        finally:
            for follower in followers:
                follower.close()


def test_streams_poll_while_the_redis_subscription_is_down_and_it_comes_back(
    redis_url: str, redis_pair: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """After CLIENT KILL TYPE pubsub, streams still get changes (by polling, every
    events_poll), and the listener subscribes again after its back-off."""
    import redis

    monkeypatch.setattr(_watch, "FIRST_RETRY", 4.0)  # a clear window without notifications
    here, elsewhere = redis_pair
    admin = redis.Redis.from_url(redis_url)
    channel = f"{here.prefix}changes"

    def subscribers() -> int:
        return int(dict(admin.pubsub_numsub(channel))[channel.encode()])

    batch_id, items = _batch(here, 3)
    other = BatchTracker(elsewhere)
    with serving(here, "uvicorn", tmp_path, events_poll=0.2) as base:
        follower = Follower(base, batch_id)
        try:
            assert _until(lambda: follower.events and subscribers() == 1)
            admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            assert _until(lambda: subscribers() == 0)
            watch = _watch._watches[id(here)]
            assert _until(lambda: not watch.live)
            other.start_item(batch_id, items[0])
            assert _until(lambda: follower.versions()[-1] == 1, timeout=3)
            assert subscribers() == 0  # polling delivered it, not a notification
            assert _until(lambda: subscribers() == 1 and watch.live, timeout=20)
            other.start_item(batch_id, items[1])
            assert _until(lambda: follower.versions()[-1] == 2, timeout=5)
            assert follower.error is None
        finally:
            follower.close()
            admin.close()


class Unreadable(CountingStore):
    """A counting store whose reads fail with StoreError while ``failing`` is set."""

    failing = False

    def _count(self) -> None:
        super()._count()
        if self.failing:
            raise StoreError("the store is away")


@pytest.mark.parametrize("server", ["uvicorn", "wsgiref"])
def test_a_stream_outlives_reads_that_fail(tmp_path: Path, server: str) -> None:
    """While the store cannot be read the stream stays open, and it sends the change
    once the store answers again (tried every events_poll)."""
    store = Unreadable(MemoryStore())
    batch_id, items = _batch(store.inner)
    with serving(store, server, tmp_path, events_poll=0.1) as base:
        follower = Follower(base, batch_id)
        try:
            assert _until(lambda: follower.events)
            store.failing = True
            BatchTracker(store.inner).start_item(batch_id, items[0])
            assert _until(lambda: store.reads >= 3)  # woken, then trying again and again
            assert follower.versions() == [0]
            store.failing = False
            assert _until(lambda: follower.versions() == [0, 1])
            assert follower.error is None
            assert not follower.ended
        finally:
            follower.close()


# -- Orchestrator.wait -----------------------------------------------------------------------


def test_wait_for_a_batch_run_elsewhere_is_woken_by_the_store(
    shared_stores: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Orchestrator.wait on a batch another store object finishes returns within a few
    seconds of its end, though its polling is set to 30 s."""
    monkeypatch.setattr(_orchestrator, "_WAIT_POLL", 30.0)
    monkeypatch.setattr(_orchestrator, "_WAIT_CHECK", 30.0)
    here, elsewhere = shared_stores
    batch_id, items = _batch(here, 2)
    other = BatchTracker(elsewhere)
    answers: list[Any] = []
    with Orchestrator(BatchTracker(here), lambda item: None) as orch:
        waiter = threading.Thread(target=lambda: answers.append(orch.wait(batch_id, 60)))
        waiter.start()
        time.sleep(0.5)
        other.start_item(batch_id, items[0])
        other.complete_item(batch_id, items[0])
        time.sleep(0.3)
        assert not answers  # one item is left
        finished = time.monotonic()
        other.fail_item(batch_id, items[1], "boom")
        waiter.join(10)
        assert time.monotonic() - finished < 5.0
    assert answers[0].status is Status.COMPLETED
    assert answers[0].progress.failed == 1


def test_wait_for_a_batch_run_elsewhere_polls_a_store_that_cannot_listen(tmp_path: Path) -> None:
    """On SQLite, wait on a batch another process's store object finishes still returns."""
    path = tmp_path / "batches.db"
    with SQLiteStore(path) as here, SQLiteStore(path) as elsewhere:
        batch_id, items = _batch(here)
        with Orchestrator(BatchTracker(here), lambda item: None) as orch:
            timer = threading.Timer(
                0.3, BatchTracker(elsewhere).fail_item, (batch_id, items[0], "x")
            )
            timer.start()
            snap = orch.wait(batch_id, timeout=30)
            timer.join()
    assert snap.status is Status.FAILED
