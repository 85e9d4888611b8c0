"""A user's list of batches: GET /api/batches, `batchtrack list`, and what a page costs.

The store-level behaviour (order, pages, owners, status, expiry) is in the conformance
suite (batchtrack.testing.conformance), run on every store.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from batchtrack import BatchTracker, SQLiteStore
from batchtrack.testing import FakeClock


def _uploaded(client: Any, *names: str) -> list[str]:
    from http_support import jpeg

    response = client.post(
        "/api/upload", files=[("files", (n, jpeg(), "image/jpeg")) for n in names]
    )
    assert response.status_code == 201, response.text
    return [f["id"] for f in response.json()["files"]]


def _start(client: Any, file_id: str, **extra: Any) -> str:
    response = client.post("/api/process-batch", json={"fileIds": [file_id], **extra})
    assert response.status_code == 202, response.text
    return str(response.json()["batchId"])


def test_get_batches_lists_only_the_callers_batches_newest_first(client: Any, service: Any) -> None:
    """GET /api/batches answers the caller's batches newest first as status bodies
    without "images", paged with nextAfter; another session sees none of them."""
    ids = _uploaded(client, "a.jpg", "b.jpg", "c.jpg")
    started = [_start(client, i) for i in ids]
    for batch_id in started:
        service.orchestrator.wait(batch_id, timeout=30)
    whole = client.get("/api/batches")
    assert whole.status_code == 200, whole.text
    assert whole.headers["cache-control"] == "no-store"
    body = whole.json()
    assert body["nextAfter"] is None
    listed = [b["batchId"] for b in body["batches"]]
    order = sorted(started, key=lambda b: (service.tracker.get(b).created_at, b), reverse=True)
    assert listed == order
    first = body["batches"][0]
    assert "images" not in first
    assert first["progress"]["total"] == 1
    assert first["status"] == "completed"
    assert set(first) >= {"batchId", "status", "progress", "createdAt", "finishedAt"}
    page = client.get("/api/batches", params={"limit": 2}).json()
    assert [b["batchId"] for b in page["batches"]] == order[:2]
    assert page["nextAfter"] == order[1]
    rest = client.get("/api/batches", params={"limit": 2, "after": page["nextAfter"]}).json()
    assert [b["batchId"] for b in rest["batches"]] == order[2:]
    assert rest["nextAfter"] is None
    done = client.get("/api/batches", params={"status": "completed"}).json()
    assert len(done["batches"]) == 3
    assert client.get("/api/batches", params={"status": "pending"}).json()["batches"] == []


def test_another_session_lists_nothing_and_cannot_page_from_my_batch(
    client: Any, service: Any
) -> None:
    """A second session's list is empty; my batch id, or an unknown one, as its after
    answers 404 after_not_found (as batch-status answers an after that names no image)."""
    from http_support import clients

    mine = _start(client, _uploaded(client, "a.jpg")[0])
    with clients(service, "wsgi") as make:
        stranger = make()
        assert stranger.get("/api/batches").json() == {"batches": [], "nextAfter": None}
        for after in (mine, str(uuid.uuid4())):
            response = stranger.get("/api/batches", params={"after": after})
            assert response.status_code == 404, response.text
            assert response.json()["error"]["code"] == "after_not_found"
            assert "start again from the first page" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ({"status": "done"}, "status must be one of"),
        ({"limit": "0"}, "limit must be a whole number from 1 to 1000"),
        ({"limit": "1001"}, "limit must be a whole number from 1 to 1000"),
        ({"limit": "ten"}, "limit must be a whole number"),
        ({"after": "not-a-uuid"}, "after must be a batch id"),
    ],
)
def test_bad_list_parameters_are_a_400_in_json(
    query: dict[str, str], says: str, service: Any
) -> None:
    """A bad status, limit or after answers 400 invalid_query with a JSON message."""
    from http_support import clients

    with clients(service, "wsgi") as make:
        response = make().get("/api/batches", params=query)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == "invalid_query"
    assert says in response.json()["error"]["message"]


def test_an_owner_callable_decides_whose_batches_are_listed(tmp_path: Path) -> None:
    """With create_app(owner=...), the list holds the batches of the owner it names."""
    pytest.importorskip("python_multipart")
    from http_support import Service, clients

    svc = Service(tmp_path, owner=lambda headers: headers.get("x-user"))
    try:
        svc.tracker.create_batch(["other.jpg"], owner="bob")
        with clients(svc, "asgi") as make:
            client = make()
            alice = {"x-user": "alice"}
            ids = _uploaded_as(client, alice, "a.jpg")
            response = client.post("/api/process-batch", json={"fileIds": ids}, headers=alice)
            assert response.status_code == 202, response.text
            listed = client.get("/api/batches", headers=alice).json()["batches"]
            assert [b["batchId"] for b in listed] == [response.json()["batchId"]]
            assert client.get("/api/batches").status_code == 401
    finally:
        svc.close()


def _uploaded_as(client: Any, headers: dict[str, str], *names: str) -> list[str]:
    from http_support import jpeg

    response = client.post(
        "/api/upload",
        files=[("files", (n, jpeg(), "image/jpeg")) for n in names],
        headers=headers,
    )
    assert response.status_code == 201, response.text
    return [f["id"] for f in response.json()["files"]]


def test_openapi_documents_the_list_and_its_answers_validate(client: Any) -> None:
    """The document has GET /batches with its parameters, and a real answer validates
    against its BatchList schema (metadata included)."""
    jsonschema = pytest.importorskip("jsonschema")
    _start(client, _uploaded(client, "a.jpg")[0], metadata={"k": "v"})
    spec = client.get("/api/openapi.json").json()
    operation = spec["paths"]["/batches"]["get"]
    assert [p["name"] for p in operation["parameters"]] == ["status", "limit", "after"]
    schema = {**spec["components"]["schemas"]["BatchList"], "components": spec["components"]}
    body = client.get("/api/batches").json()
    jsonschema.validate(body, schema)


# -- batchtrack list ---------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchtrack", "list", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def database(tmp_path: Path) -> tuple[Path, list[str]]:
    """A data dir whose database holds three batches of two owners (one with metadata)."""
    data = tmp_path / "data"
    data.mkdir()
    clock = FakeClock()
    with SQLiteStore(data / "batchtrack.db") as store:
        tracker = BatchTracker(store, clock=clock)
        made = []
        for n, owner in enumerate(["ann", "bob", "ann"]):
            meta = {"order": f"A-{n}", "note": "x" * 60} if n == 2 else None
            snap = tracker.create_batch(
                [("i", "a.jpg"), ("j", "b.jpg")], owner=owner, metadata=meta
            )
            made.append(snap.batch_id)
            clock.advance(60)
        tracker.start_item(made[0], "i")
        tracker.complete_item(made[0], "i")
    # FakeClock starts in the past: move every batch's times to now, so none has expired.
    import sqlite3
    import time

    shift = time.time() - clock()
    with sqlite3.connect(data / "batchtrack.db") as db:
        db.execute(
            "UPDATE batches SET created_at = created_at + ?, updated_at = updated_at + ?,"
            " expires_at = expires_at + ?",
            (shift, shift, shift),
        )
    return data, made


def test_list_prints_a_table_newest_first(database: tuple[Path, list[str]]) -> None:
    """`batchtrack list` prints a header and one row per batch (id, status, done/total,
    created, metadata cut short), newest first; --owner and --status filter."""
    data, made = database
    result = _cli("--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["BATCH", "STATUS", "DONE"]
    assert [line.split()[0] for line in lines[1:]] == made[::-1]
    newest = lines[1]
    assert "pending" in newest
    assert "0/2" in newest
    assert "order=A-2, note=xxx" in newest
    assert newest.endswith("…")
    assert "1/2" in lines[3]
    owned = _cli("--data-dir", str(data), "--owner", "ann", "--status", "pending")
    assert [line.split()[0] for line in owned.stdout.splitlines()[1:]] == [made[2]]
    nothing = _cli("--data-dir", str(data), "--owner", "carol")
    assert nothing.stdout == "no batches\n"


def test_list_pages_and_prints_json(database: tuple[Path, list[str]]) -> None:
    """--limit pages (the next --after on stderr) and --json prints the body of
    GET /api/batches."""
    data, made = database
    first = _cli("--data-dir", str(data), "--limit", "2", "--json")
    assert first.returncode == 0, first.stderr
    body = json.loads(first.stdout)
    assert [b["batchId"] for b in body["batches"]] == made[:0:-1]
    assert body["nextAfter"] == made[1]
    assert all("images" not in b for b in body["batches"])
    assert body["batches"][0]["metadata"]["order"] == "A-2"
    table = _cli("--data-dir", str(data), "--limit", "2")
    assert table.stderr == f"more: --after {made[1]}\n"
    rest = _cli("--data-dir", str(data), "--after", made[1], "--json")
    assert [b["batchId"] for b in json.loads(rest.stdout)["batches"]] == [made[0]]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--limit", "0"], "--limit must be a whole number from 1 to 1000, not '0'"),
        (["--limit", "1001"], "--limit must be a whole number from 1 to 1000, not '1001'"),
        (["--limit", "x"], "--limit must be a whole number"),
        (["--status", "done"], "--status must be one of pending, processing"),
        (["--after", "nope"], "--after 'nope' names no batch of this list"),
        (["--store", "http://x"], "unknown scheme"),
    ],
)
def test_list_errors_are_one_line_and_exit_2(
    database: tuple[Path, list[str]], args: list[str], says: str
) -> None:
    """A bad option is one line on stderr and exit status 2, naming the option as typed."""
    data, _ = database
    result = _cli("--data-dir", str(data), *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("batchtrack list: error: ")
    assert says in result.stderr


def _steps_of_a_page(path: Path, others: int) -> int:
    """SQLite VM steps (in hundreds) of a first page of 10 of one owner's 12 batches,
    among ``others`` batches of 100 other owners."""
    with SQLiteStore(path) as store:
        tracker = BatchTracker(store, clock=FakeClock())
        for n in range(others):
            tracker.create_batch(["a.jpg"], owner=f"user-{n % 100}")
        for _ in range(12):
            tracker.create_batch(["a.jpg"], owner="me")
        db = store._db
        steps = [0]

        def tick() -> int:
            steps[0] += 1
            return 0

        db.set_progress_handler(tick, 100)
        try:
            mine = tracker.list_batches(owner="me", limit=10)
            everyone = tracker.list_batches(limit=10)
        finally:
            db.set_progress_handler(None, 0)
        assert len(mine.batches) == len(everyone.batches) == 10
        return steps[0]


def test_a_page_costs_the_page_not_the_store(tmp_path: Path) -> None:
    """A page of an owner's batches, and of every batch, takes about as many SQLite
    steps among 2,000 batches as among 200: it walks an index, not the table."""
    small = _steps_of_a_page(tmp_path / "small.db", 200)
    big = _steps_of_a_page(tmp_path / "big.db", 2000)
    assert big <= 2 * small + 5, (small, big)


def test_listed_batches_show_the_eta_get_shows_with_lost_items_read_once() -> None:
    """A listed batch whose items left are lost reads "waiting_for_lost_items" like get
    does, and a page reads the store's lost items once, not once per batch."""
    clock = FakeClock()
    tracker = BatchTracker(clock=clock)
    ids = []
    for _ in range(3):
        batch = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")]).batch_id
        tracker.start_item(batch, "a", lease=30.0)  # its worker dies
        tracker.start_item(batch, "b")
        clock.advance(2)
        tracker.complete_item(batch, "b")
        ids.append(batch)
    clock.advance(40)  # every lease ran out
    calls = []
    lost = tracker.store.lost

    def counted(now: float, limit: int) -> Any:
        calls.append(now)
        return lost(now, limit)

    tracker.store.lost = counted  # type: ignore[method-assign]
    page = tracker.list_batches()
    assert len(calls) == 1
    assert [s.eta_unavailable for s in page.batches] == ["waiting_for_lost_items"] * 3
    assert [s.to_dict() for s in page.batches] == [
        {**tracker.get(b, items=False).to_dict()} for b in ids[::-1]
    ]


