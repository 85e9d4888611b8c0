"""The HTTP API, one behaviour suite over ASGI and WSGI, in process and under real servers."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("python_multipart")
from batchtrack import BatchTracker, Item, SQLiteStore, Status, ValidationError
from batchtrack import wsgi as wsgi_module
from batchtrack._http import COOKIE
from http_support import (
    TRANSPORTS,
    RecordingRunner,
    Service,
    clients,
    flaky_jpeg,
    jpeg,
)

Client = Any


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """Each transport: in-process ASGI and WSGI, uvicorn and a threaded wsgiref server."""
    return str(request.param)


@pytest.fixture
def new_client(transport: str, service: Service) -> Iterator[Callable[[], Client]]:
    """A factory of clients for each transport; each client has its own cookie jar."""
    with clients(service, transport) as make:
        yield make


@pytest.fixture
def client(new_client: Callable[[], Client]) -> Client:
    return new_client()


def _no_traceback(response: Any) -> None:
    assert "Traceback" not in response.text
    assert 'File "' not in response.text


def _error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    _no_traceback(response)
    return body["error"]


def _upload(client: Client, *files: tuple[str, bytes]) -> Any:
    return client.post(
        "/api/upload", files=[("files", (name, data, "image/jpeg")) for name, data in files]
    )


def _wait_finished(client: Client, url: str, timeout: float = 30) -> dict[str, Any]:
    return _wait_for(client, url, lambda body: body["finishedAt"] is not None, timeout)


def _wait_for(
    client: Client, url: str, done: Callable[[dict[str, Any]], bool], timeout: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(url).json()
        if done(body):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def _owner(client: Client) -> str:
    """The owner id the API gives this client's session (asking once for a cookie)."""
    if COOKIE not in client.cookies:
        client.get(f"/api/batch-status/{uuid.uuid4()}")
    return f"session:{client.cookies[COOKIE]}"


def _start(client: Client, *files: tuple[str, bytes]) -> dict[str, Any]:
    """Upload ``files`` and process them as one batch; the 202 body."""
    up = _upload(client, *files)
    assert up.status_code == 201, up.text
    started = client.post(
        "/api/process-batch", json={"fileIds": [f["id"] for f in up.json()["files"]]}
    )
    assert started.status_code == 202, started.text
    return {**started.json(), "files": up.json()["files"]}


# -- the full flow -------------------------------------------------------------------------


def test_full_flow_upload_process_poll_download(new_client: Callable[[], Client]) -> None:
    """Upload JPEGs and a broken file, process, poll to the end; others see nothing."""
    client = new_client()
    up = _upload(
        client,
        ("one.jpg", jpeg()),
        ("two.jpg", jpeg(color=(0, 100, 0))),
        ("three.jpg", jpeg((300, 900))),
        ("broken.jpg", b"this is not a jpeg"),
    )
    assert up.status_code == 201, up.text
    assert "batchtrack_session=" in up.headers.get("set-cookie", "")
    assert "HttpOnly" in up.headers["set-cookie"]
    assert "SameSite=Lax" in up.headers["set-cookie"]
    files = up.json()["files"]
    assert [f["filename"] for f in files] == ["one.jpg", "two.jpg", "three.jpg", "broken.jpg"]
    assert files[3]["size"] == len(b"this is not a jpeg")

    started = client.post("/api/process-batch", json={"fileIds": [f["id"] for f in files]})
    assert started.status_code == 202, started.text
    body = started.json()
    assert set(body) == {"batchId", "status", "statusUrl"}
    assert body["statusUrl"] == f"/api/batch-status/{body['batchId']}"
    assert started.headers["location"] == body["statusUrl"]

    final = _wait_finished(client, body["statusUrl"])
    assert final["batchId"] == body["batchId"]
    assert final["status"] == "completed"
    assert final["progress"] == {
        "total": 4,
        "completed": 3,
        "failed": 1,
        "processing": 0,
        "pending": 0,
        "cancelled": 0,
    }
    assert final["estimatedTimeRemaining"] == 0
    assert final["finishedAt"].endswith("Z")
    assert final["createdAt"].endswith("Z")
    images = final["images"]
    assert [i["filename"] for i in images] == ["one.jpg", "two.jpg", "three.jpg", "broken.jpg"]
    assert images[3] == {
        "id": images[3]["id"],
        "filename": "broken.jpg",
        "status": "failed",
        "error": "not an image",
    }
    assert all("error" not in i for i in images[:3])

    status = client.get(body["statusUrl"])
    assert status.headers["cache-control"] == "no-store"
    etag = status.headers["etag"]
    unchanged = client.get(body["statusUrl"], headers={"If-None-Match": etag})
    assert unchanged.status_code == 304
    assert unchanged.headers["etag"] == etag

    download = client.get(f"/api/batch-results/{body['batchId']}/{images[0]['id']}")
    assert download.status_code == 200
    assert download.headers["content-type"] == "image/jpeg"
    assert download.content[:2] == b"\xff\xd8"
    assert "one.jpg" in download.headers["content-disposition"]
    _error(client.get(f"/api/batch-results/{body['batchId']}/{images[3]['id']}"), 404)

    stranger = new_client()
    _error(stranger.get(body["statusUrl"]), 404, "batch_not_found")
    _error(stranger.get(f"/api/batch-results/{body['batchId']}/{images[0]['id']}"), 404)
    _error(
        stranger.post("/api/process-batch", json={"fileIds": [files[0]["id"]]}),
        404,
        "file_not_found",
    )


def test_events_stream_one_event_per_change_until_finished(client: Client) -> None:
    """The events stream sends the status body at each change and closes when finished."""
    files = _upload(client, ("a.jpg", jpeg()), ("b.jpg", jpeg()), ("c.txt", b"text")).json()[
        "files"
    ]
    batch = client.post("/api/process-batch", json={"fileIds": [f["id"] for f in files]}).json()
    response = client.get(f"/api/batch-events/{batch['batchId']}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [
        json.loads(line[len("data: ") :])
        for line in response.text.splitlines()
        if line.startswith("data: ")
    ]
    assert events
    assert events[-1]["status"] == "completed"
    assert events[-1]["progress"]["failed"] == 1
    done = [e["progress"]["completed"] + e["progress"]["failed"] for e in events]
    assert done == sorted(done)
    assert len({json.dumps(e) for e in events}) == len(events)  # one event per change


# -- errors ----------------------------------------------------------------------------------


