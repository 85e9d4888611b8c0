"""PostgresStore against a real PostgreSQL: processes, a killed server, schema versions,
bad settings and refusals, and change notifications."""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import pytest

from conftest import Postgres, drop_postgres_tables, start_postgres
from http_support import free_port

pytest.importorskip("psycopg")
import psycopg
from psycopg_pool import ConnectionPool

from batchtrack import (
    BatchTracker,
    Item,
    Orchestrator,
    Status,
    StoreError,
    ValidationError,
)
from batchtrack._extras import install_command
from batchtrack.stores import postgres as postgres_module
from batchtrack.stores.base import Outcome, Transition, TransitionResult
from batchtrack.stores.postgres import SCHEMA_VERSION, PostgresStore, SchemaVersionError
from batchtrack.testing import FakeClock
from batchtrack.testing.conformance import _items, _record, _transition


@pytest.fixture
def prefix(postgres_url: str) -> Iterator[str]:
    """A table prefix of this test's own; its tables are dropped afterwards."""
    name = f"p{uuid.uuid4().hex[:12]}_"
    yield name
    drop_postgres_tables(postgres_url, f"{name}%")


def _sql(url: str, statement: str, *args: object) -> list[tuple[object, ...]]:
    """Run one statement on a connection of its own; its rows (none for commands)."""
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement, args or None)
        return cursor.fetchall() if cursor.description else []


# -- processes -----------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import sys
    from batchtrack import BatchTracker, InvalidTransition
    from batchtrack.stores.postgres import PostgresStore

    url, prefix, batch_id, *item_ids = sys.argv[1:]
    tracker = BatchTracker(PostgresStore(url, table_prefix=prefix))
    for item_id in item_ids:
        try:
            if not tracker.start_item(batch_id, item_id).changed:
                continue  # the other process has it
            tracker.complete_item(batch_id, item_id)
        except InvalidTransition:
            continue  # the other process finished it already
        print(item_id, flush=True)
    tracker.store.close()
    """
)

READER = textwrap.dedent(
    """
    import sys
    from batchtrack import BatchTracker, Status
    from batchtrack.stores.postgres import PostgresStore

    url, prefix, batch_id = sys.argv[1:]
    tracker = BatchTracker(PostgresStore(url, table_prefix=prefix))
    seen = []
    while True:
        snap = tracker.get(batch_id)
        p = snap.progress
        assert p.total == p.completed + p.failed + p.processing + p.pending, p
        counted = {s: sum(1 for i in snap.items if i.status is s) for s in Status}
        assert (counted[Status.COMPLETED], counted[Status.PROCESSING]) == (
            p.completed, p.processing
        ), (counted, p)
        assert snap.version == 2 * p.completed + p.processing, (snap.version, p)
        seen.append(p.completed)
        if snap.status is Status.COMPLETED:
            break
    assert seen == sorted(seen), "progress went backwards"
    print(len(seen))
    tracker.store.close()
    """
)


def test_two_processes_and_a_reader_count_exactly(
    postgres_url: str, prefix: str, tmp_path: Path
) -> None:
    """Two processes racing over every item of one batch while a third reads it: each
    transition applies once, and every snapshot the reader sees is consistent."""
    tracker = BatchTracker(PostgresStore(postgres_url, table_prefix=prefix))
    snap = tracker.create_batch([f"{i}.jpg" for i in range(400)])
    ids = [item.id for item in snap.items]
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "reader.py").write_text(READER)
    reader = subprocess.Popen(
        [sys.executable, str(tmp_path / "reader.py"), postgres_url, prefix, snap.batch_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    workers = [
        # Each walks every item, from another end, so that they collide all the way.
        subprocess.Popen(
            [
                sys.executable,
                str(tmp_path / "worker.py"),
                postgres_url,
                prefix,
                snap.batch_id,
                *order,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for order in (ids, ids[200:] + ids[:200])
    ]
    finished: list[str] = []
    for proc in workers:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        finished += out.split()
    reads, errors = reader.communicate(timeout=120)
    assert reader.returncode == 0, errors
    assert int(reads) >= 2
    assert sorted(finished) == sorted(ids)  # each item completed by exactly one process
    final = tracker.get(snap.batch_id)
    assert final.progress.completed == 400
    assert final.version == 800
    assert final.status is Status.COMPLETED
    tracker.store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connections(postgres_url: str, prefix: str) -> None:
    """After fork the child works through a pool of its own; the parent's connections
    are untouched and it carries on."""
    store = PostgresStore(postgres_url, table_prefix=prefix)
    tracker = BatchTracker(store)
    snap = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")])
    tracker.start_item(snap.batch_id, "a")  # the parent's pool is in use before fork
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            tracker.complete_item(snap.batch_id, "a")
            store.close()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    tracker.start_item(snap.batch_id, "b")
    final = tracker.get(snap.batch_id)
    assert [i.status for i in final.items] == [Status.COMPLETED, Status.PROCESSING]
    store.close()


# -- a server that dies --------------------------------------------------------------------


class Counting:
    """A processor that counts its calls per item and takes a little time."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def __call__(self, item: Item) -> None:
        with self.lock:
            assert item.id is not None
            self.calls[item.id] += 1
        time.sleep(0.005)


