"""HTTP edges: store outages, other sites' requests, cookies over HTTPS, odd names, options."""

from __future__ import annotations

import logging
import os
import signal
import sys
import types
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("python_multipart")
from batchtrack import MemoryStore, StoreError, ValidationError, _wire
from batchtrack import asgi as asgi_module
from batchtrack import wsgi as wsgi_module
from batchtrack._zip import _member_name
from conftest import start_redis
from http_support import (
    RecordingRunner,
    Service,
    SyncASGIClient,
    clients,
    jpeg,
    uvicorn_server,
    wsgiref_server,
)

NO_BATCH = "00000000-0000-4000-8000-000000000000"


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return dict(body["error"])


# -- store outages --------------------------------------------------------------------


@pytest.fixture
def redis_service(tmp_path: Path) -> Iterator[tuple[Service, Any, int]]:
    """A service over a real, persistent redis-server: (service, its process, its port)."""
    pytest.importorskip("redis")
    from batchtrack.stores.redis import RedisStore

    proc, port = start_redis(tmp_path, persistent=True)
    svc = Service(tmp_path, store=RedisStore(f"redis://127.0.0.1:{port}/0"))
    box = [proc]
    try:
        yield svc, box, port
    finally:
        svc.close()
        box[0].terminate()
        box[0].wait(10)


def _kill(box: list[Any]) -> None:
    os.kill(box[0].pid, signal.SIGKILL)
    box[0].wait(10)


def _outage_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "reachable" in r.getMessage()]


