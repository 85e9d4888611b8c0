"""Status reads of a memory store are answered on the event loop: no thread, no wait for a
body a GET does not have; and an unchanged batch's body is made once."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("python_multipart")
from batchtrack import BatchTracker, MemoryStore, Orchestrator, SQLiteStore
from batchtrack.asgi import THREADS, create_app
from batchtrack.uploads import UploadStore

SESSION = "0123456789abcdef0123456789abcdef"


def _app(tmp_path: Path, tracker: BatchTracker) -> Any:
    orchestrator = Orchestrator(tracker, lambda item: None, concurrency=1)
    return create_app(tracker, orchestrator, UploadStore(tmp_path / "uploads"))


def _scope(batch_id: str, *, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "path": f"/api/batch-status/{batch_id}",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"cookie", f"batchtrack_session={SESSION}".encode()), *(headers or [])],
        "client": ("127.0.0.1", 5000),
    }


async def _call(app: Any, scope: dict[str, Any], receive: Any) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def _never() -> dict[str, Any]:
    await asyncio.Event().wait()  # a client that sends nothing more
    raise AssertionError("unreachable")


def test_a_status_read_is_answered_while_every_thread_is_busy(tmp_path: Path) -> None:
    """All of the app's threads blocked: a status read of a memory store still answers,
    at once, without waiting for a request body."""
    tracker = BatchTracker(MemoryStore())
    batch = tracker.create_batch(["a.jpg", "b.jpg"], owner=f"session:{SESSION}").batch_id
    app = _app(tmp_path, tracker)
    release = threading.Event()

    async def run() -> tuple[int, bytes]:
        busy = [asyncio.ensure_future(app._run(release.wait)) for _ in range(THREADS)]
        await asyncio.sleep(0.1)
        try:
            return await asyncio.wait_for(_call(app, _scope(batch), _never), 5)
        finally:
            release.set()
            await asyncio.gather(*busy)

    status, body = asyncio.run(run())
    assert status == 200
    assert json.loads(body)["progress"]["total"] == 2


def test_a_sqlite_status_read_still_runs_in_a_thread(tmp_path: Path) -> None:
    """SQLite reads block: they stay off the event loop (busy threads: it waits)."""
    tracker = BatchTracker(SQLiteStore(tmp_path / "b.db"))
    batch = tracker.create_batch(["a.jpg"], owner=f"session:{SESSION}").batch_id
    app = _app(tmp_path, tracker)
    release = threading.Event()

    async def run() -> bool:
        busy = [asyncio.ensure_future(app._run(release.wait)) for _ in range(THREADS)]
        await asyncio.sleep(0.1)
        answer = asyncio.ensure_future(_call(app, _scope(batch), _never))
        await asyncio.sleep(0.5)
        waited = not answer.done()
        release.set()
        await asyncio.gather(*busy)
        assert (await answer)[0] == 200
        return waited

    assert asyncio.run(run())
    tracker.store.close()


def test_unchanged_batches_answer_the_same_bytes_and_changes_show(tmp_path: Path) -> None:
    tracker = BatchTracker(MemoryStore())
    snap = tracker.create_batch(["a.jpg", "b.jpg"], owner=f"session:{SESSION}")
    app = _app(tmp_path, tracker)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    def get() -> bytes:
        status, body = asyncio.run(_call(app, _scope(snap.batch_id), receive))
        assert status == 200
        return body

    first = get()
    assert get() == first
    tracker.start_item(snap.batch_id, snap.items[0].id)
    tracker.fail_item(snap.batch_id, snap.items[0].id, "boom")
    changed = json.loads(get())
    assert changed["progress"]["failed"] == 1
    assert changed["images"][0]["error"] == "boom"
    assert changed == tracker.get(snap.batch_id).to_dict()