def test_redis_purge_and_delete_remove_the_list_entries(redis_url: str) -> None:
    """Redis: delete and cleanup() remove a batch from by:all, its owner's set and the
    listed hash, also when Redis already expired the batch's own keys."""
    import redis

    from batchtrack.stores.redis import RedisStore

    prefix = f"lists-{uuid.uuid4()}:"
    clock = FakeClock()
    store = RedisStore(redis_url, prefix=prefix)
    client = redis.Redis.from_url(redis_url)
    try:
        tracker = BatchTracker(store, ttl=60.0, clock=clock)
        deleted = tracker.create_batch(["a.jpg"], owner="u").batch_id
        swept = tracker.create_batch(["b.jpg"], owner="u").batch_id
        vanished = tracker.create_batch(["c.jpg"], owner="u").batch_id
        assert client.zcard(f"{prefix}by:o:u") == 3
        assert tracker.delete(deleted)
        # Redis expires a batch's keys on its own (its TTL): only the indexes are left.
        client.delete(*(f"{prefix}{kind}:{vanished}" for kind in "biocs"))
        clock.advance(25 * 3600)
        assert tracker.list_batches(owner="u").batches == ()
        assert tracker.cleanup() == 2
        assert client.exists(f"{prefix}by:o:u", f"{prefix}by:all", f"{prefix}listed") == 0
        assert swept not in {m.decode() for m in client.zrange(f"{prefix}by:all", 0, -1)}
    finally:
        store.close()
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)
        client.close()


def test_status_prints_the_metadata(database: tuple[Path, list[str]]) -> None:
    """`batchtrack status` prints a batch's metadata in its JSON; none, no key."""
    data, made = database
    shown = subprocess.run(
        [sys.executable, "-m", "batchtrack", "status", made[2], "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["metadata"] == {"order": "A-2", "note": "x" * 60}
    plain = subprocess.run(
        [sys.executable, "-m", "batchtrack", "status", made[0], "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "metadata" not in json.loads(plain.stdout)
