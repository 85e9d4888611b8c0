"""RedisStore's event path (``_EVENT`` on connections of the store's own) against a real
redis-server: what it sums, how it recovers, what it leaves open."""

from __future__ import annotations

import multiprocessing
import os
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("redis")
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from batchtrack import BatchTracker, MemoryStore, Status, StoreError, ValidationError, _eta
from batchtrack._models import ItemSnapshot, Progress
from batchtrack.stores import redis as redis_module
from batchtrack.stores.base import Outcome, Transition, add_stats
from batchtrack.stores.redis import RedisStore
from batchtrack.testing import FakeClock
from conftest import start_redis


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisStore]:
    made = RedisStore(redis_url, prefix=f"ev-{uuid.uuid4()}:")
    yield made
    made.close()


@pytest.fixture
def admin(redis_url: str) -> Iterator[Any]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _run(tracker: BatchTracker, batch_id: str, ids: list[str]) -> None:
    for i in ids:
        tracker.start_item(batch_id, i)
        tracker.complete_item(batch_id, i)


_seconds = st.floats(0.0, 2e4, allow_nan=False, allow_infinity=False)  # within a day


@given(started=_seconds, worked=st.lists(_seconds, min_size=1, max_size=3))
@settings(max_examples=40, deadline=None)
def test_event_sums_stats_like_add_stats_bit_for_bit(
    redis_url: str, started: float, worked: list[float]
) -> None:
    """The stats an event adds in Redis are add_stats' sums to the last bit (powers 3 and 4
    included, which Lua's ``^`` would round differently)."""
    store = RedisStore(redis_url, prefix=f"bits-{uuid.uuid4()}:")
    clock = FakeClock(1000.0)
    tracker = BatchTracker(store, clock=clock, lease=30.0)
    ids = [str(n) for n in range(len(worked))]
    snap = tracker.create_batch([(i, f"{i}.jpg") for i in ids])
    expected: dict[str, float] = {}
    clock.advance(started)
    for i, seconds in zip(ids, worked, strict=True):
        now = clock()
        add_stats(expected, _eta.stats_for(Status.PROCESSING, now, 1000.0, 30.0)[Status.PENDING], 0)
        tracker.start_item(snap.batch_id, i)
        clock.advance(seconds)
        at = clock()
        contributions = _eta.stats_for(Status.COMPLETED, at, 1000.0)[Status.PROCESSING]
        add_stats(expected, contributions, at - now)
        tracker.complete_item(snap.batch_id, i)
    record = store.load(snap.batch_id, items=False)
    store.close()
    assert record is not None
    got = dict(record.stats)
    assert sorted(got) == sorted(expected)
    assert {k: struct.pack("<d", v) for k, v in got.items()} == {
        k: struct.pack("<d", v) for k, v in expected.items()
    }


def test_event_after_a_script_flush_loads_the_script_again(store: RedisStore, admin: Any) -> None:
    """A server that forgot the scripts (restart, ``SCRIPT FLUSH``) still takes events."""
    tracker = BatchTracker(store)
    snap = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")])
    tracker.start_item(snap.batch_id, "a")
    admin.script_flush()
    assert tracker.complete_item(snap.batch_id, "a").progress.completed == 1
    admin.script_flush()
    tracker.start_item(snap.batch_id, "b")
    assert tracker.complete_item(snap.batch_id, "b").progress.completed == 2


def _kill_idle(store: RedisStore, admin: Any) -> None:
    """Have the server drop the store's idle event connections (as a restart or an idle
    timeout would)."""
    for conn in store._idle:
        admin.client_kill("{}:{}".format(*conn._sock.getsockname()[:2]))


def test_event_after_its_connections_were_killed_reconnects(store: RedisStore, admin: Any) -> None:
    """Connections the server dropped while idle are replaced: the event still applies,
    once."""
    tracker = BatchTracker(store)
    snap = tracker.create_batch([(str(n), f"{n}.jpg") for n in range(3)])
    tracker.start_item(snap.batch_id, "0")
    assert store._idle  # the event's connection waits for the next one
    _kill_idle(store, admin)
    event = tracker.complete_item(snap.batch_id, "0")
    assert (event.changed, event.progress.completed, event.version) == (True, 1, 2)
    _kill_idle(store, admin)
    _run(tracker, snap.batch_id, ["1", "2"])
    assert tracker.get(snap.batch_id).progress.completed == 3