def test_upload_errors(client: Client) -> None:
    """415 not multipart, 400 no files or too many, 413 too large, 400 malformed."""
    _error(client.post("/api/upload", json={"files": []}), 415, "unsupported_media_type")
    _error(
        client.post("/api/upload", files=[("other", ("a.jpg", b"x", "image/jpeg"))]),
        400,
        "no_files",
    )
    _error(_upload(client, *[(f"{n}.jpg", b"x") for n in range(11)]), 400, "too_many_files")
    _error(_upload(client, ("big.jpg", b"\0" * 300_001)), 413, "too_large")
    truncated = (
        b'--XyZ\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\npartial data"
    )
    _error(
        client.post(
            "/api/upload",
            content=truncated,
            headers={"Content-Type": "multipart/form-data; boundary=XyZ"},
        ),
        400,
        "bad_multipart",
    )
    _error(
        client.post(
            "/api/upload", content=b"whatever", headers={"Content-Type": "multipart/form-data"}
        ),
        400,
        "bad_multipart",
    )


def test_a_rejected_upload_keeps_nothing(client: Client, service: Service) -> None:
    """When one file of a request is too large, none of the request's files are kept."""
    _error(_upload(client, ("ok.jpg", b"small"), ("big.jpg", b"\0" * 300_001)), 413)
    assert [p.name for p in service.uploads.directory.iterdir()] == []