def test_a_redis_outage_is_logged_once_and_its_end_once(
    redis_service: tuple[Service, list[Any], int],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With redis-server killed, every request answers 503 but one warning is logged; the
    first request served after its restart logs one "reachable again" line."""
    service, box, port = redis_service
    caplog.set_level(logging.INFO, logger="batchtrack")
    with clients(service, "wsgi") as make:
        client = make()
        client.get(f"/api/batch-status/{NO_BATCH}")  # a session
        snap = service.tracker.create_batch(["a.jpg"], owner=_session(client))
        url = f"/api/batch-status/{snap.batch_id}"
        assert client.get(url).status_code == 200
        _kill(box)
        for _ in range(5):
            _error(client.get(url), 503, "store_unavailable")
        lines = _outage_lines(caplog)
        assert len(lines) == 1
        assert lines[0].startswith("batchtrack: store unreachable: ")
        assert not [r for r in caplog.records if r.exc_info]
        box[0], _ = start_redis(tmp_path, persistent=True, port=port)
        assert client.get(url).status_code == 200
        assert client.get(url).status_code == 200
    lines = _outage_lines(caplog)
    assert len(lines) == 2
    assert lines[1].startswith("batchtrack: store reachable again after ")


def _session(client: Any) -> str:
    """The owner id of a client's session cookie."""
    return f"session:{client.cookies['batchtrack_session']}"


@pytest.mark.parametrize("transport", ["uvicorn", "wsgiref"])
def test_an_events_stream_ends_with_retry_when_redis_goes_away(
    redis_service: tuple[Service, list[Any], int],
    transport: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An open event stream whose Redis is killed sends a `retry:` field and an
    `unavailable` event, then ends cleanly: no traceback, one log line."""
    service, box, _ = redis_service
    caplog.set_level(logging.INFO, logger="batchtrack")
    server = (
        uvicorn_server(service.asgi) if transport == "uvicorn" else wsgiref_server(service.wsgi)
    )
    with server as base, httpx.Client(base_url=base, timeout=10) as client:
        client.get(f"/api/batch-status/{NO_BATCH}")
        snap = service.tracker.create_batch(["a.jpg"], owner=_session(client))
        lines: list[str] = []
        with client.stream(
            "GET",
            f"/api/batch-events/{snap.batch_id}",
            headers={"Accept": "text/event-stream"},
        ) as stream:
            assert stream.status_code == 200
            for line in stream.iter_lines():
                lines.append(line)
                if line.startswith("data:") and len(lines) < 4:
                    _kill(box)
        # iter_lines ended: the server closed the response, with no error
    assert lines[:3] == [f"id: {snap.version}", lines[1], "retry: 5000"]
    tail = lines[lines.index("event: unavailable") - 1 :]
    assert tail[0] == "retry: 5000"
    assert '"store_unavailable"' in tail[2]
    assert not [r for r in caplog.records if r.exc_info]
    assert len(_outage_lines(caplog)) == 1


def test_an_events_stream_starts_with_retry(service: Service) -> None:
    """The first event of a stream carries `retry:`, the delay a browser waits before it
    reconnects."""
    with clients(service, "wsgi") as make:
        client = make()
        client.get(f"/api/batch-status/{NO_BATCH}")
        snap = service.tracker.create_batch(["a.jpg"], owner=_session(client))
        service.tracker.start_item(snap.batch_id, snap.items[0].id)
        service.tracker.complete_item(snap.batch_id, snap.items[0].id)
        text = client.get(f"/api/batch-events/{snap.batch_id}").text
    first = text.split("\n\n")[0].splitlines()
    assert [line.split(":")[0] for line in first] == ["id", "data", "retry"]
    assert first[2] == "retry: 5000"
    assert text.count("retry:") == 1


class _DownStore(MemoryStore):
    """A memory store whose reads fail while ``down`` is set."""

    down = False

    def load(self, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            raise StoreError("the store is down")
        return super().load(*args, **kwargs)


@pytest.mark.parametrize("transport", ["asgi", "wsgi"])
def test_an_events_stream_asked_for_in_an_outage_says_come_back(
    tmp_path: Path, transport: str
) -> None:
    """An EventSource (Accept: text/event-stream) opening a stream while the store is down
    gets a stream telling it when to reconnect, not a 503 it would give up on; other
    clients get the 503."""
    store = _DownStore()
    service = Service(tmp_path, store=store)
    try:
        with clients(service, transport) as make:
            client = make()
            client.get(f"/api/batch-status/{NO_BATCH}")
            snap = service.tracker.create_batch(["a.jpg"], owner=_session(client))
            store.down = True
            url = f"/api/batch-events/{snap.batch_id}"
            sse = client.get(url, headers={"Accept": "text/event-stream"})
            assert sse.status_code == 200
            assert sse.headers["content-type"] == "text/event-stream"
            assert sse.text.startswith("retry: 5000\nevent: unavailable\ndata: {")
            _error(client.get(url), 503, "store_unavailable")
    finally:
        service.close()


def test_failures_at_once_in_many_threads_log_one_line_per_app(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Status requests failing at once in 8 threads log one "store unreachable" line per
    app (the ASGI and the WSGI app each keep their own), then one "reachable again" each."""
    store = _DownStore()
    service = Service(tmp_path, store=store, runner=RecordingRunner, owner=lambda h: "alice")
    caplog.set_level(logging.INFO, logger="batchtrack")
    asgi = SyncASGIClient(service.asgi)
    try:
        with clients(service, "wsgi") as make:
            pairs = [(make(), asgi) for _ in range(8)]  # SyncASGIClient is thread-safe
            snap = service.tracker.create_batch(["a.jpg"], owner="alice")
            url = f"/api/batch-status/{snap.batch_id}"
            store.down = True

            def fail(pair: tuple[Any, Any]) -> list[int]:
                return [c.get(url).status_code for _ in range(5) for c in pair]

            with ThreadPoolExecutor(8) as pool:
                codes = [c for got in pool.map(fail, pairs) for c in got]
            assert set(codes) == {503}
            assert len([m for m in _outage_lines(caplog) if "unreachable" in m]) == 2
            store.down = False
            for client in pairs[0]:
                assert client.get(url).status_code == 200
                assert client.get(url).status_code == 200  # logs nothing more
    finally:
        asgi.close()
        service.close()
    lines = _outage_lines(caplog)
    assert len(lines) == 4
    assert len([m for m in lines if "reachable again after" in m]) == 2


def test_a_full_disk_while_spooling_an_upload_answers_507(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An upload body spooled to a disk with no room left (ENOSPC, from /dev/full) answers
    507 storage_full, logged once without a traceback, and keeps nothing."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    dummy = tmp_path / "dummy.part"

    def mkstemp(dir: Any = None, prefix: Any = None, suffix: Any = None) -> tuple[int, str]:
        dummy.touch()
        return os.open("/dev/full", os.O_RDWR), str(dummy)

    # The spool's temporary file is /dev/full: every write finds the disk full.
    monkeypatch.setattr(_wire, "tempfile", types.SimpleNamespace(mkstemp=mkstemp))
    caplog.set_level(logging.INFO, logger="batchtrack")
    service = Service(tmp_path, max_bytes=2_000_000)
    client = SyncASGIClient(service.asgi)
    try:
        big = os.urandom(600_000)  # past what the spool keeps in memory
        for _ in range(2):
            response = client.post("/api/upload", files=[("files", ("a.jpg", big, "image/jpeg"))])
            _error(response, 507, "storage_full")
    finally:
        client.close()
        service.close()
    assert not list((tmp_path / "uploads").glob("*.jpg"))
    assert not [r for r in caplog.records if r.exc_info]
    assert len([r for r in caplog.records if "storage full" in r.getMessage()]) == 1


# -- other sites' requests ------------------------------------------------------------


def _state_changes(client: Any) -> dict[str, Any]:
    """Each state-changing request, as a callable taking extra headers."""
    up = client.post("/api/upload", files=[("files", ("a.jpg", jpeg((40, 30)), "image/jpeg"))])
    file_id = up.json()["files"][0]["id"]
    started = client.post("/api/process-batch", json={"fileIds": [file_id]})
    batch = started.json()["batchId"]
    files = [("files", ("b.jpg", jpeg((40, 30)), "image/jpeg"))]
    return {
        "upload": lambda h: client.post("/api/upload", files=files, headers=h),
        "process-batch": lambda h: client.post(
            "/api/process-batch", json={"fileIds": [file_id]}, headers=h
        ),
        "batch-cancel": lambda h: client.post(f"/api/batch-cancel/{batch}", headers=h),
        "batch-retry": lambda h: client.post(f"/api/batch-retry/{batch}", headers=h),
    }


OTHER_SITES = [
    {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
    {"Sec-Fetch-Site": "same-site", "Origin": "http://other.testserver"},
    {"Origin": "https://evil.example"},  # a browser without Sec-Fetch-Site
    {"Origin": "null"},  # a sandboxed frame, a data: URL
]


@pytest.mark.parametrize("transport", ["asgi", "wsgi"])
@pytest.mark.parametrize("headers", OTHER_SITES, ids=lambda h: "/".join(h.values()))
def test_state_changing_requests_from_another_site_are_refused(
    tmp_path: Path, transport: str, headers: dict[str, str]
) -> None:
    """Upload, process-batch, cancel and retry sent by another site's page, with the
    victim's cookie, answer 403 cross_origin and change nothing."""
    service = Service(tmp_path, runner=RecordingRunner)
    try:
        with clients(service, transport) as make:
            client = make()
            calls = _state_changes(client)
            before = sorted(tmp_path.glob("**/*"))
            for name, call in calls.items():
                error = _error(call(headers), 403, "cross_origin")
                assert "another site" in error["message"], name
            assert sorted(tmp_path.glob("**/*")) == before
            assert [c for c, _ in service.runner.calls] == ["submit"]
    finally:
        service.close()


@pytest.mark.parametrize(
    "headers",
    [
        {},  # curl, a server-side client
        {"Sec-Fetch-Site": "same-origin", "Origin": "http://testserver"},
        {"Sec-Fetch-Site": "none"},  # typed in by the user
        {"Origin": "http://testserver"},  # a browser without Sec-Fetch-Site
        {"Origin": "http://TestServer:80"},  # the default port, any case
        # A proxy rewrote Host; the browser's own word says same-origin.
        {"Sec-Fetch-Site": "same-origin", "Origin": "https://app.example"},
    ],
    ids=lambda h: "/".join(h.values()) or "no-headers",
)
def test_state_changing_requests_from_the_same_origin_pass(
    service: Service, headers: dict[str, str]
) -> None:
    """The app's own pages, and clients that are no browser, may change state."""
    with clients(service, "wsgi") as make:
        calls = _state_changes(make())
        assert calls["upload"](headers).status_code == 201
        assert calls["batch-cancel"](headers).status_code == 200


@pytest.mark.parametrize("transport", ["asgi", "wsgi"])
def test_an_https_origin_is_checked_against_the_https_scheme(
    service: Service, transport: str
) -> None:
    """Over HTTPS (ASGI scope scheme, wsgi.url_scheme) the request's own origin is
    https://host; the same host over http is another origin."""
    client = _https_client(service, transport)
    try:
        calls = _state_changes(client)
        assert calls["batch-cancel"]({"Origin": "https://testserver"}).status_code == 200
        _error(calls["batch-cancel"]({"Origin": "http://testserver"}), 403, "cross_origin")
    finally:
        client.close()


def test_trusted_origins_may_send_state_changing_requests(tmp_path: Path) -> None:
    """An origin in trusted_origins passes (a proxy rewriting Host, a sibling site of the
    deployment); others are still refused."""
    service = Service(tmp_path, trusted_origins=["https://app.example/", "http://b.example:8080"])
    try:
        with clients(service, "wsgi") as make:
            calls = _state_changes(make())
            assert calls["batch-cancel"]({"Origin": "https://APP.example:443"}).status_code == 200
            cross = {"Sec-Fetch-Site": "cross-site", "Origin": "http://b.example:8080"}
            assert calls["batch-cancel"](cross).status_code == 200
            _error(calls["batch-cancel"]({"Origin": "http://b.example"}), 403, "cross_origin")
    finally:
        service.close()


def test_apps_with_an_owner_callable_do_not_check_origins(tmp_path: Path) -> None:
    """With owner= the deployment's own identity decides: no origin check."""
    service = Service(tmp_path, owner=lambda headers: headers.get("x-user"))
    try:
        with clients(service, "wsgi") as make:
            client = make()
            headers = {"X-User": "alice", "Sec-Fetch-Site": "cross-site", "Origin": "https://x.io"}
            files = [("files", ("a.jpg", jpeg((40, 30)), "image/jpeg"))]
            assert client.post("/api/upload", files=files, headers=headers).status_code == 201
    finally:
        service.close()


@pytest.mark.parametrize(
    "value", ["https://a.example", ["a.example"], ["https://a.example/path"], ["ftp://a"], [3]]
)
def test_bad_trusted_origins_are_rejected(service: Service, value: Any) -> None:
    """trusted_origins must be a list of scheme://host[:port] origins."""
    with pytest.raises(ValidationError, match="trusted_origins"):
        asgi_module.create_app(
            service.tracker, service.runner, service.uploads, trusted_origins=value
        )


def test_the_openapi_document_lists_403_for_state_changing_routes(service: Service) -> None:
    """Upload, process-batch, cancel and retry document their 403 cross_origin."""
    with clients(service, "wsgi") as make:
        paths = make().get("/api/openapi.json").json()["paths"]
    for path in ("/upload", "/process-batch", "/batch-cancel/{batchId}", "/batch-retry/{batchId}"):
        assert "403" in paths[path]["post"]["responses"], path
    assert "403" not in paths["/batch-status/{batchId}"]["get"]["responses"]


# -- cookies over HTTPS ---------------------------------------------------------------


def _https_client(service: Service, transport: str) -> Any:
    """A client of the in-process app as if it were reached over HTTPS."""
    if transport == "asgi":
        client = SyncASGIClient(service.asgi)
        client._client.base_url = httpx.URL("https://testserver")
        return client
    return httpx.Client(
        transport=httpx.WSGITransport(app=service.wsgi), base_url="https://testserver"
    )


@pytest.mark.parametrize("transport", ["asgi", "wsgi"])
def test_the_session_cookie_is_secure_over_https(service: Service, transport: str) -> None:
    """A request that came over HTTPS gets a Secure session cookie without
    secure_cookies=True; one over plain HTTP does not."""
    client = _https_client(service, transport)
    try:
        cookie = client.get(f"/api/batch-status/{NO_BATCH}").headers["set-cookie"]
    finally:
        client.close()
    assert "; Secure" in cookie
    with clients(service, transport) as make:
        plain = make().get(f"/api/batch-status/{NO_BATCH}").headers["set-cookie"]
    assert "Secure" not in plain


# -- smaller edges --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("CON.jpg", "CON_.jpg"),
        ("NUL.jpg", "NUL_.jpg"),
        ("com1.png", "com1_.jpg"),
        ("LPT9.txt", "LPT9_.jpg"),
        ("aux.tar.gz", "aux_.tar.jpg"),
        ("prn .jpg", "prn_.jpg"),
        ("photo. .jpg", "photo.jpg"),
        ("...", "image.jpg"),
        ("CONSOLE.jpg", "CONSOLE.jpg"),
        ("com10.jpg", "com10.jpg"),
    ],
)
def test_zip_entry_names_are_never_windows_device_names(filename: str, expected: str) -> None:
    """Device names (CON, NUL, COM1, LPT9... whatever the extension) get a `_`, and no
    name ends in a dot or a space."""
    assert _member_name(filename, ".jpg", set()) == expected


def test_renamed_zip_entries_do_not_collide() -> None:
    """`CON.jpg` renamed `CON_.jpg` does not take the name of an upload called so."""
    taken: set[str] = set()
    names = [_member_name(n, ".jpg", taken) for n in ("CON_.jpg", "con.jpg", "CON.jpg")]
    assert names == ["CON_.jpg", "con_ (2).jpg", "CON_ (3).jpg"]


def test_a_zip_of_device_named_uploads_has_safe_names(tmp_path: Path) -> None:
    """The results ZIP of uploads named CON.jpg and nul.jpg holds CON_.jpg and nul_.jpg."""
    service = Service(tmp_path, runner=RecordingRunner)
    try:
        with clients(service, "wsgi") as make:
            client = make()
            files = [("files", (n, jpeg((40, 30)), "image/jpeg")) for n in ("CON.jpg", "nul.jpg")]
            ids = [f["id"] for f in client.post("/api/upload", files=files).json()["files"]]
            batch = client.post("/api/process-batch", json={"fileIds": ids}).json()["batchId"]
            service.runner.run(batch)
            archive = client.get(f"/api/batch-results/{batch}.zip")
        names = zipfile.ZipFile(_as_file(tmp_path, archive.content)).namelist()
    finally:
        service.close()
    assert sorted(names) == ["CON_.jpg", "nul_.jpg"]


def _as_file(folder: Path, data: bytes) -> Path:
    path = folder / "results.zip"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("module", [asgi_module, wsgi_module])
def test_create_app_without_python_multipart_is_refused(
    service: Service, module: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without python-multipart, create_app raises an ImportError naming the server extra
    instead of making an app whose uploads answer 500."""
    monkeypatch.setitem(sys.modules, "python_multipart.multipart", None)
    monkeypatch.delitem(sys.modules, "batchtrack._multipart", raising=False)
    with pytest.raises(ImportError, match=r"batchtrack\[server\]") as caught:
        module.create_app(service.tracker, service.runner, service.uploads)
    assert "create_app" in str(caught.value)


@pytest.mark.parametrize("module", [asgi_module, wsgi_module])
def test_a_misspelt_create_app_option_names_the_closest(service: Service, module: Any) -> None:
    """create_app(max_file=5) is a TypeError of create_app suggesting max_files, not one
    of an internal class."""
    with pytest.raises(TypeError) as caught:
        module.create_app(service.tracker, service.runner, service.uploads, max_file=5)
    message = str(caught.value)
    assert message.startswith("create_app() got an unexpected keyword argument 'max_file'")
    assert "did you mean 'max_files'?" in message
    assert "Api" not in message


def test_an_unknown_create_app_option_lists_the_accepted_ones(service: Service) -> None:
    """An option nothing like any accepted one gets the list of accepted options."""
    with pytest.raises(TypeError, match="it takes body_timeout, client_key, events_poll"):
        wsgi_module.create_app(service.tracker, service.runner, service.uploads, zzz=1)