def test_a_server_killed_mid_batch_and_restarted_loses_and_doubles_nothing(
    tmp_path: Path,
) -> None:
    """kill -9 of the server mid-batch, the same server started again on its folder and
    port 2 s later: the Orchestrator waits it out and finishes the batch, each item
    processed once and counted once."""
    server = start_postgres(tmp_path, options=())  # the shipped settings: fsync on
    store = PostgresStore(server.dsn(), timeout=2)
    tracker = BatchTracker(store)
    work = Counting()
    orch = Orchestrator(tracker, work, concurrency=4, store_retry=60)
    try:
        snap = orch.submit([f"{i}.jpg" for i in range(300)])
        deadline = time.monotonic() + 60
        while sum(work.calls.values()) < 80:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.kill()
        with pytest.raises(StoreError):
            tracker.get(snap.batch_id, items=False)
        time.sleep(2)
        server = start_postgres(tmp_path, port=server.port, data=server.data, options=())
        final = orch.wait(snap.batch_id, timeout=120)
    finally:
        orch.close()
        store.close()
        server.stop()
    assert final.status is Status.COMPLETED
    assert final.progress.completed == 300
    assert final.version == 600
    assert sorted(work.calls.values()) == [1] * 300
    assert set(work.calls) == {i.id for i in final.items}


# -- schema --------------------------------------------------------------------------------


def test_first_use_creates_the_tables_with_their_version(postgres_url: str, prefix: str) -> None:
    """A new prefix gets its seven tables, the schema version, and the indexes."""
    PostgresStore(postgres_url, table_prefix=prefix).close()
    tables = _sql(
        postgres_url,
        "SELECT tablename FROM pg_tables WHERE tablename LIKE %s ORDER BY 1",
        f"{prefix}%",
    )
    assert [t for (t,) in tables] == [
        f"{prefix}batches",
        f"{prefix}items",
        f"{prefix}keys",
        f"{prefix}metadata",
        f"{prefix}outbox",
        f"{prefix}schema",
        f"{prefix}webhooks_gone",
    ]
    assert _sql(postgres_url, f"SELECT version FROM {prefix}schema") == [(SCHEMA_VERSION,)]
    indexes = {
        name
        for (name,) in _sql(
            postgres_url, "SELECT indexname FROM pg_indexes WHERE tablename = %s", f"{prefix}items"
        )
    }
    assert {f"{prefix}items_by_lease", f"{prefix}items_by_version"} <= indexes


def test_many_processes_starting_at_once_create_the_schema_once(
    postgres_url: str, prefix: str
) -> None:
    """8 stores opened at the same moment on a new prefix all work (the advisory lock
    lets one create the tables; the others find them)."""
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []
    stores: list[PostgresStore] = []

    def open_one() -> None:
        barrier.wait()
        try:
            stores.append(PostgresStore(postgres_url, table_prefix=prefix))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    tracker = BatchTracker(stores[0])
    snap = tracker.create_batch(["a.jpg"])
    assert BatchTracker(stores[-1]).get(snap.batch_id).progress.total == 1
    assert _sql(postgres_url, f"SELECT count(*) FROM {prefix}schema") == [(1,)]
    for store in stores:
        store.close()


