"""Metadata: the rules, snapshots, idempotency, runners, HTTP and the schema migrations."""

from __future__ import annotations

import json
import pickle
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from batchtrack import BatchTracker, Orchestrator, SQLiteStore, ValidationError
from batchtrack.testing import FakeClock


def _uploaded(client: Any, *names: str) -> list[str]:
    from http_support import jpeg

    response = client.post(
        "/api/upload", files=[("files", (n, jpeg(), "image/jpeg")) for n in names]
    )
    assert response.status_code == 201, response.text
    return [f["id"] for f in response.json()["files"]]


@pytest.mark.parametrize(
    ("metadata", "rule"),
    [
        ({f"k{n}": "v" for n in range(17)}, "at most 16 pairs"),
        ({"": "v"}, "1 to 64 characters"),
        ({"k" * 65: "v"}, "1 to 64 characters"),
        ({"k": "v" * 513}, "longer than 512 characters"),
        ({"k": 1}, "must be a string"),
        ({1: "v"}, "keys must be strings"),
        ({"k": "a\x00b"}, "NUL"),
        ({"k": "\udcff"}, "not valid Unicode"),
        (["k", "v"], "mapping of strings"),
        ("k=v", "mapping of strings"),
    ],
)
def test_metadata_that_breaks_a_rule_is_refused_naming_it(metadata: Any, rule: str) -> None:
    """Each broken rule raises ValidationError whose message names the rule."""
    tracker = BatchTracker()
    with pytest.raises(ValidationError, match=rule):
        tracker.create_batch(["a.jpg"], metadata=metadata)
    assert tracker.list_batches().batches == ()


def test_metadata_at_the_limits_is_kept_read_only() -> None:
    """16 pairs with 64-character keys and 512-character values are kept; the snapshot's
    mapping is read-only, hashable, picklable and equal to the dict given."""
    meta = {f"{n:02d}" + "k" * 62: "v" * 512 for n in range(16)}
    snap = BatchTracker().create_batch(["a.jpg"], metadata=meta)
    assert snap.metadata == meta
    with pytest.raises(TypeError):
        snap.metadata["x"] = "y"  # type: ignore[index]
    assert pickle.loads(pickle.dumps(snap)) == snap
    assert hash(snap) == hash(pickle.loads(pickle.dumps(snap)))
    assert snap.to_dict()["metadata"] == meta


def test_a_key_returns_its_batch_with_the_first_metadata() -> None:
    """The same idempotency key with other metadata is the same request: the first batch
    comes back with the metadata it was created with."""
    tracker = BatchTracker(clock=FakeClock())
    first = tracker.create_batch(["a.jpg"], key="k", metadata={"try": "1"})
    again = tracker.create_batch(["a.jpg"], key="k", metadata={"try": "2"})
    assert again.batch_id == first.batch_id
    assert again.metadata == {"try": "1"}


def test_orchestrator_submit_keeps_metadata(tmp_path: Path) -> None:
    """Orchestrator.submit(metadata=) creates the batch with it; bad metadata raises
    before anything runs."""
    tracker = BatchTracker()
    with Orchestrator(tracker, lambda item: None, concurrency=1) as orch:
        snap = orch.submit([tmp_path / "a.jpg"], metadata={"order": "17"})
        assert orch.wait(snap.batch_id, timeout=30).metadata == {"order": "17"}
        with pytest.raises(ValidationError, match="16 pairs"):
            orch.submit([tmp_path / "b.jpg"], metadata={str(n): "" for n in range(17)})
    assert len(tracker.list_batches().batches) == 1


def test_celery_runner_submit_keeps_metadata() -> None:
    """CeleryRunner.submit(metadata=) creates the batch with it (an eager Celery app);
    without metadata it calls create_batch as before."""
    celery = pytest.importorskip("celery")
    from batchtrack.celery import CeleryRunner, tracked_task

    app = celery.Celery("eager", broker="memory://", set_as_current=False)
    app.conf.task_always_eager = True
    try:
        tracker = BatchTracker()
        runner = CeleryRunner(tracker, tracked_task(app, tracker, lambda item: "ok"))
        snap = runner.submit(["/in/a.png"], metadata={"order": "17"})
        final = tracker.get(snap.batch_id)
        assert final.metadata == {"order": "17"}
        assert final.progress.completed == 1
        assert tracker.get(runner.submit(["/in/b.png"]).batch_id).metadata == {}
        with pytest.raises(ValidationError, match="512"):
            runner.submit(["/in/c.png"], metadata={"k": "v" * 513})
    finally:
        app.close()


