"""Idempotent starts: keys across processes, through runners, over HTTP, and migrations."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchtrack import BatchTracker, Item, Orchestrator, SQLiteStore, Status, ValidationError
from batchtrack.stores.base import Store
from batchtrack.stores.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA

# Each process opens the store, waits for the start time, creates with one key and prints
# the batch id it got.
RACER = textwrap.dedent(
    """
    import sys, time
    from batchtrack import BatchTracker
    from batchtrack.stores import from_url
    store = from_url(sys.argv[1])
    tracker = BatchTracker(store)
    tracker.get  # warm: the store is open and migrated before the start
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
    snap = tracker.create_batch(["a.jpg", "b.jpg"], owner="alice", key="race-key")
    print(snap.batch_id, flush=True)
    store.close()
    """
)


def _count_batches(store: Store) -> int:
    return len(store.expired(float("inf"), 1000))


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of a store shared between processes, empty at the start."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
    elif request.param == "redis":
        pytest.importorskip("redis")
        base = request.getfixturevalue("redis_url")
        yield base  # keys under a prefix of their own are not needed: checked by id below
    else:
        pytest.importorskip("psycopg")
        yield request.getfixturevalue("postgres_url")


def test_processes_racing_with_one_key_make_exactly_one_batch(shared_url: str) -> None:
    """Four processes creating with the same key and owner at one instant all print the
    same batch id, and the store holds that one batch only."""
    from batchtrack.stores import from_url

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    start = time.time() + 3
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, shared_url, repr(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in outputs]
    ids = {out.strip() for out, _ in outputs}
    assert len(ids) == 1
    (batch_id,) = ids
    store = from_url(shared_url)
    try:
        tracker = BatchTracker(store)
        assert tracker.get(batch_id, owner="alice").progress.total == 2
        if shared_url.startswith("sqlite"):
            assert _count_batches(store) == 1
        else:
            # Shared servers hold other tests' batches: none but this one has the key.
            again = tracker.create_batch(["a.jpg", "b.jpg"], owner="alice", key="race-key")
            assert again.batch_id == batch_id
            tracker.delete(batch_id)
    finally:
        store.close()


# -- runners -------------------------------------------------------------------------------


def test_a_repeated_submit_with_a_key_runs_the_batch_once(tmp_path: Path) -> None:
    """Orchestrator.submit with a key used before returns that batch and runs no item
    again."""
    calls: list[str] = []
    lock = threading.Lock()

    def work(item: Item) -> None:
        with lock:
            calls.append(item.filename)

    tracker = BatchTracker()
    with Orchestrator(tracker, work, concurrency=2) as orchestrator:
        first = orchestrator.submit([Item("a.jpg"), Item("b.jpg")], key="k")
        orchestrator.wait(first.batch_id, timeout=30)
        again = orchestrator.submit([Item("a.jpg"), Item("b.jpg")], key="k")
        assert again.batch_id == first.batch_id
        assert again.status is Status.COMPLETED
        orchestrator.wait(first.batch_id, timeout=30)
        with pytest.raises(ValidationError, match="'k'"):
            orchestrator.submit([Item("c.jpg")], key="k")
    assert sorted(calls) == ["a.jpg", "b.jpg"]


def test_a_repeated_celery_submit_with_a_key_sends_nothing() -> None:
    """CeleryRunner.submit with a key used before returns that batch and sends no
    message."""
    celery = pytest.importorskip("celery")
    from batchtrack.celery import CeleryRunner, tracked_task

    app = celery.Celery("eager", broker="memory://", set_as_current=False)
    app.conf.task_always_eager = True
    calls: list[str] = []
    try:
        tracker = BatchTracker()
        runner = CeleryRunner(tracker, tracked_task(app, tracker, lambda i: calls.append(i.id)))
        first = runner.submit(["/in/a.png"], key="k")
        again = runner.submit(["/in/a.png"], key="k")
        assert again.batch_id == first.batch_id
        assert calls == [first.items[0].id]
    finally:
        app.close()


# -- HTTP ------------------------------------------------------------------------------------


@pytest.fixture(params=["asgi", "wsgi"])
def http(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """A service over the Orchestrator and a client of it, in process, per shell."""
    pytest.importorskip("python_multipart")
    from http_support import Service, clients

    svc = Service(tmp_path)
    try:
        with clients(svc, str(request.param)) as make:
            yield svc, make()
    finally:
        svc.close()


def _uploaded(client: Any, *names: str) -> list[str]:
    from http_support import jpeg

    response = client.post(
        "/api/upload", files=[("files", (n, jpeg(), "image/jpeg")) for n in names]
    )
    assert response.status_code == 201, response.text
    return [f["id"] for f in response.json()["files"]]


def _start(client: Any, ids: list[str], key: str | None) -> Any:
    headers = {} if key is None else {"Idempotency-Key": key}
    return client.post("/api/process-batch", json={"fileIds": ids}, headers=headers)


def test_the_same_idempotency_key_answers_202_with_the_same_batch(http: Any) -> None:
    """A repeated process-batch with one Idempotency-Key answers 202 with the same batchId
    and body shape, and the images run once."""
    svc, client = http
    ids = _uploaded(client, "a.jpg", "b.jpg")
    first = _start(client, ids, "order-17")
    assert first.status_code == 202, first.text
    second = _start(client, ids, "order-17")
    assert second.status_code == 202, second.text
    assert second.json()["batchId"] == first.json()["batchId"]
    assert set(second.json()) == set(first.json())
    assert second.headers["location"] == first.headers["location"]
    svc.orchestrator.wait(first.json()["batchId"], timeout=30)
    assert sorted(svc.processor.runs) == sorted(
        i.id for i in svc.tracker.get(first.json()["batchId"]).items
    )
    assert _start(client, ids, "order-18").json()["batchId"] != first.json()["batchId"]


def test_other_file_ids_under_one_key_are_a_409(http: Any) -> None:
    """Other fileIds under a key used before answer 409 idempotency_conflict."""
    _, client = http
    ids = _uploaded(client, "a.jpg", "b.jpg")
    assert _start(client, ids, "k").status_code == 202
    for other in (ids[:1], ids[::-1]):
        response = _start(client, other, "k")
        assert response.status_code == 409, response.text
        assert response.json()["error"]["code"] == "idempotency_conflict"
        assert "Idempotency-Key" in response.json()["error"]["message"]


def test_a_malformed_idempotency_key_is_a_400(http: Any) -> None:
    """An empty, too long or non-printable Idempotency-Key answers 400
    bad_idempotency_key and starts nothing."""
    svc, client = http
    ids = _uploaded(client, "a.jpg")
    for bad in ("", "x" * 256, "tab\there"):
        response = _start(client, ids, bad)
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["error"]["code"] == "bad_idempotency_key"
    assert svc.processor.runs == []


def test_a_runner_without_keys_works_and_refuses_a_keyed_request(tmp_path: Path) -> None:
    """A runner whose submit takes no key still starts batches; a request with an
    Idempotency-Key gets a 501 instead of a second batch."""
    pytest.importorskip("python_multipart")
    from http_support import RecordingRunner, Service, clients

    svc = Service(tmp_path, runner=RecordingRunner)
    try:
        with clients(svc, "wsgi") as make:
            client = make()
            ids = _uploaded(client, "a.jpg")
            assert _start(client, ids, None).status_code == 202
            response = _start(client, ids, "k")
            assert response.status_code == 501, response.text
            assert response.json()["error"]["code"] == "idempotency_not_supported"
    finally:
        svc.close()


def test_openapi_documents_the_idempotency_key_and_the_409(http: Any) -> None:
    """The process-batch operation lists the Idempotency-Key header and a 409."""
    _, client = http
    spec = client.get("/api/openapi.json").json()
    operation = spec["paths"]["/process-batch"]["post"]
    assert [p["name"] for p in operation["parameters"]] == ["Idempotency-Key"]
    assert "idempotency_conflict" in operation["responses"]["409"]["description"]


# -- migrations ------------------------------------------------------------------------------


def test_a_schema_4_sqlite_file_gains_the_keys_table(tmp_path: Path) -> None:
    """A schema-4 file (no keys table, no report columns) migrates on, keeps its batch,
    and takes keys and reports."""
    path = tmp_path / "old.db"
    store = SQLiteStore(path)
    batch_id = BatchTracker(store).create_batch(["a.jpg"]).batch_id
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE batch_keys")
        db.execute("DROP TABLE batch_metadata")
        db.execute("DROP INDEX batches_by_owner")
        db.execute("DROP INDEX batches_by_time")
        db.execute("ALTER TABLE items DROP COLUMN progress")
        db.execute("ALTER TABLE items DROP COLUMN stage")
        db.execute("PRAGMA user_version = 4")
    store = SQLiteStore(path)
    try:
        tracker = BatchTracker(store)
        assert tracker.get(batch_id).progress.total == 1
        snap = tracker.get(batch_id)
        tracker.start_item(batch_id, snap.items[0].id)
        assert tracker.report(batch_id, snap.items[0].id, 0.5).progress == 0.5
        assert tracker.create_batch(["b.jpg"], key="k").batch_id == (
            tracker.create_batch(["b.jpg"], key="k").batch_id
        )
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SQLITE_SCHEMA


def test_cleanup_removes_keys_that_ran_out(tmp_path: Path) -> None:
    """Keys past their day are removed by cleanup, with the batches that expired."""
    from batchtrack.testing import FakeClock

    clock = FakeClock()
    path = tmp_path / "keys.db"
    store = SQLiteStore(path)
    try:
        tracker = BatchTracker(store, clock=clock)
        tracker.create_batch(["a.jpg"], key="k")
        clock.advance(25 * 3600)
        tracker.cleanup()
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT count(*) FROM batch_keys").fetchone()[0] == 0
    finally:
        store.close()


def test_schema_2_postgres_tables_gain_keys_and_reports(postgres_url: str) -> None:
    """PostgreSQL tables of schema 2 migrate on: their batch stays, keys and reports
    work on it."""
    pytest.importorskip("psycopg")
    import psycopg

    from batchtrack.stores.postgres import SCHEMA_VERSION, PostgresStore
    from conftest import drop_postgres_tables

    prefix = f"k{uuid.uuid4().hex[:12]}_"
    try:
        with PostgresStore(postgres_url, table_prefix=prefix) as store:
            batch_id = BatchTracker(store).create_batch([("a", "a.jpg")]).batch_id
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(
                f'DROP TABLE "{prefix}keys", "{prefix}metadata", "{prefix}outbox",'
                f' "{prefix}webhooks_gone"'
            )
            conn.execute(f'DROP INDEX "{prefix}batches_by_owner", "{prefix}batches_by_time"')
            conn.execute(f'ALTER TABLE "{prefix}items" DROP COLUMN progress, DROP COLUMN stage')
            conn.execute(f'UPDATE "{prefix}schema" SET version = 2')
        with PostgresStore(postgres_url, table_prefix=prefix) as store:
            tracker = BatchTracker(store)
            tracker.start_item(batch_id, "a")
            assert tracker.report(batch_id, "a", 0.5).progress == 0.5
            first = tracker.create_batch(["b.jpg"], key="k").batch_id
            assert tracker.create_batch(["b.jpg"], key="k").batch_id == first
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            row = conn.execute(f'SELECT version FROM "{prefix}schema"').fetchone()
        assert row == (SCHEMA_VERSION,) == (5,)
    finally:
        drop_postgres_tables(postgres_url, f"{prefix}%")