def test_a_newer_schema_is_refused_and_left_untouched(postgres_url: str, prefix: str) -> None:
    """Tables written by a newer batchtrack: SchemaVersionError, and nothing changes."""
    with PostgresStore(postgres_url, table_prefix=prefix) as store:
        batch_id = BatchTracker(store).create_batch(["a.jpg"]).batch_id
    _sql(postgres_url, f"UPDATE {prefix}schema SET version = %s", SCHEMA_VERSION + 1)
    with pytest.raises(SchemaVersionError, match="newer batchtrack") as info:
        PostgresStore(postgres_url, table_prefix=prefix)
    assert isinstance(info.value, StoreError)
    assert "\n" not in str(info.value)
    assert _sql(postgres_url, f"SELECT version FROM {prefix}schema") == [(SCHEMA_VERSION + 1,)]
    assert _sql(postgres_url, f"SELECT batch_id FROM {prefix}batches") == [(batch_id,)]


def test_an_older_schema_is_migrated_in_place(
    postgres_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A next schema version's steps run once, in order, on tables of the version before,
    keeping their batches; the version is recorded."""
    with PostgresStore(postgres_url, table_prefix=prefix) as store:
        batch_id = BatchTracker(store).create_batch([("a", "a.jpg")]).batch_id
    steps = {
        **postgres_module._MIGRATIONS,
        SCHEMA_VERSION + 1: (
            "ALTER TABLE {items} ADD COLUMN note text",
            "UPDATE {items} SET note = 'migrated'",
        ),
    }
    monkeypatch.setattr(postgres_module, "_MIGRATIONS", steps)
    monkeypatch.setattr(postgres_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with PostgresStore(postgres_url, table_prefix=prefix) as store:
        snap = BatchTracker(store).get(batch_id)
        assert [i.id for i in snap.items] == ["a"]
    assert _sql(postgres_url, f"SELECT version FROM {prefix}schema") == [(SCHEMA_VERSION + 1,)]
    assert _sql(postgres_url, f"SELECT note FROM {prefix}items") == [("migrated",)]
    # Opened again: nothing to do (the step would fail if it ran twice).
    PostgresStore(postgres_url, table_prefix=prefix).close()


def test_a_failing_migration_changes_nothing(
    postgres_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A migration step that fails rolls the whole migration back: a StoreError, and the
    tables and version stay as they were."""
    PostgresStore(postgres_url, table_prefix=prefix).close()
    steps = {
        **postgres_module._MIGRATIONS,
        SCHEMA_VERSION + 1: (
            "ALTER TABLE {items} ADD COLUMN note text",
            "ALTER TABLE {items} ADD COLUMN note text",  # fails: exists already
        ),
    }
    monkeypatch.setattr(postgres_module, "_MIGRATIONS", steps)
    monkeypatch.setattr(postgres_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match="prepare the tables"):
        PostgresStore(postgres_url, table_prefix=prefix)
    assert _sql(postgres_url, f"SELECT version FROM {prefix}schema") == [(SCHEMA_VERSION,)]
    columns = _sql(
        postgres_url,
        "SELECT column_name FROM information_schema.columns WHERE table_name = %s",
        f"{prefix}items",
    )
    assert ("note",) not in columns


# -- bad settings and refusals -------------------------------------------------------------


@pytest.mark.parametrize(
    "dsn", ["postgresql://%zz", "host=a port", "not a dsn at all", "postgresql://h/db?bad=1"]
)
def test_a_dsn_that_does_not_parse_is_a_validation_error(dsn: str) -> None:
    """A DSN libpq cannot parse: one ValidationError line saying what form to use."""
    with pytest.raises(ValidationError, match="postgresql://user") as info:
        PostgresStore(dsn)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"table_prefix": "Bad-Prefix"}, "table_prefix"),
        ({"table_prefix": "x" * 41}, "table_prefix"),
        ({"max_connections": 0}, "max_connections"),
        ({"timeout": -1}, "timeout"),
    ],
)
def test_bad_settings_are_rejected(kwargs: dict[str, object], match: str) -> None:
    """Prefixes that cannot name tables, and impossible pool settings, are refused."""
    with pytest.raises(ValidationError, match=match):
        PostgresStore("postgresql://localhost/db", **kwargs)  # type: ignore[arg-type]


