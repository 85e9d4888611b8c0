"""Pausing a batch, and "cancelled" as a status of its own (§9), through the public API:
the tracker on every store, the Orchestrator, and the HTTP API on every transport."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import types
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batchtrack import (
    BatchNotFound,
    BatchPaused,
    BatchTracker,
    InvalidTransition,
    Item,
    Orchestrator,
    Progress,
    SQLiteStore,
    Status,
    cli,
)
from batchtrack._http import COOKIE
from batchtrack.testing import FakeClock

pytest.importorskip("python_multipart")

from http_support import Service, jpeg

Client = Any


# -- the tracker, on every store ----------------------------------------------------------


def test_batch_paused_is_an_invalid_transition_named_for_the_batch(tracker: BatchTracker) -> None:
    """BatchPaused is an InvalidTransition from pending to processing that names the batch."""
    batch_id = tracker.create_batch([("a", "a.jpg")]).batch_id
    tracker.pause(batch_id)
    with pytest.raises(InvalidTransition) as caught:
        tracker.start_item(batch_id, "a")
    assert isinstance(caught.value, BatchPaused)
    assert (caught.value.current, caught.value.requested) == ("pending", "processing")
    assert "is paused" in str(caught.value)
    assert tracker.get(batch_id).items[0].attempts == 0


def test_pausing_someone_elses_batch_is_not_found(tracker: BatchTracker) -> None:
    """pause and unpause of a batch owned by another raise BatchNotFound, changing nothing."""
    batch_id = tracker.create_batch(["a.jpg"], owner="alice").batch_id
    with pytest.raises(BatchNotFound):
        tracker.pause(batch_id, owner="bob")
    assert tracker.pause(batch_id, owner="alice")
    with pytest.raises(BatchNotFound):
        tracker.unpause(batch_id, owner="bob")
    assert tracker.get(batch_id).status is Status.PAUSED


def test_a_paused_batch_that_nothing_finished_yet_says_paused(tracker: BatchTracker) -> None:
    """Before anything finished the reason for no ETA is "paused", not "starting"."""
    batch_id = tracker.create_batch(["a.jpg", "b.jpg"]).batch_id
    tracker.pause(batch_id)
    body = tracker.get(batch_id).to_dict()
    assert (body["status"], body["etaUnavailable"]) == ("paused", "paused")
    tracker.unpause(batch_id)
    assert tracker.get(batch_id).to_dict()["etaUnavailable"] == "starting"


def test_a_batch_of_only_cancelled_items_is_cancelled_and_done(
    tracker: BatchTracker, clock: FakeClock
) -> None:
    """Every item cancelled: status cancelled, finished, ETA 0, no reason for it."""
    batch_id = tracker.create_batch(["a.jpg", "b.jpg"]).batch_id
    clock.advance(5)
    assert tracker.cancel(batch_id) == 2
    snap = tracker.get(batch_id)
    assert snap.status is Status.CANCELLED
    assert snap.progress == Progress(total=2, cancelled=2)
    assert snap.progress.finished == 2
    assert snap.finished_at is not None
    assert (snap.estimated_time_remaining, snap.eta_range, snap.eta_unavailable) == (
        0,
        (0, 0),
        None,
    )
    body = snap.to_dict()
    assert body["progress"] == {
        "total": 2,
        "completed": 0,
        "failed": 0,
        "processing": 0,
        "pending": 0,
        "cancelled": 2,
    }


def test_items_are_never_paused_so_a_paused_filter_is_refused(tracker: BatchTracker) -> None:
    """get(status="paused") is a ValidationError: paused is a batch status only."""
    batch_id = tracker.create_batch(["a.jpg"]).batch_id
    with pytest.raises(ValueError, match="never paused"):
        tracker.get(batch_id, status="paused")


# -- the Orchestrator ----------------------------------------------------------------------


def test_orchestrator_skips_a_paused_batch_and_runs_it_on_resume(tmp_path: Path) -> None:
    """Paused while its first item runs: that item completes, the rest stay pending and
    never reach the processor; after unpause, resume runs them and the batch completes."""
    gate = threading.Event()
    ran: list[str] = []

    def processor(item: Item) -> None:
        assert item.id is not None
        ran.append(item.id)
        assert gate.wait(30)

    tracker = BatchTracker()
    with Orchestrator(tracker, processor, concurrency=1) as orch:
        snap = orch.submit([Item(f"{n}.jpg", source=f"{n}.jpg") for n in range(4)])
        _until(lambda: tracker.get(snap.batch_id).progress.processing == 1)
        assert tracker.pause(snap.batch_id)
        gate.set()
        paused = orch.wait(snap.batch_id, timeout=30)
        assert paused.status is Status.PAUSED
        assert paused.progress == Progress(total=4, completed=1, pending=3)
        assert len(ran) == 1
        assert tracker.unpause(snap.batch_id)
        orch.resume(snap.batch_id)
        final = orch.wait(snap.batch_id, timeout=30)
    assert final.status is Status.COMPLETED
    assert sorted(ran) == sorted(i.id for i in snap.items)


def test_orchestrator_cancel_gives_queued_items_the_cancelled_status(tmp_path: Path) -> None:
    """Orchestrator.cancel moves the items it had queued to cancelled, one event each."""
    gate = threading.Event()
    events: list[Any] = []
    tracker = BatchTracker()
    with Orchestrator(tracker, lambda item: gate.wait(30), concurrency=1) as orch:
        snap = orch.submit(
            [Item(f"{n}.jpg", source=f"{n}.jpg") for n in range(3)], on_progress=events.append
        )
        _until(lambda: tracker.get(snap.batch_id).progress.processing == 1)
        assert orch.cancel(snap.batch_id)
        gate.set()
        final = orch.wait(snap.batch_id, timeout=30)
    assert final.status is Status.CANCELLED
    assert final.progress == Progress(total=3, completed=1, cancelled=2)
    cancelled = [e for e in events if e.item.status is Status.CANCELLED]
    assert len(cancelled) == 2
    assert all(e.item.error is None for e in cancelled)


def _until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


# -- HTTP ---------------------------------------------------------------------------------


def _owner(client: Client) -> str:
    if COOKIE not in client.cookies:
        client.get(f"/api/batch-status/{uuid.uuid4()}")
    return f"session:{client.cookies[COOKIE]}"


def _start(client: Client, count: int) -> dict[str, Any]:
    files = [("files", (f"{n}.jpg", jpeg(), "image/jpeg")) for n in range(count)]
    up = client.post("/api/upload", files=files)
    assert up.status_code == 201, up.text
    ids = [f["id"] for f in up.json()["files"]]
    started = client.post("/api/process-batch", json={"fileIds": ids})
    assert started.status_code == 202, started.text
    return dict(started.json())


def _wait_for(client: Client, url: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        body: dict[str, Any] = client.get(url).json()
        if done(body):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.02)


def _error(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == code


def test_pause_over_http_holds_pending_items_and_unpause_runs_them(
    client: Client, service: Service
) -> None:
    """With 2 of 3 items running, pause answers {"paused": true} (then false); the
    running ones finish, the third stays pending under "paused"; unpause answers
    {"unpaused": true} and the runner completes the batch."""
    service.processor.gate.clear()
    batch = _start(client, 3)
    url, batch_id = batch["statusUrl"], batch["batchId"]
    _wait_for(client, url, lambda b: b["progress"]["processing"] == 2)
    response = client.post(f"/api/batch-pause/{batch_id}")
    assert response.status_code == 200, response.text
    assert response.json() == {"paused": True}
    assert client.post(f"/api/batch-pause/{batch_id}").json() == {"paused": False}
    service.processor.gate.set()
    held = _wait_for(client, url, lambda b: b["progress"]["completed"] == 2)
    assert held["status"] == "paused"
    assert held["progress"]["pending"] == 1
    assert held["etaUnavailable"] == "paused"
    assert held["estimatedTimeRemaining"] is None
    response = client.post(f"/api/batch-unpause/{batch_id}")
    assert response.status_code == 200, response.text
    assert response.json() == {"unpaused": True}
    final = _wait_for(client, url, lambda b: b["finishedAt"] is not None)
    assert final["status"] == "completed"
    assert len(service.processor.runs) == 3


def test_unpause_of_a_batch_not_paused_answers_false(client: Client, service: Service) -> None:
    """A batch never paused: {"unpaused": false}; a finished one cannot be paused."""
    snap = service.tracker.create_batch(["a.jpg"], owner=_owner(client))
    assert client.post(f"/api/batch-unpause/{snap.batch_id}").json() == {"unpaused": False}
    service.tracker.cancel(snap.batch_id)
    assert client.post(f"/api/batch-pause/{snap.batch_id}").json() == {"paused": False}


def test_pause_routes_answer_400_and_404_as_batch_status(client: Client, service: Service) -> None:
    """Not a UUID: 400 invalid_id; unknown, or another session's batch: 404, unchanged."""
    theirs = service.tracker.create_batch(["a.jpg"], owner="session:someone-else")
    for route in ("batch-pause", "batch-unpause"):
        _error(client.post(f"/api/{route}/not-a-uuid"), 400, "invalid_id")
        _error(client.post(f"/api/{route}/{uuid.uuid4()}"), 404, "batch_not_found")
        _error(client.post(f"/api/{route}/{theirs.batch_id}"), 404, "batch_not_found")
    assert service.tracker.get(theirs.batch_id).status is Status.PENDING