def test_process_batch_metadata_is_in_the_status_body_and_the_events(client: Any) -> None:
    """ "metadata" sent to process-batch comes back in the status body, in every
    batch-events event and in the list; without it, no "metadata" key anywhere."""
    ids = _uploaded(client, "a.jpg", "b.jpg")
    meta = {"order": "A-17", "customer": "Zoë"}
    started = client.post("/api/process-batch", json={"fileIds": ids[:1], "metadata": meta})
    assert started.status_code == 202, started.text
    batch_id = started.json()["batchId"]
    assert client.get(f"/api/batch-status/{batch_id}").json()["metadata"] == meta
    events = [
        json.loads(line[len("data: ") :])
        for line in client.get(f"/api/batch-events/{batch_id}").text.splitlines()
        if line.startswith("data: ")
    ]
    assert events
    assert all(e["metadata"] == meta for e in events)
    plain = client.post("/api/process-batch", json={"fileIds": ids[1:], "metadata": None})
    assert plain.status_code == 202, plain.text
    assert "metadata" not in client.get(f"/api/batch-status/{plain.json()['batchId']}").json()
    listed = {b["batchId"]: b for b in client.get("/api/batches").json()["batches"]}
    assert listed[batch_id]["metadata"] == meta
    assert "metadata" not in listed[plain.json()["batchId"]]


def test_bad_metadata_is_a_400_before_any_file_is_looked_up(client: Any) -> None:
    """Metadata that breaks a rule answers 400 bad_metadata naming the rule, even with
    file ids that do not exist (checked before any file is looked up)."""
    unknown = [str(uuid.uuid4())]
    cases = [
        ({"k": "v" * 513}, "512"),
        ({"k": 5}, "string"),
        ([1, 2], "object"),
        ({f"k{n}": "" for n in range(17)}, "16 pairs"),
    ]
    for meta, rule in cases:
        response = client.post("/api/process-batch", json={"fileIds": unknown, "metadata": meta})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "bad_metadata"
        assert rule in error["message"]


def test_a_runner_without_metadata_works_and_refuses_metadata(tmp_path: Path) -> None:
    """A runner whose submit takes no metadata still starts batches; a request with
    metadata gets 501 metadata_not_supported."""
    pytest.importorskip("python_multipart")
    from http_support import RecordingRunner, Service, clients

    svc = Service(tmp_path, runner=RecordingRunner)
    try:
        with clients(svc, "wsgi") as make:
            client = make()
            ids = _uploaded(client, "a.jpg")
            assert client.post("/api/process-batch", json={"fileIds": ids}).status_code == 202
            response = client.post(
                "/api/process-batch", json={"fileIds": ids, "metadata": {"k": "v"}}
            )
            assert response.status_code == 501, response.text
            assert response.json()["error"]["code"] == "metadata_not_supported"
    finally:
        svc.close()


# -- migrations ------------------------------------------------------------------------------


def test_a_schema_5_sqlite_file_gains_metadata_and_the_list_indexes(tmp_path: Path) -> None:
    """A schema-5 file (no metadata table, no list indexes) migrates to 6 in place: its
    batch is listed with no metadata, and new batches keep theirs."""
    path = tmp_path / "old.db"
    store = SQLiteStore(path)
    clock = FakeClock()
    old = BatchTracker(store, clock=clock).create_batch(["a.jpg"], owner="u").batch_id
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE batch_metadata")
        db.execute("DROP INDEX batches_by_owner")
        db.execute("DROP INDEX batches_by_time")
        db.execute("PRAGMA user_version = 5")
    store = SQLiteStore(path)
    try:
        tracker = BatchTracker(store, clock=clock)
        assert tracker.get(old).metadata == {}
        clock.advance(1)
        new = tracker.create_batch(["b.jpg"], owner="u", metadata={"k": "v"}).batch_id
        page = tracker.list_batches(owner="u")
        assert [s.batch_id for s in page.batches] == [new, old]
        assert page.batches[0].metadata == {"k": "v"}
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == 7
    finally:
        store.close()