def test_something_else_than_a_dsn_or_pool_is_rejected() -> None:
    """A number or None is not a DSN."""
    for bad in (None, 5432):
        with pytest.raises(ValidationError, match="PostgreSQL URL"):
            PostgresStore(bad)


def test_a_server_that_refuses_is_one_store_error_line() -> None:
    """No server on the port: StoreError at once, one line, the cause attached."""
    started = time.monotonic()
    with pytest.raises(StoreError) as info:
        PostgresStore(f"postgresql://nobody@127.0.0.1:{free_port()}/db")
    assert time.monotonic() - started < 5
    assert "\n" not in str(info.value)
    assert "cannot connect to PostgreSQL" in str(info.value)
    assert isinstance(info.value.__cause__, psycopg.OperationalError)


def test_a_database_that_does_not_exist_is_a_store_error(postgres: Postgres) -> None:
    """A database name the server does not have: one StoreError line naming it."""
    with pytest.raises(StoreError, match='database "nope" does not exist') as info:
        PostgresStore(postgres.dsn("nope"))
    assert "\n" not in str(info.value)


def test_a_user_who_may_not_create_tables_is_told_so(postgres_url: str, prefix: str) -> None:
    """A role without CREATE on the schema: one StoreError line at construction."""
    role = f"r{uuid.uuid4().hex[:10]}"
    _sql(postgres_url, f"CREATE ROLE {role} LOGIN")
    try:
        dsn = postgres_url.replace("batchtrack@", f"{role}@")
        with pytest.raises(StoreError, match="permission denied") as info:
            PostgresStore(dsn, table_prefix=prefix)
        assert "\n" not in str(info.value)
        assert "PostgreSQL refused to prepare the tables" in str(info.value)
    finally:
        _sql(postgres_url, f"DROP ROLE {role}")


def test_a_read_only_user_reads_but_cannot_write(postgres_url: str, prefix: str) -> None:
    """A role that may only SELECT the tables reads batches; creating or changing one is
    one StoreError line, and nothing changes."""
    with PostgresStore(postgres_url, table_prefix=prefix) as owner:
        snap = BatchTracker(owner).create_batch([("a", "a.jpg")])
    role = f"r{uuid.uuid4().hex[:10]}"
    _sql(postgres_url, f"CREATE ROLE {role} LOGIN")
    try:
        for table in ("schema", "batches", "items", "metadata"):
            _sql(postgres_url, f"GRANT SELECT ON {prefix}{table} TO {role}")
        dsn = postgres_url.replace("batchtrack@", f"{role}@")
        with PostgresStore(dsn, table_prefix=prefix) as store:
            tracker = BatchTracker(store)
            assert tracker.get(snap.batch_id).progress.pending == 1
            for attempt in (
                lambda: tracker.start_item(snap.batch_id, "a"),
                lambda: tracker.create_batch(["b.jpg"]),
            ):
                with pytest.raises(StoreError, match="permission denied") as info:
                    attempt()
                assert "\n" not in str(info.value)
            assert tracker.get(snap.batch_id).version == 0
    finally:
        _sql(postgres_url, f"DROP OWNED BY {role}")
        _sql(postgres_url, f"DROP ROLE {role}")