def test_retry_over_http_takes_cancelled_items_back(client: Client, service: Service) -> None:
    """A cancelled batch's retry with no body answers 202 and its items run to the end."""
    service.processor.gate.clear()
    batch = _start(client, 3)
    url, batch_id = batch["statusUrl"], batch["batchId"]
    _wait_for(client, url, lambda b: b["progress"]["processing"] == 2)
    assert client.post(f"/api/batch-cancel/{batch_id}").json() == {"cancelled": 1}
    service.processor.gate.set()
    ended = _wait_for(client, url, lambda b: b["finishedAt"] is not None)
    assert ended["status"] == "cancelled"
    response = client.post(f"/api/batch-retry/{batch_id}")
    assert response.status_code == 202, response.text
    assert response.json()["retried"] == 1
    final = _wait_for(client, url, lambda b: b["finishedAt"] is not None)
    assert final["status"] == "completed"


def test_openapi_documents_pause_unpause_and_the_cancelled_count(client: Client) -> None:
    """The OpenAPI document has both routes, their bodies, and the new status values."""
    doc = client.get("/api/openapi.json").json()
    assert doc["paths"]["/batch-pause/{batchId}"]["post"]["operationId"] == "pauseBatch"
    assert doc["paths"]["/batch-unpause/{batchId}"]["post"]["operationId"] == "unpauseBatch"
    schemas = doc["components"]["schemas"]
    assert schemas["Paused"]["required"] == ["paused"]
    assert schemas["Unpaused"]["required"] == ["unpaused"]
    status = schemas["BatchStatus"]["properties"]
    assert {"cancelled", "paused"} <= set(status["status"]["enum"])
    assert "cancelled" in status["progress"]["required"]
    assert "paused" in status["etaUnavailable"]["enum"]


