"""Status polls of an unchanged batch cost one light version read and answer a kept body;
a changed batch, another query, another owner or a later second never get a stale one."""

from __future__ import annotations

import asyncio
import gc
import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("python_multipart")
from batchtrack import BatchTracker, MemoryStore, Orchestrator, SQLiteStore
from batchtrack._http import Api
from batchtrack._wire import Body, Request
from batchtrack.asgi import App, create_app
from batchtrack.stores.base import BatchVersion, Store
from batchtrack.testing import FakeClock
from batchtrack.uploads import UploadStore

READS = ("load", "load_items", "lost", "version_of")


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    made: Store
    if request.param == "redis":
        from batchtrack.stores.redis import RedisStore

        made = RedisStore(request.getfixturevalue("redis_url"), prefix=f"t-{uuid.uuid4()}:")
    elif request.param == "sqlite":
        made = SQLiteStore(tmp_path / "poll.db")
    else:
        made = MemoryStore()
    yield made
    made.close()


class Poller:
    """The API over ``store`` with a fake clock, asked in process as ``owner``."""

    def __init__(self, root: Path, store: Store, clock: FakeClock) -> None:
        self.tracker = BatchTracker(store, ttl=3600.0, clock=clock)
        self.runner = Orchestrator(self.tracker, lambda item: None, concurrency=1)
        app = create_app(
            self.tracker, self.runner, UploadStore(root / "uploads"), owner=_from_header
        )
        self.api: Api = app.api

    def poll(
        self, batch_id: str, owner: str = "alice", query: str = "", etag: str | None = None
    ) -> tuple[int, str, dict[str, Any] | None]:
        headers = {"x-user": owner}
        if etag is not None:
            headers["if-none-match"] = etag
        path = f"/api/batch-status/{batch_id}"
        request = Request("GET", path, headers, Body(lambda size: b"", 0), "", None, query)
        answer = self.api.handle(request)
        body = json.loads(answer.body) if answer.body else None
        return answer.status, dict(answer.headers).get("ETag", ""), body

    def close(self) -> None:
        self.runner.close(cancel_pending=True)


def _from_header(headers: Any) -> str | None:
    return headers.get("x-user")  # type: ignore[no-any-return]


@pytest.fixture
def poller(tmp_path: Path, store: Store, clock: FakeClock) -> Iterator[Poller]:
    made = Poller(tmp_path, store, clock)
    yield made
    made.close()


