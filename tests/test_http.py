"""The HTTP API, one behaviour suite over ASGI and WSGI, in process and under real servers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("python_multipart")
from http_support import TRANSPORTS, Service, clients, jpeg

Client = Any


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = Service(tmp_path)
    yield svc
    svc.close()


@pytest.fixture(params=TRANSPORTS)
def new_client(request: pytest.FixtureRequest, service: Service) -> Iterator[Callable[[], Client]]:
    """A factory of clients for each transport; each client has its own cookie jar."""
    with clients(service, request.param) as make:
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
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(url).json()
        if body["status"] in ("completed", "failed"):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


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
    _error(client.get("/api/nothing-here"), 404, "not_found")
    _error(client.get("/elsewhere"), 404, "not_found")


# -- the OpenAPI document -------------------------------------------------------------------


def test_openapi_document_describes_the_real_responses(client: Client) -> None:
    """Real responses validate against the schemas the document gives for them."""
    jsonschema = pytest.importorskip("jsonschema")
    doc = client.get("/api/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {
        "/upload",
        "/process-batch",
        "/batch-status/{batchId}",
        "/batch-events/{batchId}",
        "/batch-results/{batchId}/{itemId}",
        "/openapi.json",
    }
    schemas = doc["components"]["schemas"]

    def check(instance: Any, name: str) -> None:
        jsonschema.validate(
            instance, {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
        )

    up = _upload(client, ("a.jpg", jpeg()), ("b.txt", b"x"))
    check(up.json(), "Uploaded")
    started = client.post(
        "/api/process-batch", json={"fileIds": [f["id"] for f in up.json()["files"]]}
    )
    check(started.json(), "Started")
    check(_wait_finished(client, started.json()["statusUrl"]), "BatchStatus")
    check(client.get("/api/batch-status/nope").json(), "Error")
    assert "BatchStatus" in schemas


# -- ownership and mounting -----------------------------------------------------------------


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
    """The ASGI and WSGI modules stay well under 200 lines each."""
    import batchtrack.asgi
    import batchtrack.wsgi

    for module in (batchtrack.asgi, batchtrack.wsgi):
        assert module.__file__ is not None
        assert len(Path(module.__file__).read_text().splitlines()) < 200


def test_events_stream_stops_polling_when_the_client_leaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under uvicorn, closing the events stream mid-batch stops its polling at once."""
    import httpx

    from batchtrack._http import EventStream
    from http_support import uvicorn_server

    polls: list[float] = []
    real_poll = EventStream.poll

    def counting_poll(self: EventStream) -> Any:
        polls.append(time.monotonic())
        return real_poll(self)

    monkeypatch.setattr(EventStream, "poll", counting_poll)
    service = Service(tmp_path)
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