def test_path_in_filename_never_chooses_where_a_file_goes(client: Client, service: Service) -> None:
    """A filename like ../../etc/passwd is stored under its UUID and shown as 'passwd'."""
    response = _upload(client, ("../../etc/passwd", b"root:x:0:0"))
    assert response.status_code == 201
    stored = response.json()["files"][0]
    assert stored["filename"] == "passwd"
    names = sorted(p.name for p in service.uploads.directory.iterdir())
    assert names == sorted([stored["id"], stored["id"] + ".json"])


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b"{not json", {"Content-Type": "application/json"}, 400, "bad_json"),
        (b"[]", {"Content-Type": "application/json"}, 400, "missing_file_ids"),
        (b"{}", {"Content-Type": "application/json"}, 400, "missing_file_ids"),
        (b'{"fileIds": "abc"}', {"Content-Type": "application/json"}, 400, "bad_file_ids"),
        (b'{"fileIds": []}', {"Content-Type": "application/json"}, 400, "bad_file_ids"),
        (b'{"fileIds": [1, 2]}', {"Content-Type": "application/json"}, 400, "bad_file_ids"),
        (b'{"fileIds": ["not-a-uuid"]}', {"Content-Type": "application/json"}, 400, "invalid_id"),
        (b"\xff\xfe", {"Content-Type": "application/json"}, 400, "bad_json"),
        (b"[" * 50_000, {"Content-Type": "application/json"}, 400, "bad_json"),
        (b'{"fileIds": []}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
        (b'{"fileIds": []}', {}, 415, "unsupported_media_type"),
        (
            b'{"fileIds": ["' + b"a" * 70_000 + b'"]}',
            {"Content-Type": "application/json"},
            413,
            "too_large",
        ),
    ],
)
def test_process_batch_rejects_bad_requests(
    client: Client, body: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    """Each malformed process-batch request gets its documented 4xx."""
    _error(client.post("/api/process-batch", content=body, headers=headers), status, code)


def test_process_batch_checks_every_id_before_looking_any_up(client: Client) -> None:
    """Duplicates and too many ids are 400 even when the ids do not exist."""
    import uuid

    one = str(uuid.uuid4())
    _error(
        client.post("/api/process-batch", json={"fileIds": [one, one]}), 400, "duplicate_file_ids"
    )
    many = [str(uuid.uuid4()) for _ in range(11)]
    _error(client.post("/api/process-batch", json={"fileIds": many}), 400, "too_many_files")
    _error(client.post("/api/process-batch", json={"fileIds": [one]}), 404, "file_not_found")


def test_status_endpoint_errors(client: Client) -> None:
    """400 for a non-UUID id, 404 for an unknown one, on status, events and results."""
    import uuid

    for path in ("batch-status", "batch-events"):
        _error(client.get(f"/api/{path}/not-a-uuid"), 400, "invalid_id")
        _error(client.get(f"/api/{path}/{uuid.uuid4()}"), 404, "batch_not_found")
    _error(client.get(f"/api/batch-results/{uuid.uuid4()}/x"), 404)
    _error(client.get("/api/batch-results/nope/nope"), 400, "invalid_id")


def test_wrong_method_and_unknown_path(client: Client) -> None:
    """405 with Allow for a known path, 404 JSON for an unknown one."""
    response = client.get("/api/upload")
    _error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"
    _error(client.post("/api/batch-status/x"), 405)
    for action in ("batch-cancel", "batch-retry"):
        response = client.get(f"/api/{action}/{uuid.uuid4()}")
        _error(response, 405, "method_not_allowed")
        assert response.headers["allow"] == "POST"
    _error(client.get("/api/nothing-here"), 404, "not_found")
    _error(client.get("/elsewhere"), 404, "not_found")


# -- cancel and retry -----------------------------------------------------------------------


@pytest.fixture
def recording(tmp_path: Path, transport: str) -> Iterator[tuple[Service, Client]]:
    """A service whose runner is a RecordingRunner, and a client for it, per transport."""
    svc = Service(tmp_path / "recording", runner=RecordingRunner)
    try:
        with clients(svc, transport) as make:
            yield svc, make()
    finally:
        svc.close()


def test_cancel_cancels_every_pending_item_and_answers_how_many(
    client: Client, service: Service
) -> None:
    """Cancelling a batch nobody has started cancels its 3 items: {"cancelled": 3}, and
    the batch reads "cancelled" with no error on its items."""
    snap = service.tracker.create_batch(["a.jpg", "b.jpg", "c.jpg"], owner=_owner(client))
    response = client.post(f"/api/batch-cancel/{snap.batch_id}")
    assert response.status_code == 200, response.text
    assert response.json() == {"cancelled": 3}
    body = client.get(f"/api/batch-status/{snap.batch_id}").json()
    assert body["status"] == "cancelled"
    assert body["progress"]["cancelled"] == 3
    assert [(i["status"], "error" in i) for i in body["images"]] == [("cancelled", False)] * 3


def test_cancelling_a_finished_batch_cancels_nothing(client: Client) -> None:
    """A completed batch answers {"cancelled": 0} and stays completed."""
    batch = _start(client, ("a.jpg", jpeg()))
    _wait_finished(client, batch["statusUrl"])
    response = client.post(f"/api/batch-cancel/{batch['batchId']}")
    assert response.status_code == 200
    assert response.json() == {"cancelled": 0}
    assert client.get(batch["statusUrl"]).json()["status"] == "completed"


def test_cancel_stops_queued_items_of_a_running_batch(client: Client, service: Service) -> None:
    """With 2 of 4 items running, cancel cancels the 2 queued ones; the processor never
    runs them and the running ones complete."""
    service.processor.gate.clear()
    batch = _start(client, *[(f"{n}.jpg", jpeg((200, 150))) for n in range(4)])
    _wait_for(client, batch["statusUrl"], lambda b: b["progress"]["processing"] == 2)
    response = client.post(f"/api/batch-cancel/{batch['batchId']}")
    assert response.json() == {"cancelled": 2}
    service.processor.gate.set()
    final = _wait_finished(client, batch["statusUrl"])
    assert final["progress"]["completed"] == 2
    assert final["status"] == "cancelled"
    cancelled = [i["id"] for i in final["images"] if i["status"] == "cancelled"]
    assert len(cancelled) == 2
    assert len(service.processor.runs) == 2
    assert not set(cancelled) & set(service.processor.runs)


def test_cancel_rejects_a_bad_or_unknown_batch_id(client: Client) -> None:
    """400 for an id that is not a UUID, 404 for one that names no batch."""
    _error(client.post("/api/batch-cancel/not-a-uuid"), 400, "invalid_id")
    _error(client.post(f"/api/batch-cancel/{uuid.uuid4()}"), 404, "batch_not_found")


def test_retry_reruns_only_the_failed_items_and_the_batch_completes(
    client: Client, service: Service
) -> None:
    """Two injected failures, then a retry with no body: the orchestrator runs those two
    again (and nothing else) and the batch ends completed."""
    service.switch.touch()
    batch = _start(
        client,
        ("good1.jpg", jpeg()),
        ("flaky1.jpg", flaky_jpeg()),
        ("good2.jpg", jpeg()),
        ("flaky2.jpg", flaky_jpeg()),
    )
    first = _wait_finished(client, batch["statusUrl"])
    failed = [i["id"] for i in first["images"] if i["status"] == "failed"]
    assert [i.get("error") for i in first["images"]] == [None, "injected failure"] * 2
    service.switch.unlink()

    response = client.post(f"/api/batch-retry/{batch['batchId']}")
    assert response.status_code == 202, response.text
    assert response.json() == {
        "retried": 2,
        "batchId": batch["batchId"],
        "statusUrl": batch["statusUrl"],
    }
    assert response.headers["location"] == batch["statusUrl"]
    final = _wait_finished(client, batch["statusUrl"])
    assert final["status"] == "completed"
    assert final["progress"]["completed"] == 4
    assert final["finishedAt"] is not None
    runs = service.processor.runs
    assert sorted(runs) == sorted([i["id"] for i in first["images"]] + failed)


def test_retry_of_named_items_leaves_the_other_failures_alone(
    client: Client, service: Service
) -> None:
    """{"itemIds": [one]} retries that one item only; the other stays failed."""
    service.switch.touch()
    batch = _start(client, ("flaky1.jpg", flaky_jpeg()), ("flaky2.jpg", flaky_jpeg()))
    first, second = _wait_finished(client, batch["statusUrl"])["images"]
    service.switch.unlink()
    response = client.post(
        f"/api/batch-retry/{batch['batchId']}", json={"itemIds": [first["id"].upper()]}
    )
    assert response.status_code == 202, response.text
    assert response.json()["retried"] == 1
    final = _wait_finished(client, batch["statusUrl"])
    assert [i["status"] for i in final["images"]] == ["completed", "failed"]
    assert service.processor.runs.count(first["id"]) == 2
    assert service.processor.runs.count(second["id"]) == 1


def test_retry_with_nothing_failed_is_a_conflict(client: Client) -> None:
    """409 nothing_to_retry for a batch without failures, and for a named completed item."""
    batch = _start(client, ("a.jpg", jpeg()))
    image = _wait_finished(client, batch["statusUrl"])["images"][0]
    url = f"/api/batch-retry/{batch['batchId']}"
    assert "no item" in _error(client.post(url), 409, "nothing_to_retry")["message"]
    named = _error(client.post(url, json={"itemIds": [image["id"]]}), 409, "nothing_to_retry")
    assert "a.jpg" in named["message"]


def test_retry_of_an_item_the_batch_does_not_have_is_404(client: Client) -> None:
    """A named item id that is not in the batch answers 404 item_not_found."""
    batch = _start(client, ("a.txt", b"not an image"))
    _wait_finished(client, batch["statusUrl"])
    missing = str(uuid.uuid4())
    response = client.post(f"/api/batch-retry/{batch['batchId']}", json={"itemIds": [missing]})
    assert missing in _error(response, 404, "item_not_found")["message"]


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b"{not json", {"Content-Type": "application/json"}, 400, "bad_json"),
        (b"[" * 50_000, {"Content-Type": "application/json"}, 400, "bad_json"),
        (b"[]", {"Content-Type": "application/json"}, 400, "missing_item_ids"),
        (b"{}", {"Content-Type": "application/json"}, 400, "missing_item_ids"),
        (b"null", {"Content-Type": "application/json"}, 400, "missing_item_ids"),
        (b'{"itemIds": "abc"}', {"Content-Type": "application/json"}, 400, "bad_item_ids"),
        (b'{"itemIds": []}', {"Content-Type": "application/json"}, 400, "bad_item_ids"),
        (b'{"itemIds": [1]}', {"Content-Type": "application/json"}, 400, "bad_item_ids"),
        (b'{"itemIds": ["x"]}', {"Content-Type": "application/json"}, 400, "invalid_id"),
        (
            json.dumps({"itemIds": ["x"] * 10_001}).encode(),
            {"Content-Type": "application/json"},
            400,
            "too_many_items",
        ),
        (b'{"itemIds": ["x"]}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
        (b'{"itemIds": ["x"]}', {}, 415, "unsupported_media_type"),
        (b" " * 70_000, {"Content-Type": "application/json"}, 413, "too_large"),
    ],
)
def test_retry_rejects_bad_requests(
    client: Client, body: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    """Each malformed retry body gets its documented 4xx, before the batch is looked up."""
    url = f"/api/batch-retry/{uuid.uuid4()}"
    _error(client.post(url, content=body, headers=headers), status, code)


def test_retry_rejects_a_bad_or_unknown_batch_id(client: Client) -> None:
    """400 for an id that is not a UUID, 404 for one that names no batch."""
    _error(client.post("/api/batch-retry/not-a-uuid"), 400, "invalid_id")
    _error(client.post(f"/api/batch-retry/{uuid.uuid4()}"), 404, "batch_not_found")


def test_retry_answers_410_when_an_upload_file_is_gone(client: Client, service: Service) -> None:
    """With one failed item's upload deleted, retry answers 410 inputs_gone and retries none."""
    service.switch.touch()
    batch = _start(client, ("flaky1.jpg", flaky_jpeg()), ("flaky2.jpg", flaky_jpeg()))
    before = _wait_finished(client, batch["statusUrl"])
    service.switch.unlink()
    (service.uploads.directory / batch["files"][1]["id"]).unlink()
    gone = _error(client.post(f"/api/batch-retry/{batch['batchId']}"), 410, "inputs_gone")
    assert "flaky2.jpg" in gone["message"]
    assert "flaky1.jpg" not in gone["message"]
    assert str(service.uploads.directory) not in gone["message"]
    assert client.get(batch["statusUrl"]).json() == before
    assert len(service.processor.runs) == 2


def test_retry_answers_410_when_the_uploads_expired(client: Client, service: Service) -> None:
    """Uploads past their ttl count as gone, swept or not: 410 inputs_gone."""
    service.switch.touch()
    batch = _start(client, ("flaky.jpg", flaky_jpeg()))
    _wait_finished(client, batch["statusUrl"])
    service.switch.unlink()
    service.uploads.clock = lambda: time.time() + 2 * service.uploads.ttl
    url = f"/api/batch-retry/{batch['batchId']}"
    _error(client.post(url), 410, "inputs_gone")
    assert service.uploads.cleanup() == 1
    _error(client.post(url), 410, "inputs_gone")


def test_retry_that_loses_a_race_is_a_conflict(
    client: Client, service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When another request retries the items first, the tracker refuses: 409."""
    service.switch.touch()
    batch = _start(client, ("flaky.jpg", flaky_jpeg()))
    _wait_finished(client, batch["statusUrl"])
    real_retry = BatchTracker.retry

    def raced(self: BatchTracker, batch_id: str, *args: Any, **kwargs: Any) -> int:
        real_retry(self, batch_id, *args, **kwargs)  # the other request wins
        return real_retry(self, batch_id, *args, **kwargs)

    monkeypatch.setattr(BatchTracker, "retry", raced)
    response = client.post(f"/api/batch-retry/{batch['batchId']}")
    assert "pending" in _error(response, 409, "nothing_to_retry")["message"]


def test_retry_while_shutting_down_is_503(client: Client, service: Service) -> None:
    """When the runner is closed, the retry answers 503 shutting_down."""
    batch = _start(client, ("a.txt", b"not an image"))
    _wait_finished(client, batch["statusUrl"])
    service.orchestrator.close()
    _error(client.post(f"/api/batch-retry/{batch['batchId']}"), 503, "shutting_down")


def test_another_session_cannot_cancel_or_retry_a_batch(
    new_client: Callable[[], Client], service: Service
) -> None:
    """Cancel and retry of someone else's batch are 404, and change nothing."""
    client = new_client()
    failed = _start(client, ("a.txt", b"not an image"))
    before = _wait_finished(client, failed["statusUrl"])
    pending = service.tracker.create_batch(["b.jpg"], owner=_owner(client))
    stranger = new_client()
    _error(stranger.post(f"/api/batch-retry/{failed['batchId']}"), 404, "batch_not_found")
    _error(stranger.post(f"/api/batch-cancel/{pending.batch_id}"), 404, "batch_not_found")
    assert client.get(failed["statusUrl"]).json() == before
    assert service.tracker.get(pending.batch_id).status is Status.PENDING


def test_a_custom_runner_gets_str_sources_and_is_resumed_after_retry(
    recording: tuple[Service, Client],
) -> None:
    """Any Runner works: process-batch submits Items whose sources are the upload paths,
    and a retry calls its resume with the batch id."""
    service, client = recording
    runner = service.runner
    assert isinstance(runner, RecordingRunner)
    service.switch.touch()
    batch = _start(client, ("good.jpg", jpeg()), ("flaky.jpg", flaky_jpeg()))
    ((call, items),) = runner.calls
    assert call == "submit"
    assert [i.filename for i in items] == ["good.jpg", "flaky.jpg"]
    paths = [str(service.uploads.directory / f["id"]) for f in batch["files"]]
    assert [i.source for i in items] == paths
    assert all(type(i.source) is str for i in items)
    assert runner.run(batch["batchId"]).progress.failed == 1
    service.switch.unlink()

    response = client.post(f"/api/batch-retry/{batch['batchId']}")
    assert response.status_code == 202, response.text
    assert response.json()["retried"] == 1
    assert runner.calls[1:] == [("resume", batch["batchId"])]
    assert runner.run(batch["batchId"]).status is Status.COMPLETED
    body = client.get(batch["statusUrl"]).json()
    assert body["progress"]["completed"] == 2
    download = client.get(f"/api/batch-results/{batch['batchId']}/{body['images'][1]['id']}")
    assert download.status_code == 200  # results_dir came from runner.processor.output_dir


def test_cancel_counts_from_the_tracker_and_tells_the_runner(
    recording: tuple[Service, Client],
) -> None:
    """The answer is the tracker's count, whatever the runner's cancel returns; the runner
    is told to drop the batch."""
    service, client = recording
    batch = _start(client, ("a.jpg", jpeg()), ("b.jpg", jpeg()))
    assert client.post(f"/api/batch-cancel/{batch['batchId']}").json() == {"cancelled": 2}
    assert client.post(f"/api/batch-cancel/{batch['batchId']}").json() == {"cancelled": 0}
    runner = service.runner
    assert [c for c in runner.calls if c[0] == "cancel"] == [("cancel", batch["batchId"])] * 2


@pytest.mark.parametrize("module", ["asgi", "wsgi"])
@pytest.mark.parametrize(
    ("runner", "missing"),
    [
        (object(), "submit or resume or cancel"),
        (
            type("SubmitOnly", (), {"submit": lambda self, items, owner=None: None})(),
            "resume or cancel",
        ),
        (
            type("NotCallable", (), {"submit": 1, "resume": 2, "cancel": 3})(),
            "submit or resume or cancel",
        ),
    ],
)
def test_create_app_rejects_what_is_not_a_runner(
    tmp_path: Path, module: str, runner: object, missing: str
) -> None:
    """An object without callable submit, resume and cancel is a ValidationError naming
    what is missing."""
    import importlib

    from batchtrack import ValidationError
    from batchtrack.uploads import UploadStore

    create_app = importlib.import_module(f"batchtrack.{module}").create_app
    with pytest.raises(ValidationError, match=f"has no {missing} method"):
        create_app(BatchTracker(), runner, UploadStore(tmp_path))


# -- the OpenAPI document -------------------------------------------------------------------


def test_openapi_document_describes_the_real_responses(client: Client, service: Service) -> None:
    """Real responses, errors included, validate against the schemas the document gives."""
    jsonschema = pytest.importorskip("jsonschema")
    doc = client.get("/api/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {
        "/upload",
        "/process-batch",
        "/batches",
        "/batch-status/{batchId}",
        "/batch-events/{batchId}",
        "/batch-results/{batchId}/{itemId}",
        "/batch-results/{batchId}.zip",
        "/batch-cancel/{batchId}",
        "/batch-retry/{batchId}",
        "/batch-pause/{batchId}",
        "/batch-unpause/{batchId}",
        "/openapi.json",
    }

    def check(response: Any, path: str, method: str = "post") -> Any:
        documented = doc["paths"][path][method]["responses"]
        assert str(response.status_code) in documented, (path, response.status_code)
        schema = documented[str(response.status_code)]["content"]["application/json"]["schema"]
        jsonschema.validate(response.json(), {**schema, "components": doc["components"]})
        return response.json()

    service.switch.touch()
    up = _upload(client, ("a.jpg", jpeg()), ("b.txt", b"x"), ("c.jpg", flaky_jpeg()))
    check(up, "/upload")
    started = client.post(
        "/api/process-batch", json={"fileIds": [f["id"] for f in up.json()["files"]]}
    )
    batch = check(started, "/process-batch")
    status_path = "/batch-status/{batchId}"
    final = _wait_finished(client, batch["statusUrl"])
    check(client.get(batch["statusUrl"]), status_path, "get")
    check(client.get("/api/batch-status/nope"), status_path, "get")
    check(client.get(f"/api/batch-status/{uuid.uuid4()}"), status_path, "get")

    retry = "/batch-retry/{batchId}"
    check(client.post(f"/api/batch-retry/{batch['batchId']}", json={"itemIds": ["x"]}), retry)
    check(client.post(f"/api/batch-retry/{uuid.uuid4()}"), retry)
    check(client.post(f"/api/batch-retry/{batch['batchId']}", content=b"x"), retry)
    (service.uploads.directory / up.json()["files"][1]["id"]).unlink()
    check(client.post(f"/api/batch-retry/{batch['batchId']}"), retry)  # 410
    check(
        client.post(
            f"/api/batch-retry/{batch['batchId']}", json={"itemIds": [final["images"][0]["id"]]}
        ),
        retry,
    )  # 409
    service.switch.unlink()
    named = {"itemIds": [final["images"][2]["id"]]}
    check(client.post(f"/api/batch-retry/{batch['batchId']}", json=named), retry)  # 202

    results_zip = "/batch-results/{batchId}.zip"
    check(client.get("/api/batch-results/nope.zip"), results_zip, "get")
    check(client.get(f"/api/batch-results/{uuid.uuid4()}.zip"), results_zip, "get")
    zipped = client.get(f"/api/batch-results/{batch['batchId']}.zip")
    assert zipped.status_code == 200
    assert "application/zip" in doc["paths"][results_zip]["get"]["responses"]["200"]["content"]

    cancel = "/batch-cancel/{batchId}"
    assert check(client.post(f"/api/batch-cancel/{batch['batchId']}"), cancel)["cancelled"] >= 0
    check(client.post("/api/batch-cancel/nope"), cancel)
    check(client.post(f"/api/batch-cancel/{uuid.uuid4()}"), cancel)

    for name, key in (("pause", "paused"), ("unpause", "unpaused")):
        path = f"/batch-{name}/{{batchId}}"
        assert check(client.post(f"/api/batch-{name}/{batch['batchId']}"), path)[key] in (
            True,
            False,
        )
        check(client.post(f"/api/batch-{name}/nope"), path)
        check(client.post(f"/api/batch-{name}/{uuid.uuid4()}"), path)

    # An item started twice (its worker lost, then reclaimed) carries "attempts".
    owner = _owner(client)
    twice = service.tracker.create_batch([Item("d.jpg", id=str(uuid.uuid4()))], owner=owner)
    item_id = twice.items[0].id
    service.tracker.start_item(twice.batch_id, item_id, lease=0.001)
    time.sleep(0.01)
    assert service.tracker.reclaim() == 1
    service.tracker.start_item(twice.batch_id, item_id)
    body = check(client.get(f"/api/batch-status/{twice.batch_id}"), status_path, "get")
    assert body["images"][0]["attempts"] == 2


# -- ownership and mounting -----------------------------------------------------------------


def test_signed_session_cookies_are_honoured_by_every_app_with_the_secret(tmp_path: Path) -> None:
    """With session_secret, a cookie one app issued is honoured by another app with the same
    secret (two web processes), and its batch stays invisible to an app with another."""
    import httpx

    secret = "s3cret-shared-by-every-web-process"
    service = Service(tmp_path, session_secret=secret)
    twin = wsgi_module.create_app(
        service.tracker, service.runner, service.uploads, session_secret=secret
    )
    stranger = wsgi_module.create_app(
        service.tracker, service.runner, service.uploads, session_secret="another-secret-entirely"
    )
    try:
        with clients(service, "asgi") as make:
            client = make()
            started = _start(client, ("one.jpg", jpeg()))
            cookie = client.cookies[COOKIE]
            token, _, signature = cookie.partition(".")
            assert len(token) == 32
            assert len(signature) == 43
            url = f"/api/batch-status/{started['batchId']}"
            for app, status in ((twin, 200), (stranger, 404)):
                with httpx.Client(
                    transport=httpx.WSGITransport(app=app), base_url="http://testserver"
                ) as other:
                    answer = other.get(url, headers={"cookie": f"{COOKIE}={cookie}"})
                    assert answer.status_code == status, answer.text
                    assert ("set-cookie" in answer.headers) is (status == 404)
    finally:
        service.close()


def test_with_a_secret_a_cookie_the_client_made_up_starts_a_new_session(tmp_path: Path) -> None:
    """With session_secret, an unsigned or wrongly signed cookie is replaced by a new signed
    session, so a client cannot choose (or guess its way into) a session id."""
    service = Service(tmp_path, session_secret="s3cret-shared-by-every-web-process")
    try:
        with clients(service, "wsgi") as make:
            client = make()
            started = _start(client, ("one.jpg", jpeg()))
            token = client.cookies[COOKIE].partition(".")[0]
            url = f"/api/batch-status/{started['batchId']}"
            for forged in (token, f"{token}.{'A' * 43}"):
                answer = make().get(url, headers={"cookie": f"{COOKIE}={forged}"})
                _error(answer, 404, "batch_not_found")
                issued = answer.headers["set-cookie"].split(";")[0].split("=", 1)[1]
                assert issued.partition(".")[0] != token
    finally:
        service.close()


def test_a_short_session_secret_is_refused(tmp_path: Path) -> None:
    """A session secret under 16 characters is a ValidationError when the app is made."""
    with pytest.raises(ValidationError, match="session_secret"):
        Service(tmp_path, session_secret="short")


def test_integrator_identity_replaces_the_cookie(tmp_path: Path) -> None:
    """With owner=..., requests without an identity get 401 and no cookie is issued."""
    service = Service(tmp_path, owner=lambda headers: headers.get("x-user"))
    try:
        with clients(service, "asgi") as make:
            client = make()
            _error(_upload(client, ("a.jpg", jpeg())), 401, "unauthorized")
            alice = {"X-User": "alice"}
            up = client.post(
                "/api/upload", files=[("files", ("a.jpg", jpeg(), "image/jpeg"))], headers=alice
            )
            assert up.status_code == 201
            assert "set-cookie" not in up.headers
            ids = [f["id"] for f in up.json()["files"]]
            bob = client.post(
                "/api/process-batch", json={"fileIds": ids}, headers={"X-User": "bob"}
            )
            _error(bob, 404, "file_not_found")
            assert (
                client.post("/api/process-batch", json={"fileIds": ids}, headers=alice).status_code
                == 202
            )
    finally:
        service.close()


def test_secure_cookies_on_request(tmp_path: Path) -> None:
    """secure_cookies=True marks the session cookie Secure."""
    service = Service(tmp_path, secure_cookies=True)
    try:
        with clients(service, "wsgi") as make:
            response = make().get("/api/batch-status/00000000-0000-4000-8000-000000000000")
            assert "Secure" in response.headers["set-cookie"]
    finally:
        service.close()


@pytest.mark.parametrize("transport", ["asgi", "wsgi"])
def test_mounted_under_a_root_path(tmp_path: Path, transport: str) -> None:
    """Mounted at /mount (root_path / SCRIPT_NAME), URLs the API gives out include it."""
    service = Service(tmp_path)
    try:
        with clients(service, transport, root_path="/mount") as make:
            client = make()
            files = _upload(client, ("a.jpg", jpeg())).json()["files"]
            started = client.post("/api/process-batch", json={"fileIds": [files[0]["id"]]})
            assert started.json()["statusUrl"].startswith("/mount/api/batch-status/")
            doc = client.get("/api/openapi.json").json()
            assert doc["servers"] == [{"url": "/mount/api"}]
    finally:
        service.close()


def test_asgi_lifespan_and_other_scopes(service: Service) -> None:
    """The ASGI app completes lifespan, closes websockets and ignores unknown scopes."""
    import asyncio

    async def drive() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

        async def receive() -> dict[str, Any]:
            return incoming.pop(0)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await service.asgi({"type": "lifespan"}, receive, send)
        await service.asgi({"type": "websocket", "path": "/"}, receive, send)
        await service.asgi({"type": "something-else"}, receive, send)
        return sent

    assert [m["type"] for m in asyncio.run(drive())] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
        "websocket.close",
    ]


def test_shells_stay_thin() -> None:
    """The ASGI and WSGI modules stay small: the API lives in batchtrack._http. (ASGI's
    budget is a little larger: it also receives bodies on the loop, awaits an async owner
    and answers status reads of a memory store there, owns its thread pool, and stops
    recovery at shutdown.)"""
    import batchtrack.asgi
    import batchtrack.wsgi

    for module, most in ((batchtrack.asgi, 230), (batchtrack.wsgi, 200)):
        assert module.__file__ is not None
        assert len(Path(module.__file__).read_text().splitlines()) < most


def test_events_stream_stops_polling_when_the_client_leaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under uvicorn, closing the events stream mid-batch stops its polling at once (on
    a store that cannot listen, so that the stream polls)."""
    import httpx

    from batchtrack._http import EventStream
    from http_support import uvicorn_server

    polls: list[float] = []
    real_poll = EventStream.poll

    def counting_poll(self: EventStream) -> Any:
        polls.append(time.monotonic())
        return real_poll(self)

    monkeypatch.setattr(EventStream, "poll", counting_poll)
    service = Service(tmp_path, store=SQLiteStore(tmp_path / "batches.db"))
    try:
        batch = service.tracker.create_batch(["a.jpg"], owner="session:" + "c" * 32)
        with uvicorn_server(service.asgi) as base:
            cookies = {"batchtrack_session": "c" * 32}
            url = f"{base}/api/batch-events/{batch.batch_id}"
            with httpx.stream("GET", url, cookies=cookies, timeout=10) as response:
                assert response.status_code == 200
                lines = response.iter_lines()  # kept: a dropped iterator closes the stream
                assert next(lines).startswith("id: 0")
                time.sleep(0.3)  # the stream keeps polling while the client listens
                assert len(polls) >= 3
            closed = time.monotonic()
            time.sleep(0.5)
            assert not [t for t in polls if t > closed + 0.2]
    finally:
        service.close()


# -- bad input: JSON nested too deeply ------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/process-batch", "/api/batch-retry/{batch}"])
def test_json_nested_30000_levels_deep_is_a_400_not_a_500(client: Client, path: str) -> None:
    """A 60 KB JSON body nested 30,000 levels deep (under the size limit) is bad JSON: 400."""
    batch = _start(client, ("a.jpg", jpeg((64, 48))))["batchId"]
    nested = b"[" * 30_000 + b"]" * 30_000
    for deep in (nested, b'{"fileIds": ' + nested + b"}", b'{"itemIds": ' + nested + b"}"):
        assert len(deep) < 64 * 1024  # under the size limit: the parser meets it
        response = client.post(
            path.format(batch=batch), content=deep, headers={"Content-Type": "application/json"}
        )
        # Refused before parsing: how deep the parser can go never decides.
        assert "nests deeper than" in _error(response, 400, "bad_json")["message"]


def test_json_depth_counts_brackets_outside_strings_only() -> None:
    """Brackets in strings (escaped quotes too) do not count; an unclosed string is linear."""
    from batchtrack._wire import MAX_JSON_DEPTH, json_depth

    assert json_depth(b'{"itemIds": ["a", "b"]}') == 2
    assert json_depth(b'["[[[[", "\\"[[[", {"a": []}]') == 3
    assert json_depth(b"[" * (MAX_JSON_DEPTH + 1)) == MAX_JSON_DEPTH + 1
    started = time.monotonic()
    assert json_depth(b'"' + b'\\"' * 30_000) == 0  # no quadratic rescans
    assert time.monotonic() - started < 1


def test_json_just_within_the_depth_limit_still_parses(client: Client) -> None:
    """Nesting up to the limit is judged on its content (here: not a list of ids)."""
    from batchtrack._wire import MAX_JSON_DEPTH

    body = b'{"fileIds": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    response = client.post(
        "/api/process-batch", content=body, headers={"Content-Type": "application/json"}
    )
    _error(response, 400, "bad_file_ids")


# -- all results as one ZIP -----------------------------------------------------------------


def test_zip_holds_every_completed_result_named_after_its_upload(
    new_client: Callable[[], Client],
) -> None:
    """The ZIP has one entry per completed item, named for the upload (made unique and
    safe), each the same bytes as that item's own download; failed items are left out."""
    import io
    import zipfile

    client = new_client()
    started = _start(
        client,
        ("photo.jpg", jpeg()),
        ("photo.jpg", jpeg(color=(0, 90, 0))),
        ("../../etc/passwd.jpg", jpeg((90, 60))),
        ("broken.jpg", b"not an image"),
    )
    final = _wait_finished(client, started["statusUrl"])
    response = client.get(f"/api/batch-results/{started['batchId']}.zip")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert response.headers["content-disposition"].startswith("attachment; filename*=UTF-8''")
    assert response.headers["cache-control"] == "no-store"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert archive.testzip() is None
        assert archive.namelist() == ["photo.jpg", "photo (2).jpg", "passwd.jpg"]
        for name, image in zip(archive.namelist(), final["images"][:3], strict=True):
            one = client.get(f"/api/batch-results/{started['batchId']}/{image['id']}")
            assert archive.read(name) == one.content
    _error(new_client().get(f"/api/batch-results/{started['batchId']}.zip"), 404)


def test_zip_errors(client: Client, service: Service) -> None:
    """400 for a bad id, 404 for an unknown batch, 409 while nothing has completed."""
    _error(client.get("/api/batch-results/nope.zip"), 400, "invalid_id")
    _error(client.get(f"/api/batch-results/{uuid.uuid4()}.zip"), 404, "batch_not_found")
    _error(client.post(f"/api/batch-results/{uuid.uuid4()}.zip"), 405)
    service.processor.gate.clear()  # the batch's items stay processing
    try:
        started = _start(client, ("a.jpg", jpeg((64, 48))))
        _error(client.get(f"/api/batch-results/{started['batchId']}.zip"), 409, "nothing_completed")
    finally:
        service.processor.gate.set()
    _wait_finished(client, started["statusUrl"])
    assert client.get(f"/api/batch-results/{started['batchId']}.zip").status_code == 200
    failed = _start(client, ("broken.jpg", b"not an image"))
    _wait_finished(client, failed["statusUrl"])
    _error(client.get(f"/api/batch-results/{failed['batchId']}.zip"), 409, "nothing_completed")


def test_zip_is_streamed_a_part_at_a_time(tmp_path: Path) -> None:
    """The archive is made as it is sent: no poll reads more than PART bytes of results, and
    a result removed meanwhile is left out of a still valid ZIP."""
    import io
    import zipfile

    from batchtrack._zip import PART, ZipStream
    from batchtrack.files import LocalFiles

    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    big.write_bytes(os.urandom(3 * PART + 123))
    small.write_bytes(b"small")
    members = [("big.jpg", "big.bin"), ("gone.jpg", "gone.bin"), ("small.jpg", "small.bin")]
    stream = ZipStream(LocalFiles(tmp_path), members)
    parts: list[list[bytes]] = []
    while (chunks := stream.poll()) is not None:
        parts.append(chunks)
    assert len(parts) >= 4
    assert max(sum(map(len, chunks)) for chunks in parts) < PART + 64 * 1024
    with zipfile.ZipFile(io.BytesIO(b"".join(b"".join(c) for c in parts))) as archive:
        assert archive.namelist() == ["big.jpg", "small.jpg"]
        # Images are compressed already: stored as they are, not deflated again.
        assert archive.getinfo("big.jpg").compress_type == zipfile.ZIP_STORED
        assert archive.read("big.jpg") == big.read_bytes()
        assert archive.read("small.jpg") == b"small"


# -- the page, as an option of create_app ---------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_page_is_off_unless_asked_for(tmp_path: Path, transport: str) -> None:
    """Without page=True, / and /favicon.ico are not the app's (JSON 404)."""
    service = Service(tmp_path)
    try:
        with clients(service, transport) as make:
            client = make()
            _error(client.get("/"), 404, "not_found")
            _error(client.get("/favicon.ico"), 404, "not_found")
    finally:
        service.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_page_and_its_icon_with_page_true(tmp_path: Path, transport: str) -> None:
    """page=True serves the page (strict CSP, the app's limits and API path in its config)
    at / and /index.html, and an icon at /favicon.ico, under ASGI and WSGI alike."""
    service = Service(tmp_path, page=True, prefix="/v1", max_files=7, max_bytes=123_456)
    try:
        with clients(service, transport) as make:
            client = make()
            for path in ("/", "/index.html"):
                page = client.get(path)
                assert page.status_code == 200
                assert page.headers["content-type"] == "text/html; charset=utf-8"
                csp = page.headers["content-security-policy"]
                assert csp.startswith("default-src 'self';")
                assert "frame-ancestors 'none'" in csp
                assert page.headers["x-content-type-options"] == "nosniff"
                config = page.text.split('id="config">')[1].split("</script>")[0]
                assert json.loads(config) == {"api": "/v1", "maxFiles": 7, "maxBytes": 123_456}
                assert "{{root}}" not in page.text
                assert "http://" not in page.text.replace("http://www.w3.org", "")
            icon = client.get("/favicon.ico")
            assert icon.status_code == 200
            assert icon.headers["content-type"] == "image/x-icon"
            assert icon.content[:4] == b"\x00\x00\x01\x00"  # an ICO file
            assert client.request("HEAD", "/").content == b""
            _error(client.post("/"), 405, "method_not_allowed")
            assert client.get("/v1/openapi.json").status_code == 200  # the API still answers
    finally:
        service.close()


@pytest.mark.parametrize("transport", ["asgi", "wsgi"])
def test_the_page_under_a_mount_point_calls_the_api_there(tmp_path: Path, transport: str) -> None:
    """Mounted at /mount, the page's API path and icon carry the mount point."""
    service = Service(tmp_path, page=True)
    try:
        with clients(service, transport, root_path="/mount") as make:
            page = make().get("/")
            assert '"api": "/mount/api"' in page.text
            assert 'href="/mount/favicon.ico"' in page.text
    finally:
        service.close()


# -- on_progress ----------------------------------------------------------------------------


def test_on_progress_gets_every_event_of_batches_started_and_retried_over_http(
    tmp_path: Path,
) -> None:
    """Every transition of a batch started (then retried) through the app reaches the
    callback, from the orchestrator's event thread, never from a request's thread."""
    import threading

    events: list[Any] = []
    threads: set[str] = set()

    def on_progress(event: Any) -> None:
        events.append(event)
        threads.add(threading.current_thread().name)

    service = Service(tmp_path, on_progress=on_progress)
    try:
        with clients(service, "uvicorn") as make:
            client = make()
            service.switch.touch()
            started = _start(client, ("a.jpg", jpeg((64, 48))), ("b.jpg", flaky_jpeg()))
            _wait_finished(client, started["statusUrl"])
            service.orchestrator.wait(started["batchId"], 10)
            finals = [e for e in events if e.item.status.is_final]
            assert sorted(e.progress.completed + e.progress.failed for e in finals) == [1, 2]
            assert {e.batch_id for e in events} == {started["batchId"]}
            service.switch.unlink()
            retried = client.post(f"/api/batch-retry/{started['batchId']}")
            assert retried.status_code == 202
            _wait_finished(client, started["statusUrl"])
            service.orchestrator.wait(started["batchId"], 10)
    finally:
        service.close()
    assert [e.item.status.value for e in events[len(finals) * 2 :]] == ["processing", "completed"]
    assert events[-1].progress.completed == 2
    assert threads == {"batchtrack-events"}


def test_an_on_progress_that_raises_is_logged_and_the_batch_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A callback that raises never fails a request or an item: it is logged."""

    def on_progress(event: Any) -> None:
        raise RuntimeError("the integrator's bug")

    service = Service(tmp_path, on_progress=on_progress)
    try:
        with clients(service, "asgi") as make:
            client = make()
            started = _start(client, ("a.jpg", jpeg((64, 48))))
            final = _wait_finished(client, started["statusUrl"])
            service.orchestrator.wait(started["batchId"], 10)
    finally:
        service.close()
    assert final["status"] == "completed"
    assert "on_progress callback raised" in caplog.text
    assert "the integrator's bug" in caplog.text


@pytest.mark.parametrize("module", ["asgi", "wsgi"])
def test_on_progress_needs_a_runner_that_can_call_it(tmp_path: Path, module: str) -> None:
    """A runner whose submit/resume take no on_progress (its items run elsewhere), or a
    callback that is not callable, is a ValidationError when the app is made."""
    import importlib

    from batchtrack import ValidationError
    from batchtrack.uploads import UploadStore

    create_app = importlib.import_module(f"batchtrack.{module}").create_app
    tracker = BatchTracker()
    runner = RecordingRunner(tracker, None)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"RecordingRunner\.submit does not"):
        create_app(tracker, runner, UploadStore(tmp_path), on_progress=print)
    service = Service(tmp_path / "s")
    try:
        with pytest.raises(ValidationError, match="on_progress must be callable"):
            create_app(tracker, service.orchestrator, service.uploads, on_progress=42)
    finally:
        service.close()


def test_docstrings_say_what_they_mean_without_a_contract() -> None:
    """The rendered API docs never send a reader to a contract they cannot see."""
    import batchtrack._control
    import batchtrack._http
    import batchtrack.asgi
    import batchtrack.wsgi

    for documented in (
        batchtrack.asgi,
        batchtrack.wsgi,
        batchtrack._http,
        batchtrack._control,
        batchtrack.asgi.create_app,
        batchtrack.wsgi.create_app,
        batchtrack._http.Api,
    ):
        doc = documented.__doc__ or ""
        assert "contract" not in doc.lower(), documented
        assert "§" not in doc, documented
    assert "page" in (batchtrack.asgi.create_app.__doc__ or "")
    assert "on_progress" in (batchtrack.asgi.create_app.__doc__ or "")


def test_the_status_body_says_why_there_is_no_eta_even_after_a_304(tmp_path: Path) -> None:
    """A poll after a lost worker's lease ran out gets a new ETag and a body whose null
    ETA carries "etaUnavailable": "waiting_for_lost_items", not a 304 or the cached "1 s"."""
    import httpx

    from batchtrack.testing import FakeClock
    from batchtrack.uploads import UploadStore

    clock = FakeClock()
    tracker = BatchTracker(clock=clock, lease=30.0)
    runner = RecordingRunner(tracker, None)  # type: ignore[arg-type]
    app = wsgi_module.create_app(
        tracker, runner, UploadStore(tmp_path / "uploads"), owner=lambda headers: "me"
    )
    snap = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")], owner="me")
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as client:
        url = f"/api/batch-status/{snap.batch_id}"
        assert client.get(url).json()["etaUnavailable"] == "starting"
        tracker.start_item(snap.batch_id, "a")  # its worker is killed (-9)
        tracker.start_item(snap.batch_id, "b")
        clock.advance(2.0)
        tracker.complete_item(snap.batch_id, "b")
        running = client.get(url)
        assert running.json()["estimatedTimeRemaining"] >= 1
        assert "etaUnavailable" not in running.json()
        clock.advance(30.0)  # the lease of "a" runs out; no item changed
        lost = client.get(url, headers={"If-None-Match": running.headers["etag"]})
        assert lost.status_code == 200
        assert lost.json()["estimatedTimeRemaining"] is None
        assert lost.json()["estimatedTimeRemainingRange"] is None
        assert lost.json()["etaUnavailable"] == "waiting_for_lost_items"
