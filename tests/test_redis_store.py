"""RedisStore against a real redis-server: processes, crashes, errors, expiry, workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import start_redis
from http_support import free_port, jpeg, wait_until_serving

pytest.importorskip("redis")
from batchtrack import BatchTracker, Status, StoreError, ValidationError
from batchtrack.stores.redis import RedisStore

WORKER = textwrap.dedent(
    """
    import sys
    from batchtrack import BatchTracker, InvalidTransition
    from batchtrack.stores.redis import RedisStore

    url, prefix, batch_id, *item_ids = sys.argv[1:]
    tracker = BatchTracker(RedisStore(url, prefix=prefix))
    for item_id in item_ids:
        try:
            if not tracker.start_item(batch_id, item_id).changed:
                continue
            tracker.complete_item(batch_id, item_id)
        except InvalidTransition:
            continue
        print(item_id, flush=True)
    """
)


def test_processes_sharing_redis_count_exactly(redis_url: str, tmp_path: Path) -> None:
    """4 processes racing over every item of one batch through Redis: exact counts."""
    prefix = f"procs-{uuid.uuid4()}:"
    tracker = BatchTracker(RedisStore(redis_url, prefix=prefix))
    snap = tracker.create_batch([f"{i}.jpg" for i in range(300)])
    ids = [item.id for item in snap.items]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                redis_url,
                prefix,
                snap.batch_id,
                *(ids[n * 75 :] + ids[: n * 75]),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    finished = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        finished += out.split()
    assert sorted(finished) == sorted(ids)
    final = tracker.get(snap.batch_id)
    assert final.progress.completed == 300
    assert final.version == 600
    assert final.status is Status.COMPLETED
    assert sum(1 for i in final.items if i.status is Status.COMPLETED) == 300


def test_keys_are_namespaced_and_expire_on_their_own(redis_url: str) -> None:
    """All keys live under the prefix and carry a TTL; a finished batch's TTL is short."""
    import redis

    prefix = f"ns-{uuid.uuid4()}:"
    tracker = BatchTracker(RedisStore(redis_url, prefix=prefix), ttl=120)
    snap = tracker.create_batch([("a", "a.jpg")])
    client = redis.Redis.from_url(redis_url)
    keys = sorted(k.decode() for k in client.keys(f"{prefix}*"))
    assert keys == sorted(
        [
            f"{prefix}b:{snap.batch_id}",
            f"{prefix}i:{snap.batch_id}",
            f"{prefix}o:{snap.batch_id}",
            f"{prefix}c:{snap.batch_id}",
            f"{prefix}s:{snap.batch_id}",
            f"{prefix}expiry",
            f"{prefix}listed",
            f"{prefix}by:all",
        ]
    )
    for kind in "biocs":
        assert 24 * 3600 < client.ttl(f"{prefix}{kind}:{snap.batch_id}") <= 24 * 3600 + 60
    assert 24 * 3600 < client.ttl(f"{prefix}b:{snap.batch_id}") <= 24 * 3600 + 60
    tracker.start_item(snap.batch_id, "a")
    tracker.complete_item(snap.batch_id, "a")
    for kind in "biocs":
        assert 0 < client.ttl(f"{prefix}{kind}:{snap.batch_id}") <= 120 + 60
    client.close()


def test_bad_urls_are_rejected() -> None:
    """A URL redis-py cannot parse is a ValidationError; no URL at all too."""
    with pytest.raises(ValidationError, match="Redis URL"):
        RedisStore("http://not-redis")
    with pytest.raises(ValidationError):
        RedisStore(None)


def test_an_unreachable_server_is_a_store_error() -> None:
    """Every call to a server that is not there raises StoreError with the cause attached."""
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
    tracker = BatchTracker(store)
    with pytest.raises(StoreError) as info:
        tracker.create_batch(["a.jpg"])
    assert info.value.__cause__ is not None
    with pytest.raises(StoreError):
        tracker.get(str(uuid.uuid4()))
    with pytest.raises(StoreError):
        tracker.cleanup()