# -- the command line ---------------------------------------------------------------------


def test_cli_status_shows_a_paused_batch_and_cancelled_counts(tmp_path: Path) -> None:
    """`batchtrack status` prints "paused" for a paused batch, and the cancelled count
    and status of a cancelled one."""
    data = tmp_path / "data"
    data.mkdir()
    with SQLiteStore(data / "batchtrack.db") as store:
        tracker = BatchTracker(store)
        held = tracker.create_batch(["a.jpg", "b.jpg"]).batch_id
        tracker.pause(held)
        stopped = tracker.create_batch(["c.jpg"]).batch_id
        tracker.cancel(stopped)
    for batch_id, status in ((held, "paused"), (stopped, "cancelled")):
        result = subprocess.run(
            [sys.executable, "-m", "batchtrack", "status", batch_id, "--data-dir", str(data)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        body = json.loads(result.stdout)
        assert body["status"] == status
    assert body["progress"]["cancelled"] == 1
    assert body["images"][0]["status"] == "cancelled"


def test_process_summary_counts_cancelled_images_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The `process` summary names images cancelled meanwhile: "…, 0 failed, 1 cancelled"."""
    tracker = BatchTracker()
    snap = tracker.create_batch(["a.jpg", "b.jpg"])
    tracker.start_item(snap.batch_id, snap.items[0].id)
    tracker.complete_item(snap.batch_id, snap.items[0].id)
    tracker.cancel(snap.batch_id)
    final = tracker.get(snap.batch_id)
    sources = [cli._Source(tmp_path / n, Path(n)) for n in ("a.jpg", "b.jpg")]
    args = types.SimpleNamespace(json=False, data_dir=None)
    processor = types.SimpleNamespace(written={})
    cli._report(final, sources, [], processor, args)  # type: ignore[arg-type]
    assert "1 of 2 images processed, 0 failed, 1 cancelled" in capsys.readouterr().err


def test_status_filter_takes_cancelled_and_refuses_paused(client: Client, service: Service) -> None:
    """`?status=cancelled` lists the cancelled images; `?status=paused` is a 400
    invalid_query, as items are never paused."""
    snap = service.tracker.create_batch(["a.jpg", "b.jpg"], owner=_owner(client))
    service.tracker.start_item(snap.batch_id, snap.items[0].id)
    service.tracker.cancel(snap.batch_id)
    url = f"/api/batch-status/{snap.batch_id}"
    body = client.get(url, params={"status": "cancelled"}).json()
    assert [i["filename"] for i in body["images"]] == ["b.jpg"]
    _error(client.get(url, params={"status": "paused"}), 400, "invalid_query")


def test_the_terminal_bar_counts_cancelled_images_as_done() -> None:
    """A bar following a cancelled batch ends full, naming the cancelled images apart."""
    import io

    from batchtrack.progress import ProgressBar

    tracker = BatchTracker()
    snap = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg"), ("c", "c.jpg")])
    tracker.start_item(snap.batch_id, "a")
    tracker.complete_item(snap.batch_id, "a")
    tracker.cancel(snap.batch_id)
    out = io.StringIO()
    with ProgressBar(total=3, file=out) as bar:
        bar.update(tracker.get(snap.batch_id))
    assert "3/3" in out.getvalue()
    assert "1 ok, 0 failed, 2 cancelled" in out.getvalue()