def test_schema_3_postgres_tables_gain_metadata_and_the_list_indexes(postgres_url: str) -> None:
    """PostgreSQL tables of schema 3 migrate to 4: their batch is listed with no
    metadata, and new batches keep theirs."""
    pytest.importorskip("psycopg")
    import psycopg

    from batchtrack.stores.postgres import SCHEMA_VERSION, PostgresStore
    from conftest import drop_postgres_tables

    prefix = f"m{uuid.uuid4().hex[:12]}_"
    clock = FakeClock()
    try:
        with PostgresStore(postgres_url, table_prefix=prefix) as store:
            old = BatchTracker(store, clock=clock).create_batch(["a.jpg"], owner="u").batch_id
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP TABLE "{prefix}metadata"')
            conn.execute(f'DROP INDEX "{prefix}batches_by_owner", "{prefix}batches_by_time"')
            conn.execute(f'UPDATE "{prefix}schema" SET version = 3')
        with PostgresStore(postgres_url, table_prefix=prefix) as store:
            tracker = BatchTracker(store, clock=clock)
            assert tracker.get(old).metadata == {}
            clock.advance(1)
            new = tracker.create_batch(["b.jpg"], owner="u", metadata={"k": "v"}).batch_id
            page = tracker.list_batches(owner="u")
            assert [s.batch_id for s in page.batches] == [new, old]
            assert page.batches[0].metadata == {"k": "v"}
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            row = conn.execute(f'SELECT version FROM "{prefix}schema"').fetchone()
        assert row == (SCHEMA_VERSION,) == (5,)
    finally:
        drop_postgres_tables(postgres_url, f"{prefix}%")


def test_sqlite_transitions_never_touch_the_metadata(tmp_path: Path) -> None:
    """SQLite: no statement of a start, heartbeat, report or completion names the
    metadata table (once a process has read the batch's creation time, a header read
    it makes once per batch); reading the batch does (the header joins it)."""
    with SQLiteStore(tmp_path / "b.db") as store:
        tracker = BatchTracker(store)
        batch = tracker.create_batch([("z", "z.jpg"), ("a", "a.jpg")], metadata={"k": "v"})
        batch_id = batch.batch_id
        tracker.start_item(batch_id, "z")  # reads and keeps the creation time
        statements: list[str] = []
        store._db.set_trace_callback(statements.append)
        tracker.start_item(batch_id, "a", lease=30.0)
        tracker.heartbeat(batch_id, "a")
        tracker.report(batch_id, "a", 0.5)
        tracker.complete_item(batch_id, "a")
        tracker.fail_item(batch_id, "z", "broken")
        assert statements
        assert not [s for s in statements if "metadata" in s]
        assert tracker.get(batch_id).metadata == {"k": "v"}
        assert any("batch_metadata" in s for s in statements)
        store._db.set_trace_callback(None)


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({f"k{n}": "" for n in range(17)}, "metadata holds at most 16 pairs, not 17"),
        ({"k": None}, "metadata value of 'k' must be a string, not null"),
        ({"k": {"a": "b"}}, "metadata value of 'k' must be a string, not an object"),
        ({"k": ["a"]}, "metadata value of 'k' must be a string, not an array"),
        ({"k": 1.5}, "metadata value of 'k' must be a string, not a number"),
        ({"k": True}, "metadata value of 'k' must be a string, not a boolean"),
        ([1], "metadata must be an object of strings, not an array"),
        ("k=v", "metadata must be an object of strings, not a string"),
        ({"k": "a\x00b"}, "metadata value of 'k' must not contain NUL"),
        ({"a\x00b": "v"}, "metadata key 'a\\x00b' must not contain NUL"),
    ],
)
def test_bad_metadata_over_http_speaks_json_once(client: Any, meta: Any, message: str) -> None:
    """A 400 bad_metadata names JSON types (null, object, array), says "metadata" once,
    and tells a NUL in a key from one in a value."""
    response = client.post(
        "/api/process-batch", json={"fileIds": [str(uuid.uuid4())], "metadata": meta}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == {"code": "bad_metadata", "message": message}