def test_close_closes_the_event_connections(redis_url: str, admin: Any) -> None:
    """After close() no connection of the store's events stays open on the server."""
    store = RedisStore(redis_url, prefix=f"close-{uuid.uuid4()}:")
    tracker = BatchTracker(store)
    snap = tracker.create_batch([(str(n), f"{n}.jpg") for n in range(8)])
    threads = [
        threading.Thread(target=_run, args=(tracker, snap.batch_id, [str(n)])) for n in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ours = {"{}:{}".format(*c._sock.getsockname()[:2]) for c in store._idle}
    assert ours
    assert ours <= {c["addr"] for c in admin.client_list()}
    store.close()
    deadline = time.monotonic() + 5
    while ours & {c["addr"] for c in admin.client_list()} and time.monotonic() < deadline:
        time.sleep(0.01)  # the server notices a closed socket on its next turn
    assert not ours & {c["addr"] for c in admin.client_list()}
    assert store._idle == []


def test_events_from_many_threads_count_exactly(store: RedisStore) -> None:
    """8 threads sharing one store's event connections: every event applies once."""
    tracker = BatchTracker(store)
    ids = [str(n) for n in range(160)]
    snap = tracker.create_batch([(i, f"{i}.jpg") for i in ids])
    errors: list[BaseException] = []

    def work(part: list[str]) -> None:
        try:
            _run(tracker, snap.batch_id, part)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(ids[k::8],)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    done = tracker.get(snap.batch_id)
    assert (done.progress.completed, done.version, done.status) == (160, 320, "completed")
    assert len(store._idle) <= redis_module._IDLE_KEPT


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_event_connections_of_its_own(store: RedisStore) -> None:
    """A child process forked after events never writes on the parent's connections."""
    tracker = BatchTracker(store)
    snap = tracker.create_batch([(str(n), f"{n}.jpg") for n in range(4)])
    _run(tracker, snap.batch_id, ["0"])
    assert store._idle
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            _run(tracker, snap.batch_id, ["1", "2"])
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    _run(tracker, snap.batch_id, ["3"])  # the parent's connection is still in step
    done = tracker.get(snap.batch_id)
    assert (done.progress.completed, done.version) == (4, 8)


def test_a_single_connection_client_takes_the_general_path(redis_url: str) -> None:
    """A client of one connection (or not a plain redis.Redis) is used as it is."""
    client = redis.Redis.from_url(redis_url, single_connection_client=True)
    store = RedisStore(client=client, prefix=f"single-{uuid.uuid4()}:")
    assert store._pool is None
    tracker = BatchTracker(store)
    snap = tracker.create_batch([("a", "a.jpg")])
    _run(tracker, snap.batch_id, ["a"])
    assert store._idle == []
    assert tracker.get(snap.batch_id).status == "completed"
    store.close()
    client.close()


def test_created_at_and_total_stay_right_when_the_kept_ones_are_forgotten(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch constants the event no longer reads are right for every batch, also when
    the store forgets them (two batches, room for one)."""
    monkeypatch.setattr(redis_module, "_CONSTANTS_KEPT", 1)
    clock = FakeClock(1000.0)
    tracker = BatchTracker(store, clock=clock)
    one = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")]).batch_id
    clock.advance(5.0)
    two = tracker.create_batch([("a", "a.jpg")]).batch_id
    records = {b: store.load(b, items=False) for b in (one, two)}
    start = (Status.PROCESSING, frozenset({Status.PENDING}), 30.0)
    complete = (Status.COMPLETED, frozenset({Status.PROCESSING}), None)
    for batch_id, item in ((one, "a"), (two, "a"), (one, "b")):
        record = records[batch_id]
        assert record is not None
        for target, sources, lease in (start, complete):
            clock.advance(1.0)
            now = clock()
            parts = store._apply_parts(
                batch_id,
                item,
                target,
                sources,
                now,
                None,
                now + 60,
                now + 60,
                (record.created_at, lease),
                None if lease is None else now + lease,
            )
            assert (parts[3].total, parts[5]) == (record.progress.total, record.created_at)
    assert len(store._constants) <= 1


def test_a_batch_run_partly_by_the_general_script_finishes_on_the_event_path(
    store: RedisStore,
) -> None:
    """Items moved by the general transition script (apply(): what every event ran
    before) and then by the event script end as a memory store's would: the same data,
    read and written by both."""
    clock = FakeClock(1000.0)
    ours = BatchTracker(store, clock=clock, lease=20.0)
    memory = BatchTracker(MemoryStore(), clock=clock, lease=20.0)
    ids = [str(n) for n in range(4)]
    origin = clock()
    snaps = [t.create_batch([(i, f"{i}.jpg") for i in ids]) for t in (ours, memory)]
    for i in ids[:2]:  # the general path, as the previous code ran every event
        for target, sources, lease in (
            (Status.PROCESSING, frozenset({Status.PENDING}), 20.0),
            (Status.COMPLETED, frozenset({Status.PROCESSING}), None),
        ):
            for tracker, snap in zip((ours, memory), snaps, strict=True):
                tracker.store.apply(
                    snap.batch_id,
                    Transition(
                        i,
                        target,
                        sources,
                        clock(),
                        None,
                        clock() + 86400,
                        clock() + 3600,
                        _eta.stats_for(target, clock(), origin, lease),
                        None if lease is None else clock() + lease,
                        lease is not None,
                        unless_paused=lease is not None,
                    ),
                )
            clock.advance(1.5)
    clock.advance(2.0)
    for tracker, snap in zip((ours, memory), snaps, strict=True):
        tracker.start_item(snap.batch_id, "2")
    clock.advance(3.0)
    for tracker, snap in zip((ours, memory), snaps, strict=True):
        tracker.complete_item(snap.batch_id, "2")
        tracker.fail_item(snap.batch_id, "3", "boom")
    a, b = (t.get(s.batch_id) for t, s in zip((ours, memory), snaps, strict=True))
    assert (a.items, a.progress, a.version, a.status) == (b.items, b.progress, b.version, b.status)
    assert (a.estimated_time_remaining, a.eta_range) == (b.estimated_time_remaining, b.eta_range)
    stored = store.load(snaps[0].batch_id, items=False)
    assert stored is not None
    assert dict(stored.stats) == memory.store._batches[snaps[1].batch_id].stats
    assert [e.version for e in store.outbox_claim(clock() + 1, 10, clock() + 30)] == [a.version]


# -- the probe: user-supplied clients, faults mid-event, close and fork, kept constants --


def test_a_client_that_decodes_responses_is_refused(redis_url: str) -> None:
    """A client made with ``decode_responses=True`` (whose answers no read or event could
    take) is refused when the store is made, not at its first event."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with pytest.raises(ValidationError, match="decode_responses"):
        RedisStore(client=client, prefix=f"dec-{uuid.uuid4()}:")
    client.close()


@pytest.mark.parametrize("kind", ["resp3", "db3", "acl"])
def test_user_clients_take_events_on_the_fast_path(redis_url: str, admin: Any, kind: str) -> None:
    """A client of RESP3, of database 3, or of an ACL user with a password runs the events on
    the store's own connections with its settings: the batch lands where its reads find it."""
    settings_: dict[str, Any] = {"protocol": 3} if kind == "resp3" else {}
    if kind == "acl":
        user = f"bt-{uuid.uuid4().hex[:8]}"
        admin.acl_setuser(
            user,
            enabled=True,
            passwords=["+secret"],
            keys=["~*"],
            channels=["*"],
            commands=["+@all", "-@dangerous", "+@scripting"],
        )
        settings_ = {"username": user, "password": "secret"}
    url = redis_url.rsplit("/", 1)[0] + ("/3" if kind == "db3" else "/0")
    client = redis.Redis.from_url(url, **settings_)
    store = RedisStore(client=client, prefix=f"{kind}-{uuid.uuid4()}:")
    assert store._pool is not None
    tracker = BatchTracker(store)
    snap = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")])
    _run(tracker, snap.batch_id, ["a"])
    assert store._idle  # the event ran on a connection of the store's own
    tracker.fail_item(snap.batch_id, "b", "boom")
    done = tracker.get(snap.batch_id)
    assert (done.progress.completed, done.progress.failed, done.version) == (1, 1, 3)
    if kind == "db3":
        assert not admin.exists(f"{store.prefix}b:{snap.batch_id}")  # not in database 0
    store.close()
    client.close()
    if kind == "acl":
        admin.acl_deluser(settings_["username"])


_BUSY = """
local t = redis.call('TIME')
local start = t[1] * 1e6 + t[2]
repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - start > tonumber(ARGV[1])
return 1
"""


def _busy(url: str, seconds: float) -> threading.Thread:
    """The server blocked for ``seconds`` by a script that spins (as DEBUG SLEEP would),
    from now on: the thread that waits for it."""
    client = redis.Redis.from_url(url)

    def spin() -> None:
        client.eval(_BUSY, 0, int(seconds * 1e6))
        client.close()

    thread = threading.Thread(target=spin)
    thread.start()
    time.sleep(0.15)  # the script is running
    return thread


@pytest.fixture
def own_redis(tmp_path: Any) -> Iterator[tuple[str, int]]:
    """A redis-server of this test's own (it is blocked, reconfigured or restarted)."""
    proc, port = start_redis(tmp_path)
    yield f"redis://127.0.0.1:{port}/0", port
    proc.terminate()
    proc.wait(10)


@pytest.mark.parametrize("single", [False, True], ids=["pool", "single-connection"])
def test_an_event_whose_answer_timed_out_is_answered_as_applied(
    own_redis: tuple[str, int], single: bool
) -> None:
    """A start and a completion whose answers time out (the server busy past the socket
    timeout) but which applied are answered ``changed`` when sent again (by the store or by
    redis-py's own retries), counted once: never "unchanged", which tells a worker that
    someone else took the item. So is apply_all()."""
    url, port = own_redis
    client = redis.Redis(  # made so, redis-py retries on timeouts
        host="127.0.0.1", port=port, socket_timeout=0.4, single_connection_client=single
    )
    store = RedisStore(client=client, prefix=f"lost-{uuid.uuid4()}:")
    tracker = BatchTracker(store)
    snap = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")])
    tracker.start_item(snap.batch_id, "b")
    busy = _busy(url, 1.0)
    started = tracker.start_item(snap.batch_id, "a")
    busy.join()
    busy = _busy(url, 1.0)
    completed = tracker.complete_item(snap.batch_id, "a")
    busy.join()
    assert (started.changed, started.item.attempts) == (True, 1)
    assert (completed.changed, completed.progress.completed) == (True, 1)
    busy = _busy(url, 1.0)
    (result,) = store.apply_all(
        snap.batch_id,
        [
            Transition(
                "b",
                Status.FAILED,
                frozenset({Status.PENDING, Status.PROCESSING}),
                time.time(),
                "boom",
                time.time() + 60,
                time.time() + 60,
                {},
            )
        ],
    )
    busy.join()
    assert (result.outcome, result.previous) == (Outcome.APPLIED, Status.PROCESSING)
    done = tracker.get(snap.batch_id)
    assert (done.progress.completed, done.progress.failed, done.version) == (1, 1, 4)
    assert done.items[0].attempts == 1
    store.close()
    client.close()


def test_kept_created_at_and_total_give_way_to_a_batch_made_again_under_the_same_id(
    redis_url: str,
) -> None:
    """A batch deleted by another store (another process) and made again under the same id
    with other items is answered with its own total and created_at, not the ones the first
    store kept from the batch before."""
    prefix = f"again-{uuid.uuid4()}:"
    ours, other = RedisStore(redis_url, prefix=prefix), RedisStore(redis_url, prefix=prefix)
    clock = FakeClock(1000.0)
    snap = BatchTracker(ours, clock=clock).create_batch([("a", "a.jpg"), ("b", "b.jpg")])
    _run(BatchTracker(ours, clock=clock), snap.batch_id, ["a"])
    assert snap.batch_id in ours._constants
    before = other.load(snap.batch_id, items=False)
    assert before is not None
    assert other.delete(snap.batch_id)
    clock.advance(10.0)
    items = [ItemSnapshot(i, f"{i}.jpg") for i in ("a", "b", "c")]
    other.create(
        attrs.evolve(
            before,
            created_at=clock(),
            updated_at=clock(),
            expires_at=clock() + 3600,
            version=0,
            progress=Progress(3, 0, 0, 0, 3, 0),
            stats={},
        ),
        items,
    )
    event = BatchTracker(ours, clock=clock).start_item(snap.batch_id, "a")
    assert (event.progress.total, event.progress.pending) == (3, 2)
    record = ours.load(snap.batch_id, items=False)
    assert record is not None
    assert ours._constants[snap.batch_id][:2] == (record.created_at, 3) == (clock(), 3)
    ours.close()
    other.close()


def test_64_threads_stay_within_the_pools_max_connections(redis_url: str, admin: Any) -> None:
    """64 threads sharing a store whose client pool allows 4 connections never open more
    than 4 (the event's own connections are the pool's), and every event applies once."""
    name = f"cap-{uuid.uuid4().hex[:8]}"
    pool = redis.BlockingConnectionPool.from_url(
        redis_url, max_connections=4, timeout=30, client_name=name
    )
    client = redis.Redis(connection_pool=pool)
    store = RedisStore(client=client, prefix=f"{name}:")
    tracker = BatchTracker(store)
    ids = [str(n) for n in range(256)]
    snap = tracker.create_batch([(i, f"{i}.jpg") for i in ids])
    errors: list[BaseException] = []
    most = [0]
    running = threading.Event()
    running.set()

    def watch() -> None:
        while running.is_set():
            most[0] = max(most[0], sum(c["name"] == name for c in admin.client_list()))
            time.sleep(0.005)

    def work(part: list[str]) -> None:
        try:
            _run(tracker, snap.batch_id, part)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=work, args=(ids[k::64],)) for k in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    running.clear()
    watcher.join()
    assert errors == []
    assert 1 <= most[0] <= 4
    done = tracker.get(snap.batch_id)
    assert (done.progress.completed, done.version) == (256, 512)
    store.close()
    client.close()


def test_events_after_close_are_a_store_error(redis_url: str, admin: Any) -> None:
    """An event on a closed store is refused with StoreError (as the other stores refuse
    it), and opens no connection."""
    store = RedisStore(redis_url, prefix=f"closed-{uuid.uuid4()}:")
    tracker = BatchTracker(store)
    snap = tracker.create_batch([("a", "a.jpg")])
    store.close()
    with pytest.raises(StoreError, match="closed"):
        tracker.start_item(snap.batch_id, "a")
    assert store._idle == []


def test_events_while_connections_are_killed_are_never_answered_unchanged(
    own_redis: tuple[str, int],
) -> None:
    """64 threads run events while the server kills every client connection again and
    again (``CLIENT KILL``): each event is answered as applied or with StoreError (when
    even the retries failed), never "unchanged"; the counts agree with the answers."""
    url, port = own_redis
    client = redis.Redis(host="127.0.0.1", port=port)
    store = RedisStore(client=client, prefix=f"kill-{uuid.uuid4()}:")
    tracker = BatchTracker(store)
    ids = [str(n) for n in range(512)]
    snap = tracker.create_batch([(i, f"{i}.jpg") for i in ids])
    answers: dict[str, int] = {}
    lock = threading.Lock()
    killing = threading.Event()
    killing.set()

    def kill() -> None:
        admin = redis.Redis.from_url(url)
        while killing.is_set():
            admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            time.sleep(0.005)
        admin.close()

    def work(part: list[str]) -> None:
        for i in part:
            for step in (tracker.start_item, tracker.complete_item):
                try:
                    answer = "changed" if step(snap.batch_id, i).changed else "unchanged"
                except StoreError:
                    answer = "error"
                with lock:
                    key = f"{step.__name__} {answer}"
                    answers[key] = answers.get(key, 0) + 1
                if answer != "changed":
                    break

    killer = threading.Thread(target=kill)
    killer.start()
    threads = [threading.Thread(target=work, args=(ids[k::64],)) for k in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    killing.clear()
    killer.join()
    assert not any(key.endswith("unchanged") for key in answers), answers
    done = tracker.get(snap.batch_id).progress
    completed = answers.get("complete_item changed", 0)
    assert completed <= done.completed <= completed + answers.get("complete_item error", 0)
    starts = answers.get("start_item changed", 0)
    assert starts <= done.processing + done.completed <= starts + answers.get("start_item error", 0)
    store.close()
    client.close()


def test_close_while_64_threads_are_mid_event_leaves_no_connection(
    redis_url: str, admin: Any
) -> None:
    """close() while 64 threads run events: each event is answered (applied) or fails with
    StoreError (refused as closed, or its connection closed under it), and afterwards no
    connection of the store stays open on the server and none is counted as borrowed."""
    name = f"closing-{uuid.uuid4().hex[:8]}"
    store = RedisStore(f"{redis_url}?client_name={name}", prefix=f"{name}:")
    tracker = BatchTracker(store)
    ids = [str(n) for n in range(64 * 200)]
    snap = tracker.create_batch([(i, f"{i}.jpg") for i in ids])
    refused: list[StoreError] = []
    others: list[BaseException] = []
    applied = [0]

    def work(part: list[str]) -> None:
        try:
            for i in part:
                tracker.start_item(snap.batch_id, i)
                applied[0] += 1
                tracker.complete_item(snap.batch_id, i)
                applied[0] += 1
        except StoreError as exc:
            refused.append(exc)
        except BaseException as exc:  # pragma: no cover - reported below
            others.append(exc)

    threads = [threading.Thread(target=work, args=(ids[k::64],)) for k in range(64)]
    for t in threads:
        t.start()
    while applied[0] < 200:
        time.sleep(0.01)
    store.close()
    for t in threads:
        t.join()
    assert others == []
    assert any("the store is closed" in str(exc) for exc in refused)
    assert (store._idle, store._borrowed) == ([], 0)
    deadline = time.monotonic() + 5
    while any(c["name"] == name for c in admin.client_list()) and time.monotonic() < deadline:
        time.sleep(0.01)  # the server notices a closed socket on its next turn
    assert not [(c["cmd"], c["age"], c["idle"]) for c in admin.client_list() if c["name"] == name]


def _events_in_child(tracker: BatchTracker, batch_id: str, ids: list[str]) -> None:
    for i in ids:
        assert tracker.start_item(batch_id, i).changed
        assert tracker.complete_item(batch_id, i).changed


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_processes_forked_by_multiprocessing_use_the_parents_store(store: RedisStore) -> None:
    """Four processes forked (multiprocessing) while a parent thread runs events on the
    same store each run their events on connections of their own: all answered applied,
    counted once, and the parent's store still works afterwards."""
    tracker = BatchTracker(store)
    ids = [str(n) for n in range(48)]
    snap = tracker.create_batch([(i, f"{i}.jpg") for i in ids])
    _run(tracker, snap.batch_id, ids[:4])
    parent = threading.Thread(target=_events_in_child, args=(tracker, snap.batch_id, ids[4:24]))
    parent.start()
    context = multiprocessing.get_context("fork")
    children = [
        context.Process(target=_events_in_child, args=(tracker, snap.batch_id, ids[k:48:4]))
        for k in range(24, 28)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    parent.join()
    assert [child.exitcode for child in children] == [0, 0, 0, 0]
    done = tracker.get(snap.batch_id)
    assert (done.progress.completed, done.version, done.status) == (48, 96, "completed")


@pytest.mark.parametrize("call", ["retry named", "retry all", "cancel"])
def test_a_bulk_change_whose_answer_was_lost_is_answered_as_it_applied(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """A retry or cancel of several items (``apply_many``) that applied but whose answer
    was lost is sent again by redis-py's retry and answered with the items it moved,
    counted once: not InvalidTransition (the named items are pending by then) or 0."""
    client = redis.Redis.from_url(redis_url, retry=Retry(NoBackoff(), 3))
    store = RedisStore(client=client, prefix=f"lose-many-{uuid.uuid4()}:")
    tracker = BatchTracker(store)
    snap = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg"), ("c", "c.jpg")])
    if call != "cancel":
        for item in ("a", "b"):
            tracker.start_item(snap.batch_id, item)
            tracker.fail_item(snap.batch_id, item, "boom")
    before = tracker.get(snap.batch_id).version
    kind = client.connection_pool.connection_class
    read = kind.read_response
    lost = [0]

    def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:
        reply = read(self, *args, **kwargs)
        if not lost[0] and isinstance(reply, list) and reply and reply[0] == b"applied":
            lost[0] += 1
            self.disconnect()
            raise redis.exceptions.ConnectionError("the answer was lost (test)")
        return reply

    monkeypatch.setattr(kind, "read_response", read_response)
    if call == "retry named":
        count = tracker.retry(snap.batch_id, ["a", "b"])
    elif call == "retry all":
        count = tracker.retry(snap.batch_id)
    else:
        count = tracker.cancel(snap.batch_id)
    assert lost == [1]
    expected = 3 if call == "cancel" else 2
    assert count == expected
    done = tracker.get(snap.batch_id)
    assert done.version == before + expected
    assert done.progress.pending == (0 if call == "cancel" else 3)
    store.close()
    client.close()


@pytest.mark.parametrize("call", ["event", "single-connection event", "apply_all", "apply"])
def test_an_answer_lost_after_the_call_applied_is_answered_applied_on_retry(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """The answer of a call that applied is lost once (the connection drops as it is read):
    redis-py's retry (or the store's) sends the same call again and it is answered as
    applied with the item's previous status, counted once."""
    client = redis.Redis.from_url(
        redis_url,
        retry=Retry(NoBackoff(), 3),
        single_connection_client=call == "single-connection event",
    )
    store = RedisStore(client=client, prefix=f"lose-{uuid.uuid4()}:")
    tracker = BatchTracker(store)
    snap = tracker.create_batch([("a", "a.jpg")])
    tracker.start_item(snap.batch_id, "a")
    kind = client.connection_pool.connection_class
    read = kind.read_response
    lost = [0]

    def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:
        reply = read(self, *args, **kwargs)
        first = reply[0] if isinstance(reply, list) and reply else None
        if isinstance(first, list):  # apply_all's: one answer per transition
            first = first[0]
        if not lost[0] and first == b"applied":
            lost[0] += 1
            self.disconnect()
            raise redis.exceptions.ConnectionError("the answer was lost (test)")
        return reply

    monkeypatch.setattr(kind, "read_response", read_response)
    now = time.time()
    fail = (Status.FAILED, frozenset({Status.PENDING, Status.PROCESSING}))
    transition = Transition("a", *fail, now, "boom", now + 60, now + 60, {})
    if call == "apply":
        result = store.apply(snap.batch_id, transition)
        answer = (result.outcome, result.previous)
    elif call == "apply_all":
        (result,) = store.apply_all(snap.batch_id, [transition])
        answer = (result.outcome, result.previous)
    else:
        event = tracker.fail_item(snap.batch_id, "a", "boom")
        answer = (Outcome.APPLIED if event.changed else Outcome.UNCHANGED, Status.PROCESSING)
    assert lost == [1]
    assert answer == (Outcome.APPLIED, Status.PROCESSING)
    done = tracker.get(snap.batch_id)
    assert (done.progress.failed, done.version) == (1, 2)
    store.close()
    client.close()
