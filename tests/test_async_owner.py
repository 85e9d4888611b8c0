"""An ``async def`` owner is awaited on the ASGI app's event loop (no thread for it), and
answers, refuses and fails exactly as a sync owner does; the WSGI app refuses it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("python_multipart")
from batchtrack import BatchTracker, MemoryStore, Orchestrator, Status
from batchtrack import asgi as asgi_module
from batchtrack import wsgi as wsgi_module
from batchtrack.exceptions import StoreError
from batchtrack.uploads import UploadStore
from http_support import SyncASGIClient, jpeg

Owner = Callable[[Mapping[str, str]], Any]


def _user(headers: Mapping[str, str]) -> str | None:
    return headers.get("x-user")


async def _async_user(headers: Mapping[str, str]) -> str | None:
    await asyncio.sleep(0)  # a real await: it runs on a loop
    return headers.get("x-user")


class _App:
    """A tracker on a memory store, an orchestrator and the ASGI app with ``owner``,
    reached in process through httpx."""

    def __init__(self, root: Path, owner: Owner) -> None:
        self.tracker = BatchTracker(MemoryStore())
        self.runner = Orchestrator(self.tracker, lambda item: None, concurrency=1)
        self.app = asgi_module.create_app(
            self.tracker, self.runner, UploadStore(root / "uploads"), owner=owner
        )
        self.client = SyncASGIClient(self.app)

    def get(self, path: str, user: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = {} if user is None else {"X-User": user}
        return self.client.get(path, headers=headers, **kwargs)

    def post(self, path: str, user: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = {} if user is None else {"X-User": user}
        return self.client.post(path, headers=headers, **kwargs)

    def close(self) -> None:
        self.client.close()
        self.runner.close(cancel_pending=True)


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[[Owner], _App]]:
    made: list[_App] = []

    def build(owner: Owner) -> _App:
        made.append(_App(tmp_path / str(len(made)), owner))
        return made[-1]

    yield build
    for app in made:
        app.close()


def _code(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


def test_an_async_owner_runs_on_the_event_loop_thread(make: Callable[[Owner], _App]) -> None:
    """An async owner is awaited on the app's event loop, in its thread, not in a pool
    thread; and the status read of a memory store then stays on that thread too."""
    seen: list[tuple[int, asyncio.AbstractEventLoop]] = []

    async def owner(headers: Mapping[str, str]) -> str | None:
        seen.append((threading.get_ident(), asyncio.get_running_loop()))
        return headers.get("x-user")

    app = make(owner)
    batch = app.tracker.create_batch(["a.jpg"], owner="alice").batch_id
    loads: list[int] = []
    store = app.tracker.store
    load = store.load

    def recorded(batch_id: str, *, items: bool = True) -> Any:
        loads.append(threading.get_ident())
        return load(batch_id, items=items)

    store.load = recorded  # type: ignore[method-assign]
    assert app.get(f"/api/batch-status/{batch}", "alice").status_code == 200
    loop_thread = app.client._thread.ident
    assert seen == [(loop_thread, app.client._loop)]
    assert loads
    assert set(loads) == {loop_thread}


def test_a_sync_owner_still_runs_in_the_app_threads(make: Callable[[Owner], _App]) -> None:
    """A plain-function owner keeps running in the app's thread pool, off the loop."""
    threads: list[str] = []

    def owner(headers: Mapping[str, str]) -> str | None:
        threads.append(threading.current_thread().name)
        return headers.get("x-user")

    app = make(owner)
    batch = app.tracker.create_batch(["a.jpg"], owner="alice").batch_id
    assert app.get(f"/api/batch-status/{batch}", "alice").status_code == 200
    assert len(threads) == 1
    assert threads[0].startswith("batchtrack-http")