def test_server_killed_mid_batch_then_restarted_loses_nothing_acknowledged(
    tmp_path: Path,
) -> None:
    """Kill redis mid-batch: calls fail with StoreError; after a restart with AOF on,
    every transition that had returned is still there."""
    proc, port = start_redis(tmp_path, persistent=True)
    url = f"redis://127.0.0.1:{port}/0"
    tracker = BatchTracker(RedisStore(url))
    snap = tracker.create_batch([f"{i}.jpg" for i in range(50)])
    acknowledged = []
    for item in snap.items[:20]:
        tracker.start_item(snap.batch_id, item.id)
        tracker.complete_item(snap.batch_id, item.id)
        acknowledged.append(item.id)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    with pytest.raises(StoreError):
        tracker.start_item(snap.batch_id, snap.items[20].id)
    proc, _ = start_redis(tmp_path, persistent=True, port=port)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                final = tracker.get(snap.batch_id)
                break
            except StoreError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        done = {i.id for i in final.items if i.status is Status.COMPLETED}
        assert set(acknowledged) <= done
        assert final.progress.completed == len(done)
        p = final.progress
        assert p.total == p.completed + p.failed + p.processing + p.pending
        # And work goes on.
        tracker.start_item(snap.batch_id, snap.items[20].id)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_two_uvicorn_workers_share_one_truth(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """uvicorn --workers 2: a batch started through one request is polled to the end
    through many, whichever worker answers."""
    pytest.importorskip("uvicorn")
    store = (
        f"redis:{request.getfixturevalue('redis_url')}"
        if kind == "redis"
        else f"sqlite:{tmp_path / 'shared.db'}"
    )
    port = free_port()
    env = {
        **os.environ,
        "BATCHTRACK_STORE": store,
        "BATCHTRACK_PREFIX": f"workers-{uuid.uuid4()}:",
        "BATCHTRACK_DATA": str(tmp_path / "data"),
        "PYTHONPATH": str(Path(__file__).parent),
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "multiworker_app:app",
            "--workers",
            "2",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base + "/api/openapi.json", server)
        cookie = {"batchtrack_session": "b" * 32}
        files = [("files", (f"{n}.jpg", jpeg((1200, 900)), "image/jpeg")) for n in range(6)]
        with httpx.Client(base_url=base, cookies=cookie, timeout=30) as client:
            ids = [f["id"] for f in client.post("/api/upload", files=files).json()["files"]]
            started = client.post("/api/process-batch", json={"fileIds": ids}).json()
        seen_done: list[int] = []
        deadline = time.monotonic() + 60
        while True:
            # A new connection each time, so either worker may answer.
            response = httpx.get(base + started["statusUrl"], cookies=cookie, timeout=10)
            assert response.status_code == 200, response.text
            body = response.json()
            seen_done.append(body["progress"]["completed"])
            if body["status"] == "completed":
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert body["progress"]["completed"] == 6
        assert seen_done == sorted(seen_done)  # one truth: progress never goes backwards
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()


RECLAIMER = textwrap.dedent(
    """
    import sys, time
    from batchtrack import BatchTracker
    from batchtrack.stores.redis import RedisStore

    url, prefix, at, go = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    tracker = BatchTracker(RedisStore(url, prefix=prefix), clock=lambda: at, lease=5.0)
    while time.time() < go:  # start together
        time.sleep(0.001)
    for batch_id, item_id, status in tracker.reclaim_items():
        print(batch_id, item_id, status.value, flush=True)
    """
)


def test_processes_reclaiming_at_once_move_each_lost_item_once(
    redis_url: str, tmp_path: Path
) -> None:
    """4 processes reclaiming the same Redis at one moment: every lost item moves once."""
    prefix = f"test-{uuid.uuid4()}:"
    now = time.time()
    tracker = BatchTracker(RedisStore(redis_url, prefix=prefix), clock=lambda: now, lease=5.0)
    snap = tracker.create_batch([f"{i}.jpg" for i in range(300)])
    for item in snap.items[:200]:
        tracker.start_item(snap.batch_id, item.id)
    script = tmp_path / "reclaimer.py"
    script.write_text(RECLAIMER)
    go = time.time() + 1.0
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), redis_url, prefix, repr(now + 6), repr(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    moved: list[str] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        moved += out.splitlines()
    assert len(moved) == len(set(moved)) == 200
    assert tracker.get(snap.batch_id).progress.pending == 300


def test_creating_an_existing_batch_changes_it_not_and_leaves_no_staging(redis_url: str) -> None:
    """Items are staged in chunks and renamed into place only for a new batch."""
    import redis

    from batchtrack._models import ItemSnapshot

    prefix = f"stage-{uuid.uuid4()}:"
    store = RedisStore(redis_url, prefix=prefix)
    tracker = BatchTracker(store)
    snap = tracker.create_batch([(f"{k}", f"{k}.jpg") for k in range(2500)])
    record = store.load(snap.batch_id, items=False)
    assert record is not None
    with pytest.raises(StoreError, match="exists already"):
        store.create(record, [ItemSnapshot("other", "other.jpg")])
    client = redis.Redis.from_url(redis_url)
    assert client.keys(f"{prefix}new:*") == []
    again = tracker.get(snap.batch_id)
    assert [i.id for i in again.items] == [f"{k}" for k in range(2500)]
    client.close()
    store.close()


def test_a_batch_from_before_the_indexes_is_read_the_plain_way(redis_url: str) -> None:
    """A batch written by 0.1 (no ``ix`` mark, no positions) still answers every read:
    pages and statuses exactly, ``since`` with at least what changed."""
    import redis

    prefix = f"legacy-{uuid.uuid4()}:"
    store = RedisStore(redis_url, prefix=prefix)
    tracker = BatchTracker(store)
    snap = tracker.create_batch([(f"{k}", f"{k}.jpg") for k in range(5)])
    client = redis.Redis.from_url(redis_url)
    client.hdel(f"{prefix}b:{snap.batch_id}", "ix")
    tracker.start_item(snap.batch_id, "3")
    tracker.fail_item(snap.batch_id, "3", "boom")
    assert [i.id for i in tracker.get(snap.batch_id, status="failed").items] == ["3"]
    page = tracker.get(snap.batch_id, limit=2, after="1")
    assert ([i.id for i in page.items], page.next_after) == (["2", "3"], "3")
    assert "3" in {i.id for i in tracker.get(snap.batch_id, since=0).items}
    client.close()
    store.close()