@pytest.fixture
def reads(store: Store, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every read the store's class gets, by method name."""
    counted: Counter[str] = Counter()
    kind = type(store)
    for name in READS:
        method = getattr(kind, name)

        def counting(self: Any, *args: Any, _name: str = name, _m: Any = method, **kw: Any) -> Any:
            counted[_name] += 1
            return _m(self, *args, **kw)

        monkeypatch.setattr(kind, name, counting)
    return counted


def _running_batch(tracker: BatchTracker, clock: FakeClock, owner: str = "alice") -> Any:
    """Five items: two completed (2 s each), one processing, two pending."""
    snap = tracker.create_batch([f"{n}.jpg" for n in range(5)], owner=owner)
    for item in snap.items[:2]:
        tracker.start_item(snap.batch_id, item.id)
        clock.advance(2)
        tracker.complete_item(snap.batch_id, item.id)
    tracker.start_item(snap.batch_id, snap.items[2].id)
    return snap


def test_an_unchanged_batch_costs_one_version_read(
    poller: Poller, store: Store, clock: FakeClock, reads: Counter[str]
) -> None:
    """Polling a running batch again in the same second reads only its version, owner
    and expiry (no header, no items, no lost-item scan) and answers the same bytes."""
    batch = _running_batch(poller.tracker, clock).batch_id
    first = poller.poll(batch)
    assert first[0] == 200
    assert first[2] is not None
    assert first[2]["estimatedTimeRemaining"] is not None
    reads.clear()
    for _ in range(3):
        assert poller.poll(batch) == first
    etag = first[1]
    assert poller.poll(batch, etag=etag)[:2] == (304, etag)
    light = Counter(version_of=4)
    if type(store).__name__ != "RedisStore":  # Store's default: a header load
        light["load"] = 4
    assert reads == light


def test_a_changed_batch_is_never_answered_from_the_kept_body(
    poller: Poller, clock: FakeClock
) -> None:
    """A progress report, counts that move, a failed item, a retry, a pause and a cancel
    each show in the very next poll, in the same second of the clock."""
    tracker = poller.tracker
    snap = _running_batch(tracker, clock)
    batch, items = snap.batch_id, snap.items
    seen = [poller.poll(batch)]

    def changed() -> dict[str, Any]:
        answer = poller.poll(batch)
        assert answer[0] == 200
        assert answer[1] != seen[-1][1]
        assert answer[2] != seen[-1][2]
        seen.append(answer)
        assert answer[2] is not None
        return answer[2]

    tracker.report(batch, items[2].id, 0.5, stage="resizing")
    assert changed()["images"][2]["progress"] == 0.5
    tracker.complete_item(batch, items[2].id)
    assert changed()["progress"]["completed"] == 3
    tracker.start_item(batch, items[3].id)
    tracker.fail_item(batch, items[3].id, "broken")
    body = changed()
    assert body["progress"]["failed"] == 1
    assert body["images"][3]["status"] == "failed"
    tracker.retry(batch, [items[3].id])
    assert changed()["progress"]["failed"] == 0
    assert tracker.pause(batch)
    assert changed()["estimatedTimeRemaining"] is None
    assert tracker.unpause(batch)
    changed()
    tracker.cancel(batch)
    assert changed()["status"] != "processing"


def test_another_owner_never_gets_the_kept_body(poller: Poller, clock: FakeClock) -> None:
    """A body kept for its owner's polls is 404 for anyone else, and for the owner once
    the batch expired."""
    batch = _running_batch(poller.tracker, clock).batch_id
    assert poller.poll(batch)[0] == 200
    assert poller.poll(batch)[0] == 200
    assert poller.poll(batch, owner="mallory")[0] == 404
    assert poller.poll(batch, owner="mallory", query="status=failed")[0] == 404
    poller.tracker.complete_item(batch, poller.tracker.get(batch).items[2].id)
    poller.tracker.cancel(batch)  # finished: it expires an hour from now
    assert poller.poll(batch)[0] == 200
    clock.advance(3601)
    assert poller.poll(batch)[0] == 404


def test_each_query_keeps_a_body_of_its_own(poller: Poller, clock: FakeClock) -> None:
    """A page, a status filter and the whole batch are kept apart, and a kept page still
    follows the batch's changes."""
    snap = _running_batch(poller.tracker, clock)
    batch = snap.batch_id
    whole = poller.poll(batch)[2]
    page = poller.poll(batch, query="limit=2")[2]
    done = poller.poll(batch, query="status=completed")[2]
    assert whole is not None
    assert page is not None
    assert done is not None
    assert len(whole["images"]) == 5
    assert [i["id"] for i in page["images"]] == [i.id for i in snap.items[:2]]
    assert page["nextAfter"] == snap.items[1].id
    assert len(done["images"]) == 2
    assert poller.poll(batch, query="limit=2")[2] == page
    assert poller.poll(batch, query="status=completed")[2] == done
    poller.tracker.complete_item(batch, snap.items[2].id)
    again = poller.poll(batch, query="status=completed")[2]
    assert again is not None
    assert len(again["images"]) == 3


def test_the_eta_still_moves_with_the_clock(poller: Poller, clock: FakeClock) -> None:
    """An unchanged running batch's ETA and ETag move once the clock reaches another
    whole second: the kept body is only reused within the second it was made in."""
    batch = _running_batch(poller.tracker, clock).batch_id
    first = poller.poll(batch)
    assert poller.poll(batch) == first
    clock.advance(3)
    later = poller.poll(batch)
    assert later[0] == 200
    assert later[1] != first[1]
    assert first[2] is not None
    assert later[2] is not None
    assert later[2]["estimatedTimeRemaining"] < first[2]["estimatedTimeRemaining"]


def test_version_of_reads_what_load_reads(store: Store, clock: FakeClock) -> None:
    """A store's light version read agrees with its header, and is None for no batch."""
    tracker = BatchTracker(store, ttl=3600.0, clock=clock)
    snap = _running_batch(tracker, clock, owner="alice")
    record = store.load(snap.batch_id, items=False)
    assert record is not None
    assert store.version_of(snap.batch_id) == BatchVersion(
        record.version, "alice", record.expires_at
    )
    assert store.version_of(str(uuid.uuid4())) is None


def test_instrumented_store_forwards_version_of(store: Store, clock: FakeClock) -> None:
    """The metrics wrapper answers version_of with the wrapped store's own method."""
    pytest.importorskip("prometheus_client")
    from batchtrack.metrics import InstrumentedStore, Metrics

    inner_version_of: Callable[[str], BatchVersion | None] = store.version_of
    from prometheus_client import CollectorRegistry

    wrapped = InstrumentedStore(store, Metrics(CollectorRegistry()))
    tracker = BatchTracker(store, ttl=3600.0, clock=clock)
    batch = tracker.create_batch(["a.jpg"], owner="alice").batch_id
    assert wrapped.version_of(batch) == inner_version_of(batch)
    assert type(wrapped).version_of is not Store.version_of  # not the default's load


# -- ASGI: a kept body answered on the event loop (Redis) ----------------------------------


async def _async_owner(headers: Any) -> str | None:
    return headers.get("x-user")  # type: ignore[no-any-return]


class LoopPolls:
    """The ASGI app over a Redis store, asked in process on one event loop; every hop to
    its thread pool (``App._run``) counted."""

    def __init__(
        self,
        root: Path,
        store: Store,
        clock: FakeClock,
        owner: Any,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        self.tracker = BatchTracker(store, ttl=3600.0, clock=clock)
        self.runner = Orchestrator(self.tracker, lambda item: None, concurrency=1)
        options: dict[str, Any] = {} if owner is None else {"owner": owner}
        self.app = create_app(self.tracker, self.runner, UploadStore(root / "uploads"), **options)
        self.hops = 0
        run = App._run

        async def counted(app: App, call: Callable[[], Any]) -> Any:
            self.hops += 1
            return await run(app, call)

        monkeypatch.setattr(App, "_run", counted)
        self.cookie = ""

    async def poll(self, batch_id: str, user: str = "alice") -> tuple[int, dict[str, str], bytes]:
        headers = [(b"x-user", user.encode())]
        if self.cookie:
            headers.append((b"cookie", self.cookie.encode()))
        scope = {
            "type": "http",
            "method": "GET",
            "path": f"/api/batch-status/{batch_id}",
            "root_path": "",
            "headers": headers,
            "query_string": b"",
            "scheme": "http",
            "client": ("127.0.0.1", 5000),
        }
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        head = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
        if "set-cookie" in head:
            self.cookie = head["set-cookie"].split(";")[0]
        return sent[0]["status"], head, sent[1]["body"]

    async def shut(self) -> None:
        """The lifespan's shutdown: the loop's Redis client and the pool are closed."""
        messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

        async def receive() -> dict[str, Any]:
            return next(messages)

        async def send(message: Any) -> None:
            pass

        await self.app({"type": "lifespan"}, receive, send)
        self.runner.close(cancel_pending=True)


@pytest.fixture
def redis_store(redis_url: str) -> Iterator[Store]:
    from batchtrack.stores.redis import RedisStore

    made = RedisStore(redis_url, prefix=f"t-{uuid.uuid4()}:")
    yield made
    made.close()


@pytest.mark.parametrize("owner", [None, _async_owner], ids=["cookie", "async-owner"])
def test_a_kept_redis_poll_is_answered_on_the_loop_without_the_pool(
    tmp_path: Path,
    redis_store: Store,
    clock: FakeClock,
    owner: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Polling an unchanged Redis batch again in the same second is answered on the event
    loop from its kept body (no hop to the app's threads), with the same bytes."""
    polls = LoopPolls(tmp_path, redis_store, clock, owner, monkeypatch)

    async def run() -> None:
        try:
            first = await polls.poll(str(uuid.uuid4()))  # a session cookie, if any
            assert first[0] == 404
            owner_id = "alice" if owner else polls.cookie.partition("=")[2].split(".")[0]
            prefix = "" if owner else "session:"
            batch = _running_batch(polls.tracker, clock, owner=prefix + owner_id).batch_id
            made = await polls.poll(batch)
            assert made[0] == 200
            hops = polls.hops
            for _ in range(3):
                assert await polls.poll(batch) == made
            assert polls.hops == hops  # no thread: answered on the loop
        finally:
            await polls.shut()

    asyncio.run(run())


def test_a_change_from_another_tracker_is_seen_by_the_next_loop_poll(
    tmp_path: Path,
    redis_store: Any,
    redis_url: str,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A change made by another tracker on the same Redis (another process's) in the same
    second is in the very next poll: the kept body is never answered for it."""
    from batchtrack.stores.redis import RedisStore

    polls = LoopPolls(tmp_path, redis_store, clock, _async_owner, monkeypatch)
    other_store = RedisStore(redis_url, prefix=redis_store.prefix)
    other = BatchTracker(other_store, ttl=3600.0, clock=clock)

    async def run() -> None:
        try:
            snap = _running_batch(polls.tracker, clock)
            made = await polls.poll(snap.batch_id)
            assert await polls.poll(snap.batch_id) == made
            other.complete_item(snap.batch_id, snap.items[2].id)
            status, _, body = await polls.poll(snap.batch_id)
            assert status == 200
            assert json.loads(body)["progress"]["completed"] == 3
            assert polls.hops > 0
        finally:
            await polls.shut()

    try:
        asyncio.run(run())
    finally:
        other_store.close()


def test_another_owner_never_gets_a_body_kept_on_the_loop(
    tmp_path: Path, redis_store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another caller's poll of a batch whose body is kept is refused as before, not
    answered from the loop; so is an anonymous one (the owner answers None)."""
    polls = LoopPolls(tmp_path, redis_store, clock, _async_owner, monkeypatch)

    async def run() -> None:
        try:
            batch = _running_batch(polls.tracker, clock).batch_id
            assert (await polls.poll(batch))[0] == 200
            assert (await polls.poll(batch, user="mallory"))[0] == 404
            assert (await polls.poll(batch, user=""))[0] == 401
            assert (await polls.poll(batch))[0] == 200
        finally:
            await polls.shut()

    asyncio.run(run())


def test_a_redis_store_given_a_client_still_answers_polls(
    tmp_path: Path, redis_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis store made from a client (no URL to open an async one) answers its polls
    in the app's threads, right."""
    import redis

    from batchtrack.stores.redis import RedisStore

    client = redis.Redis.from_url(redis_url)
    store = RedisStore(client=client, prefix=f"t-{uuid.uuid4()}:")
    polls = LoopPolls(tmp_path, store, clock, _async_owner, monkeypatch)

    async def run() -> None:
        try:
            batch = _running_batch(polls.tracker, clock).batch_id
            made = await polls.poll(batch)
            assert made[0] == 200
            assert await polls.poll(batch) == made
        finally:
            await polls.shut()

    try:
        asyncio.run(run())
    finally:
        client.close()


def test_the_loops_redis_client_is_closed_with_the_loop_without_a_lifespan(
    tmp_path: Path, redis_store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app run without a lifespan leaves no Redis connection of its loop unclosed when
    the loop ends (an unclosed one warns, which fails the test)."""
    polls = LoopPolls(tmp_path, redis_store, clock, _async_owner, monkeypatch)

    async def run() -> None:
        batch = _running_batch(polls.tracker, clock).batch_id
        made = await polls.poll(batch)
        assert await polls.poll(batch) == made

    try:
        asyncio.run(run())
    finally:
        polls.runner.close(cancel_pending=True)
    gc.collect()
    assert not redis_store._async_reads  # type: ignore[attr-defined]