def test_a_pool_given_is_used_and_left_open(postgres_url: str, prefix: str) -> None:
    """PostgresStore(pool) works through the application's pool and does not close it;
    a pool of connections that are not in autocommit mode is refused."""
    with ConnectionPool(
        postgres_url, min_size=1, max_size=2, kwargs={"autocommit": True}, open=True
    ) as pool:
        store = PostgresStore(pool, table_prefix=prefix)
        snap = BatchTracker(store).create_batch(["a.jpg"])
        store.close()
        assert not pool.closed
        with pool.connection() as conn:
            row = conn.execute(f"SELECT total FROM {prefix}batches").fetchone()
        assert row == (1,)
        with pytest.raises(StoreError, match="closed"):
            BatchTracker(store).get(snap.batch_id)
    with (
        ConnectionPool(postgres_url, min_size=1, max_size=1, open=True) as plain,
        pytest.raises(ValidationError, match="autocommit"),
    ):
        PostgresStore(plain, table_prefix=prefix)


def test_import_is_lazy_and_says_how_to_install() -> None:
    """Without psycopg, importing the module fails with the pip line to fix it."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["psycopg"] = None
        try:
            import batchtrack.stores.postgres
        except ImportError as exc:
            print(exc)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert install_command("postgres") in out


# -- change notifications ------------------------------------------------------------------


class Listener:
    """``store.listen`` in a thread, recording what it is told."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.seen: list[str | None] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        self.wait_for(lambda: None in self.seen)

    def _run(self) -> None:
        try:
            self.store.listen(self.seen.append, self.stop)
        except BaseException as exc:
            self.error = exc

    def wait_for(self, condition: object, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():  # type: ignore[operator]
            assert time.monotonic() < deadline, (self.seen, self.error)
            time.sleep(0.01)

    def close(self) -> float:
        """Stop listening; return how long that took."""
        started = time.monotonic()
        self.stop.set()
        self.thread.join(10)
        return time.monotonic() - started


def test_a_listener_hears_every_change_another_connection_makes(
    postgres_url: str, prefix: str
) -> None:
    """None first, then the batch id of every create, transition, retry, cancel, delete
    and expiry, made through another store (another pool); heartbeats and no-ops say
    nothing."""
    clock = FakeClock()
    listening = PostgresStore(postgres_url, table_prefix=prefix)
    other = PostgresStore(postgres_url, table_prefix=prefix)
    tracker = BatchTracker(other, clock=clock, ttl=60)
    listener = Listener(listening)
    try:
        assert listener.seen == [None]
        one = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")]).batch_id
        tracker.start_item(one, "a")
        tracker.heartbeat(one, "a")  # no change of status: nothing
        tracker.start_item(one, "a")  # a no-op: nothing
        tracker.fail_item(one, "a", "boom")
        tracker.retry(one)
        tracker.cancel(one)
        two = tracker.create_batch(["c.jpg"]).batch_id
        tracker.delete(two)
        clock.advance(25 * 3600)
        assert tracker.cleanup() == 1
        listener.wait_for(lambda: len(listener.seen) >= 9)
        time.sleep(0.3)  # anything more would arrive by now
        assert listener.seen == [None, one, one, one, one, one, two, two, one]
    finally:
        listener.close()
        listening.close()
        other.close()
    assert listener.error is None


def test_setting_stop_returns_within_a_second(postgres_url: str, prefix: str) -> None:
    """listen returns within about a second of stop being set, with no error."""
    with PostgresStore(postgres_url, table_prefix=prefix) as store:
        listener = Listener(store)
        time.sleep(0.2)
        assert listener.close() < 1.5
        assert not listener.thread.is_alive()
        assert listener.error is None


def test_a_dropped_notification_connection_raises_store_error(
    postgres_url: str, prefix: str
) -> None:
    """The listener's backend terminated by the server: listen raises StoreError."""
    with PostgresStore(postgres_url, table_prefix=prefix) as store:
        listener = Listener(store)
        try:
            terminated = _sql(
                postgres_url,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE query LIKE %s AND pid <> pg_backend_pid()",
                f"LISTEN%{prefix}changes%",
            )
            assert terminated == [(True,)]
            listener.thread.join(10)
            assert not listener.thread.is_alive()
            assert isinstance(listener.error, StoreError)
            assert "notification connection dropped" in str(listener.error)
            # The store's own pool is not affected.
            assert BatchTracker(store).create_batch(["a.jpg"]).progress.total == 1
        finally:
            listener.close()


def test_a_listener_that_cannot_connect_raises_store_error(postgres_url: str, prefix: str) -> None:
    """listen on a store whose server is gone raises StoreError instead of blocking."""
    with PostgresStore(postgres_url, table_prefix=prefix) as store:
        store._conninfo = f"postgresql://batchtrack@127.0.0.1:{free_port()}/postgres"
        with pytest.raises(StoreError, match="listen"):
            store.listen(lambda batch_id: None, threading.Event())


def test_a_callback_that_raises_is_logged_and_listening_goes_on(
    postgres_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception from on_change is logged; later changes are still delivered."""
    seen: list[str | None] = []

    def on_change(batch_id: str | None) -> None:
        seen.append(batch_id)
        if batch_id is not None and len(seen) == 2:
            raise RuntimeError("listener bug")

    with PostgresStore(postgres_url, table_prefix=prefix) as store:
        stop = threading.Event()
        thread = threading.Thread(target=store.listen, args=(on_change, stop))
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while not seen:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            tracker = BatchTracker(store)
            first = tracker.create_batch(["a.jpg"]).batch_id
            second = tracker.create_batch(["b.jpg"]).batch_id
            while len(seen) < 3:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        finally:
            stop.set()
            thread.join(10)
    assert seen == [None, first, second]
    assert "listener bug" in caplog.text


def test_schema_1_tables_gain_the_paused_flag_and_keep_their_batches(
    postgres_url: str, prefix: str
) -> None:
    """Tables of schema 1 (no paused column) migrate to 2: their batch reads as before,
    not paused, and can be paused; its old counts partition the total with 0 cancelled."""
    with PostgresStore(postgres_url, table_prefix=prefix) as store:
        batch_id = BatchTracker(store).create_batch([("a", "a.jpg"), ("b", "b.jpg")]).batch_id
    _sql(postgres_url, f'ALTER TABLE "{prefix}batches" DROP COLUMN paused')
    _sql(postgres_url, f'DROP TABLE "{prefix}keys", "{prefix}metadata"')
    _sql(postgres_url, f'DROP INDEX "{prefix}batches_by_owner", "{prefix}batches_by_time"')
    _sql(postgres_url, f'ALTER TABLE "{prefix}items" DROP COLUMN progress, DROP COLUMN stage')
    _sql(postgres_url, f"UPDATE {prefix}schema SET version = 1")
    with PostgresStore(postgres_url, table_prefix=prefix) as store:
        tracker = BatchTracker(store)
        snap = tracker.get(batch_id)
        assert (snap.status, snap.progress.cancelled, snap.progress.pending) == (
            Status.PENDING,
            0,
            2,
        )
        assert tracker.pause(batch_id)
        assert tracker.get(batch_id).status is Status.PAUSED
    assert _sql(postgres_url, f"SELECT version FROM {prefix}schema") == [(SCHEMA_VERSION,)]


# -- apply_all: one round trip per orchestrator call ---------------------------------------


class _CountingPool:
    """A store's pool that counts the statements its connections send."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.sent = 0

    @contextlib.contextmanager
    def connection(self) -> Iterator[object]:
        with self.pool.connection() as conn:
            yield _CountingConnection(conn, self)

    def __getattr__(self, name: str) -> object:
        return getattr(self.pool, name)


class _CountingConnection:
    def __init__(self, conn: psycopg.Connection[object], counter: _CountingPool) -> None:
        self._conn = conn
        self._counter = counter

    def execute(self, *args: object, **kwargs: object) -> object:
        self._counter.sent += 1
        return self._conn.execute(*args, **kwargs)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)


def test_an_orchestrator_call_sends_one_statement_to_postgres(
    postgres_url: str, prefix: str
) -> None:
    """An orchestrator's apply_all call (an end and the next start) sends one statement
    in the common case: one round trip, the items it starts read ahead by an earlier
    call."""
    store = PostgresStore(postgres_url, table_prefix=prefix)
    counter = _CountingPool(store._pool)
    store._pool = counter
    calls: list[int] = []
    apply_all = store.apply_all

    def counted(batch_id: str, transitions: Sequence[Transition]) -> list[TransitionResult]:
        before = counter.sent
        try:
            return apply_all(batch_id, transitions)
        finally:
            calls.append(counter.sent - before)

    store.apply_all = counted  # type: ignore[method-assign]
    tracker = BatchTracker(store)
    n = 300
    snap = Orchestrator(tracker, lambda item: None, concurrency=4).run(
        [Item(f"{i}.jpg") for i in range(n)]
    )
    assert snap.progress.completed == n
    assert len(calls) >= 10
    # A write per call, and a read per 64 items started (_AHEAD; 32 here for slack).
    assert sum(calls) <= len(calls) + n // 32 + 3, calls
    store.close()


def test_apply_all_judges_on_what_another_writer_left(postgres_url: str, prefix: str) -> None:
    """apply_all finds a change another store made since its last call (a pause, an
    item finished elsewhere), judges on it, and the call that ends the batch writes its
    end marker, once."""
    ours = PostgresStore(postgres_url, table_prefix=prefix)
    theirs = PostgresStore(postgres_url, table_prefix=prefix)
    ours.create(_record("b", 4), _items(4))
    [first] = ours.apply_all("b", [_transition("item-0", "start", 1001.0)])
    assert first.outcome is Outcome.APPLIED
    assert theirs.set_paused("b", True, 1001.5, 1001.5 + 3600)
    start = attrs.evolve(_transition("item-1", "start", 1002.0), unless_paused=True)
    [paused] = ours.apply_all("b", [start])
    assert paused.outcome is Outcome.PAUSED
    assert theirs.set_paused("b", False, 1002.5, 1002.5 + 3600)
    theirs.apply("b", _transition("item-2", "fail", 1003.0, error="elsewhere"))
    results = ours.apply_all(
        "b",
        [
            _transition("item-0", "complete", 1004.0),
            _transition("item-1", "start", 1004.0),
            _transition("item-2", "start", 1004.0),  # failed by the other store: rejected
            _transition("item-1", "complete", 1004.0),
            _transition("item-3", "fail", 1004.0, error="x"),
        ],
    )
    assert [r.outcome for r in results] == [
        Outcome.APPLIED,
        Outcome.APPLIED,
        Outcome.REJECTED,
        Outcome.APPLIED,
        Outcome.APPLIED,
    ]
    kept = theirs.load("b")
    assert kept is not None
    assert kept.finished_at == 1004.0
    assert kept.version == results[-1].version
    assert [i.status for i in kept.items] == [
        Status.COMPLETED,
        Status.COMPLETED,
        Status.FAILED,
        Status.FAILED,
    ]
    markers = _sql(
        postgres_url,
        f'SELECT version FROM "{prefix}outbox" WHERE url IS NULL AND batch_id = %s',
        "b",
    )
    assert markers == [(kept.version,)]
    ours.close()
    theirs.close()


def test_apply_all_from_two_stores_at_once_loses_and_doubles_nothing(
    postgres_url: str, prefix: str
) -> None:
    """Two stores (two processes' worth) calling apply_all on one batch at once, each on
    items of its own, apply every transition once: the loser of each race reads again."""
    stores = [PostgresStore(postgres_url, table_prefix=prefix) for _ in range(2)]
    n = 40
    stores[0].create(_record("b", n), _items(n))
    applied: list[int] = []

    def worker(store: PostgresStore, mine: range) -> None:
        count = 0
        for i in mine:
            results = store.apply_all(
                "b",
                [
                    _transition(f"item-{i}", "start", 1001.0),
                    _transition(f"item-{i}", "complete", 1001.0),
                ],
            )
            count += sum(r.outcome is Outcome.APPLIED for r in results)
        applied.append(count)

    threads = [
        threading.Thread(target=worker, args=(store, range(k, n, 2)))
        for k, store in enumerate(stores)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(applied) == 2 * n
    kept = stores[1].load("b")
    assert kept is not None
    assert kept.progress.completed == n
    assert kept.version == 2 * n  # one per transition
    assert all(item.status is Status.COMPLETED for item in kept.items)
    for store in stores:
        store.close()