def test_an_async_owner_guards_every_route(make: Callable[[Owner], _App]) -> None:
    """With an async owner, no identity is 401, and another owner's files and batches are
    404 on every route, as with a sync owner; the owner's own requests succeed."""
    app = make(_async_user)
    assert _code(app.get("/api/batch-status/00000000-0000-4000-8000-000000000000")) == (
        401,
        "unauthorized",
    )
    up = app.post("/api/upload", "alice", files=[("files", ("a.jpg", jpeg(), "image/jpeg"))])
    assert up.status_code == 201
    ids = [f["id"] for f in up.json()["files"]]
    assert _code(app.post("/api/process-batch", "bob", json={"fileIds": ids})) == (
        404,
        "file_not_found",
    )
    snap = app.tracker.create_batch(["a.jpg", "b.jpg"], owner="alice")
    batch, first, second = snap.batch_id, snap.items[0].id, snap.items[1].id
    app.tracker.start_item(batch, first)
    app.tracker.complete_item(batch, first)
    app.tracker.start_item(batch, second)
    app.tracker.fail_item(batch, second, "broken")
    for method, path in [
        ("GET", f"/api/batch-status/{batch}"),
        ("GET", f"/api/batch-events/{batch}"),
        ("GET", f"/api/batch-results/{batch}/{first}"),
        ("GET", f"/api/batch-results/{batch}.zip"),
        ("POST", f"/api/batch-cancel/{batch}"),
        ("POST", f"/api/batch-retry/{batch}"),
        ("POST", f"/api/batch-pause/{batch}"),
        ("POST", f"/api/batch-unpause/{batch}"),
    ]:
        answer = app.client.request(method, path, headers={"X-User": "bob"})
        assert answer.status_code == 404, (method, path, answer.text)
    status = app.get(f"/api/batch-status/{batch}", "alice")
    assert status.status_code == 200
    assert status.json()["progress"]["failed"] == 1
    assert app.get(f"/api/batch-events/{batch}", "alice").status_code == 200  # finished: ends
    # Past the owner check: its items have no stored inputs to run again.
    assert _code(app.post(f"/api/batch-retry/{batch}", "alice")) == (410, "inputs_gone")
    assert app.tracker.get(batch).items[1].status is Status.FAILED


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (RuntimeError("the identity service is down"), 500, "internal"),
        (StoreError("the session store is away"), 503, "store_unavailable"),
    ],
)
def test_an_async_owner_that_raises_is_answered_as_a_sync_one(
    make: Callable[[Owner], _App], error: Exception, status: int, code: str
) -> None:
    """What an async owner raises gets the very status and error code that the same
    exception from a sync owner gets, and no traceback."""

    def sync_owner(headers: Mapping[str, str]) -> str:
        raise error

    async def async_owner(headers: Mapping[str, str]) -> str:
        raise error

    path = "/api/batch-status/00000000-0000-4000-8000-000000000000"
    answers = [make(owner).get(path, "alice") for owner in (sync_owner, async_owner)]
    assert [_code(a) for a in answers] == [(status, code)] * 2
    assert "Traceback" not in answers[1].text


def test_the_openapi_document_needs_no_identity(make: Callable[[Owner], _App]) -> None:
    """The OpenAPI document is served without calling the owner, sync or async."""
    calls: list[str] = []

    def sync_owner(headers: Mapping[str, str]) -> None:
        calls.append("sync")

    async def async_owner(headers: Mapping[str, str]) -> None:
        calls.append("async")

    for owner in (sync_owner, async_owner):
        assert make(owner).get("/api/openapi.json").status_code == 200
    assert calls == []


def test_a_sync_owner_returning_an_awaitable_is_awaited_on_the_loop(
    make: Callable[[Owner], _App],
) -> None:
    """A plain function that returns a coroutine has it awaited on the app's loop."""
    loops: list[asyncio.AbstractEventLoop] = []

    async def lookup(user: str | None) -> str | None:
        loops.append(asyncio.get_running_loop())
        return user

    app = make(lambda headers: lookup(headers.get("x-user")))
    batch = app.tracker.create_batch(["a.jpg"], owner="alice").batch_id
    assert app.get(f"/api/batch-status/{batch}", "alice").status_code == 200
    assert app.get(f"/api/batch-status/{batch}", "bob").status_code == 404
    assert loops == [app.client._loop] * 2


def test_the_wsgi_app_refuses_an_async_owner(tmp_path: Path) -> None:
    """The WSGI app has no loop to await an async owner on: TypeError at create_app."""
    tracker = BatchTracker(MemoryStore())
    runner = Orchestrator(tracker, lambda item: None, concurrency=1)
    try:
        with pytest.raises(TypeError, match="async owner"):
            wsgi_module.create_app(tracker, runner, UploadStore(tmp_path), owner=_async_user)
        app = wsgi_module.create_app(
            tracker, runner, UploadStore(tmp_path), owner=lambda h: _async_user(h)
        )
        client = httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t")
        answer = client.get(
            "/api/batch-status/00000000-0000-4000-8000-000000000000", headers={"X-User": "a"}
        )
        assert _code(answer) == (500, "internal")
    finally:
        runner.close()
