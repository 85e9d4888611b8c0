"""Upload quotas: a cap on the upload folder (507) and a per-client byte rate (429)."""

from __future__ import annotations

import errno
import io
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest

pytest.importorskip("python_multipart")
from batchtrack import ValidationError
from batchtrack import asgi as asgi_module
from batchtrack import wsgi as wsgi_module
from batchtrack.uploads import QuotaExceeded, StorageFull, UploadQuota, UploadStore
from http_support import TRANSPORTS, Service, SyncASGIClient, clients
from test_cli import start_serve, stop_serve

Client = Any
KIB = 1024


class Clock:
    """A clock that tests move by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class DiskUsage(NamedTuple):
    total: int
    used: int
    free: int


def _entries(directory: Path) -> list[str]:
    """Every name in the folder, partial and hidden files included."""
    return sorted(p.name for p in directory.iterdir())


def _store(tmp_path: Path, **options: Any) -> UploadStore:
    return UploadStore(tmp_path / "uploads", **{"min_free_bytes": 0, **options})


# -- the store's total cap ------------------------------------------------------------------


def test_an_upload_over_the_total_cap_is_storage_full_and_leaves_no_partial_file(
    tmp_path: Path,
) -> None:
    """A file that would take the folder past max_total_bytes raises StorageFull and is gone."""
    store = _store(tmp_path, max_total_bytes=1000)
    kept = store.save("a.jpg", io.BytesIO(b"a" * 600))
    with pytest.raises(StorageFull) as caught:
        store.save("b.jpg", io.BytesIO(b"b" * 600))
    assert caught.value.reason == "total"
    assert "1,000 bytes" in str(caught.value)
    assert _entries(store.directory) == sorted([kept.id, f"{kept.id}.json"])
    assert store.used_bytes == 600


def test_the_cap_counts_bytes_so_a_file_that_fits_is_kept(tmp_path: Path) -> None:
    """Files that together reach the cap exactly are all kept."""
    store = _store(tmp_path, max_total_bytes=1000)
    store.save("a.jpg", io.BytesIO(b"a" * 600))
    store.save("b.jpg", io.BytesIO(b"b" * 400))
    assert store.used_bytes == 1000


def test_a_full_store_refuses_before_a_file_begins(tmp_path: Path) -> None:
    """With the cap reached, begin() raises StorageFull and creates no file."""
    store = _store(tmp_path, max_total_bytes=100)
    store.save("a.jpg", io.BytesIO(b"a" * 100))
    before = _entries(store.directory)
    with pytest.raises(StorageFull):
        store.begin("b.jpg")
    assert _entries(store.directory) == before


def test_an_aborted_upload_gives_its_room_back(tmp_path: Path) -> None:
    """Bytes of an upload being received count, and stop counting once it is aborted."""
    store = _store(tmp_path, max_total_bytes=1000)
    writer = store.begin("a.jpg")
    writer.write(b"a" * 700)
    assert store.used_bytes == 700
    with pytest.raises(StorageFull):
        store.save("b.jpg", io.BytesIO(b"b" * 400))
    writer.abort()
    assert store.used_bytes == 0
    store.save("b.jpg", io.BytesIO(b"b" * 1000))


def test_an_expired_upload_stops_counting_and_is_deleted(tmp_path: Path) -> None:
    """Once an upload expires, its bytes leave the total and the next upload deletes it."""
    clock = Clock()
    store = _store(tmp_path, max_total_bytes=1000, ttl=60, clock=clock)
    old = store.save("old.jpg", io.BytesIO(b"o" * 800))
    clock.now += 30
    young = store.save("young.jpg", io.BytesIO(b"y" * 200))
    clock.now += 30  # the old one is now exactly ttl old
    assert store.used_bytes == 200
    new = store.save("new.jpg", io.BytesIO(b"n" * 800))
    assert _entries(store.directory) == sorted(
        [young.id, f"{young.id}.json", new.id, f"{new.id}.json"]
    )
    assert not old.path.exists()


def test_cleanup_takes_expired_uploads_out_of_the_total(tmp_path: Path) -> None:
    """cleanup() removes expired uploads and the running total follows."""
    clock = Clock()
    store = _store(tmp_path, max_total_bytes=1000, ttl=60, clock=clock)
    store.save("a.jpg", io.BytesIO(b"a" * 1000))
    clock.now += 61
    assert store.cleanup() == 1
    assert store.used_bytes == 0
    assert _entries(store.directory) == []


def test_delete_gives_the_bytes_back(tmp_path: Path) -> None:
    """delete() removes an upload and its bytes from the total; a second delete is False."""
    store = _store(tmp_path, max_total_bytes=1000)
    stored = store.save("a.jpg", io.BytesIO(b"a" * 1000))
    assert store.delete(stored.id) is True
    assert store.used_bytes == 0
    assert store.delete(stored.id) is False
    assert _entries(store.directory) == []


def test_a_new_store_counts_what_the_folder_already_holds(tmp_path: Path) -> None:
    """A store opened on a folder counts its unexpired uploads, not the expired ones."""
    clock = Clock()
    first = _store(tmp_path, ttl=60, clock=clock)
    first.save("old.jpg", io.BytesIO(b"o" * 500))
    clock.now += 40
    first.save("new.jpg", io.BytesIO(b"n" * 300))
    clock.now += 30
    again = _store(tmp_path, max_total_bytes=1000, ttl=60, clock=clock)
    assert again.used_bytes == 300


def test_cleanup_recounts_what_other_processes_stored(tmp_path: Path) -> None:
    """Two stores on one folder keep their own totals; cleanup() brings in the other's files."""
    mine = _store(tmp_path, max_total_bytes=1000)
    theirs = _store(tmp_path, max_total_bytes=1000)
    theirs.save("theirs.jpg", io.BytesIO(b"t" * 700))
    assert mine.used_bytes == 0
    mine.cleanup()
    assert mine.used_bytes == 700
    with pytest.raises(StorageFull):
        mine.save("mine.jpg", io.BytesIO(b"m" * 400))
    theirs.delete(next(p.stem for p in mine.directory.glob("*.json")))
    mine.cleanup()
    assert mine.used_bytes == 0


def test_threads_together_never_go_over_the_cap(tmp_path: Path) -> None:
    """Twenty threads each saving 100 bytes into a 1,000-byte store: exactly ten succeed."""
    store = _store(tmp_path, max_total_bytes=1000)
    outcomes: list[str] = []
    start = threading.Barrier(20)

    def upload() -> None:
        start.wait()
        try:
            store.save("x.jpg", io.BytesIO(b"x" * 100))
        except StorageFull:
            outcomes.append("full")
        else:
            outcomes.append("kept")

    threads = [threading.Thread(target=upload) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert outcomes.count("kept") == 10
    assert store.used_bytes == 1000
    assert len(list(store.directory.glob("*.json"))) == 10
    assert list(store.directory.glob(".*.part")) == []


# -- the disk's free space ------------------------------------------------------------------


def test_a_nearly_full_disk_refuses_an_upload_before_it_begins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With less than min_free_bytes free, begin() raises StorageFull and writes nothing."""
    store = _store(tmp_path, min_free_bytes=50 * 2**20)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(2**40, 2**40, 49 * 2**20))
    with pytest.raises(StorageFull) as caught:
        store.begin("a.jpg")
    assert caught.value.reason == "disk"
    assert _entries(store.directory) == []


def test_a_disk_filling_up_while_writing_drops_the_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Free space is asked again while a file streams; running low drops the whole file."""
    store = _store(tmp_path, min_free_bytes=50 * 2**20)
    free = [60 * 2**20]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(2**40, 0, free[0]))
    writer = store.begin("a.jpg")
    writer.write(b"a" * (512 * KIB))
    free[0] = 50 * 2**20  # another program filled the disk meanwhile
    with pytest.raises(StorageFull):
        writer.write(b"a" * (512 * KIB))  # the second 512 KiB: free space is asked again
    assert _entries(store.directory) == []
    assert store.used_bytes == 0


def test_a_disk_that_runs_out_mid_write_is_storage_full(tmp_path: Path) -> None:
    """An ENOSPC from the file system is StorageFull too, and the partial file is gone."""

    class FullDisk(io.BytesIO):
        def write(self, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    store = _store(tmp_path)
    writer = store.begin("a.jpg")
    real = writer._out._file  # the local storage's temporary file
    real.close()
    writer._out._file = FullDisk()
    with pytest.raises(StorageFull):
        writer.write(b"a" * 10)
    assert _entries(store.directory) == []
    assert store.used_bytes == 0


@pytest.mark.parametrize(
    "options",
    [
        {"max_total_bytes": 0},
        {"max_total_bytes": -1},
        {"max_total_bytes": 1.5},
        {"max_total_bytes": True},
        {"max_total_bytes": "1G"},
        {"min_free_bytes": -1},
        {"min_free_bytes": None},
        {"min_free_bytes": False},
    ],
)
def test_upload_store_rejects_bad_limits(tmp_path: Path, options: dict[str, Any]) -> None:
    """A cap that is not a whole number of bytes (>= 1, or >= 0 for free space) is refused."""
    with pytest.raises(ValidationError):
        UploadStore(tmp_path / "uploads", **options)


# -- the per-client quota -------------------------------------------------------------------


def test_a_client_over_its_quota_is_told_when_to_come_back() -> None:
    """Past max_bytes in the window, reserve raises QuotaExceeded with a wait in seconds."""
    clock = Clock(0.0)
    quota = UploadQuota(1000, 60, clock=clock)
    quota.reserve("a", 800)
    quota.release("a", 800, kept=True)
    clock.now = 10.0
    with pytest.raises(QuotaExceeded) as caught:
        quota.reserve("a", 300)
    assert caught.value.retry_after == 50  # when the bytes of t=0 leave the window
    assert caught.value.limit == 1000


def test_bytes_leave_the_window_and_make_room_again() -> None:
    """Bytes stored a whole window ago no longer count."""
    clock = Clock(0.0)
    quota = UploadQuota(1000, 60, clock=clock)
    quota.reserve("a", 1000)
    quota.release("a", 1000, kept=True)
    clock.now = 59.9
    with pytest.raises(QuotaExceeded):
        quota.check("a")
    clock.now = 60.0
    quota.check("a")
    assert quota.used("a") == 0


def test_bytes_being_received_count_so_parallel_requests_cannot_exceed() -> None:
    """Reserved but unfinished bytes count; dropped ones are given back."""
    quota = UploadQuota(1000, 60, clock=Clock(0.0))
    quota.reserve("a", 600)
    with pytest.raises(QuotaExceeded):
        quota.reserve("a", 600)
    quota.release("a", 600, kept=False)
    quota.reserve("a", 1000)


def test_clients_have_separate_quotas() -> None:
    """One client's use leaves another's untouched."""
    quota = UploadQuota(1000, 60, clock=Clock(0.0))
    quota.reserve("a", 1000)
    quota.release("a", 1000, kept=True)
    quota.reserve("b", 1000)


def test_a_request_bigger_than_the_quota_waits_a_whole_window() -> None:
    """What can never fit is told to wait the whole window."""
    quota = UploadQuota(1000, 60, clock=Clock(0.0))
    with pytest.raises(QuotaExceeded) as caught:
        quota.reserve("a", 1001)
    assert caught.value.retry_after == 60


def test_idle_clients_are_forgotten() -> None:
    """A client with nothing left in the window takes no memory."""
    clock = Clock(0.0)
    quota = UploadQuota(1000, 60, clock=clock)
    for n in range(100):
        quota.reserve(f"client-{n}", 10)
        quota.release(f"client-{n}", 10, kept=True)
    clock.now = 120.0
    quota.check("late")
    assert list(quota._clients) == ["late"]


@pytest.mark.parametrize(
    ("max_bytes", "window"),
    [(0, 60), (-5, 60), (True, 60), (1.5, 60), (100, 0), (100, -1), (100, float("nan"))],
)
def test_upload_quota_rejects_bad_options(max_bytes: Any, window: Any) -> None:
    """A quota needs a whole number of bytes >= 1 and a positive, finite window."""
    with pytest.raises(ValidationError):
        UploadQuota(max_bytes, window)


# -- over HTTP ------------------------------------------------------------------------------


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """Each transport: in-process ASGI and WSGI, uvicorn and a threaded wsgiref server."""
    return str(request.param)


def _service(root: Path, *, store: dict[str, Any] | None = None, **app_options: Any) -> Service:
    """The test service, its upload store made with ``store`` options (no free-space check)."""
    svc = Service(root, **app_options)
    svc.uploads = UploadStore(
        root / "uploads", max_bytes=300_000, min_free_bytes=0, **(store or {})
    )
    options = {"events_poll": 0.05, **app_options}
    svc.asgi = asgi_module.create_app(svc.tracker, svc.runner, svc.uploads, **options)
    svc.wsgi = wsgi_module.create_app(svc.tracker, svc.runner, svc.uploads, **options)
    return svc


@pytest.fixture
def make_service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    made: list[Service] = []

    def make(**options: Any) -> Service:
        made.append(_service(tmp_path, **options))
        return made[-1]

    yield make
    for svc in made:
        svc.close()


def _upload(client: Client, *sizes: int, headers: dict[str, str] | None = None) -> Any:
    files = [("files", (f"{n}.jpg", b"\xff" * size, "image/jpeg")) for n, size in enumerate(sizes)]
    return client.post("/api/upload", files=files, headers=headers or {})


def _error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert "Traceback" not in response.text
    return body["error"]


def _by_header(headers: Any, client: str | None) -> str | None:
    """The client_key of a deployment behind a proxy that names the client in a header."""
    return str(headers.get("x-client", client))


def test_upload_over_the_storage_cap_is_507_and_keeps_nothing(
    make_service: Callable[..., Service], transport: str
) -> None:
    """With the folder nearly full, a two-file upload answers 507 storage_full, keeps neither."""
    service = make_service(store={"max_total_bytes": 500_000})
    with clients(service, transport) as new_client:
        client = new_client()
        first = _upload(client, 250_000)
        assert first.status_code == 201, first.text
        before = _entries(service.uploads.directory)
        error = _error(_upload(client, 100_000, 200_000), 507, "storage_full")
        assert "500,000 bytes" in error["message"]
        assert str(service.uploads.directory) not in error["message"]
        assert _entries(service.uploads.directory) == before
        assert _upload(client, 250_000).status_code == 201  # what is left is still usable


def test_over_the_quota_is_429_with_retry_after_and_another_client_still_uploads(
    make_service: Callable[..., Service], transport: str
) -> None:
    """Past upload_bytes_per_client, a client gets 429 and Retry-After; another is unaffected."""
    service = make_service(
        upload_bytes_per_client=400_000, upload_window=600, client_key=_by_header
    )
    alice, bob = {"X-Client": "alice"}, {"X-Client": "bob"}
    with clients(service, transport) as new_client:
        client = new_client()
        assert _upload(client, 250_000, headers=alice).status_code == 201
        before = _entries(service.uploads.directory)
        refused = _upload(client, 100_000, 100_000, headers=alice)
        error = _error(refused, 429, "too_many_uploads")
        assert "400,000 bytes per 600 s" in error["message"]
        assert 1 <= int(refused.headers["retry-after"]) <= 600
        assert _entries(service.uploads.directory) == before
        assert _upload(new_client(), 250_000, headers=bob).status_code == 201
        assert _upload(client, 150_000, headers=alice).status_code == 201  # exactly the rest


@pytest.mark.parametrize("shell", ["asgi", "wsgi"])
def test_a_client_at_its_quota_is_refused_before_its_body_is_read(
    make_service: Callable[..., Service], shell: str
) -> None:
    """A client with no room left gets 429 before its body is parsed (a malformed one too)."""
    service = make_service(upload_bytes_per_client=1000, client_key=_by_header)
    with clients(service, shell) as new_client:
        client = new_client()
        assert _upload(client, 1000).status_code == 201
        before = _entries(service.uploads.directory)
        refused = client.post(
            "/api/upload",
            content=b"--x\r\nnot a multipart part at all",
            headers={"Content-Type": "multipart/form-data; boundary=x"},
        )
        _error(refused, 429, "too_many_uploads")
        assert _entries(service.uploads.directory) == before


def test_a_rejected_upload_does_not_use_up_the_quota(
    make_service: Callable[..., Service],
) -> None:
    """The bytes of an upload refused as too large are given back to the client."""
    service = make_service(upload_bytes_per_client=600_000, client_key=_by_header)
    with clients(service, "asgi") as new_client:
        client = new_client()
        _error(_upload(client, 200_000, 300_001), 413, "too_large")
        assert _upload(client, 300_000, 300_000).status_code == 201


def test_client_key_none_means_not_counted(make_service: Callable[..., Service]) -> None:
    """A client_key that returns None exempts the request from the quota."""
    service = make_service(upload_bytes_per_client=1000, client_key=lambda headers, client: None)
    with clients(service, "wsgi") as new_client:
        client = new_client()
        assert _upload(client, 200_000).status_code == 201
        assert _upload(client, 200_000).status_code == 201


def _in_process_client(service: Service, shell: str, address: str) -> Any:
    """An in-process client whose requests come from ``address`` (scope or REMOTE_ADDR)."""
    if shell == "asgi":
        client = SyncASGIClient(service.asgi)
        transport = httpx.ASGITransport(app=service.asgi, client=(address, 5000))
        client._client = httpx.AsyncClient(transport=transport, base_url="http://testserver")
        return client
    transport = httpx.WSGITransport(app=service.wsgi, remote_addr=address)
    return httpx.Client(transport=transport, base_url="http://testserver")


@pytest.mark.parametrize("shell", ["asgi", "wsgi"])
@pytest.mark.parametrize(
    ("first", "second", "shared"),
    [
        ("10.0.0.1", "10.0.0.2", False),
        ("2001:db8:1:2::1", "2001:db8:1:2::ffff", True),  # one /64: one host
        ("2001:db8:1:2::1", "2001:db8:1:3::1", False),
    ],
)
def test_by_default_the_quota_is_per_client_address(
    make_service: Callable[..., Service], shell: str, first: str, second: str, shared: bool
) -> None:
    """Without client_key, the peer address is the key (an IPv6 address by its /64)."""
    service = make_service(upload_bytes_per_client=300_000)
    one, other = (_in_process_client(service, shell, a) for a in (first, second))
    try:
        assert _upload(one, 300_000).status_code == 201
        _error(_upload(one, 1), 429, "too_many_uploads")
        assert _upload(other, 1).status_code == (429 if shared else 201)
    finally:
        one.close()
        other.close()


@pytest.mark.parametrize(
    "options",
    [
        {"upload_bytes_per_client": 0},
        {"upload_bytes_per_client": -1},
        {"upload_bytes_per_client": True},
        {"upload_bytes_per_client": 1.5},
        {"upload_bytes_per_client": "200M"},
        {"upload_bytes_per_client": 1000, "upload_window": 0},
        {"upload_bytes_per_client": 1000, "upload_window": float("inf")},
        {"upload_bytes_per_client": 1000, "upload_window": "1h"},
        {"upload_window": -1},
        {"client_key": "x-forwarded-for"},
    ],
)
def test_create_app_rejects_bad_quota_options(tmp_path: Path, options: dict[str, Any]) -> None:
    """Every quota option is checked when the app is made: ValidationError."""
    with pytest.raises(ValidationError):
        _service(tmp_path, **options)


def test_openapi_documents_507_and_429_on_upload(make_service: Callable[..., Service]) -> None:
    """The upload operation documents storage_full (507) and too_many_uploads (429)."""
    service = make_service()
    with clients(service, "asgi") as new_client:
        document = new_client().get("/api/openapi.json").json()
    responses = document["paths"]["/upload"]["post"]["responses"]
    assert "storage_full" in responses["507"]["description"]
    assert "too_many_uploads" in responses["429"]["description"]
    assert responses["429"]["headers"]["Retry-After"]["required"] is True


# -- batchtrack serve -----------------------------------------------------------------------


def _uploads_kept(data: Path) -> int:
    return len(list((data / "uploads").glob("*.json")))


def test_serve_answers_507_past_max_upload_storage(tmp_path: Path) -> None:
    """serve --max-upload-storage 1M keeps a 700 KiB upload and refuses a second with 507."""
    data = tmp_path / "data"
    base, proc = start_serve(data, tmp_path / "serve.log", "--max-upload-storage", "1M")
    try:
        files = [("files", ("a.jpg", b"\xff" * (700 * KIB), "image/jpeg"))]
        assert httpx.post(f"{base}/api/upload", files=files, timeout=30).status_code == 201
        refused = httpx.post(f"{base}/api/upload", files=files, timeout=30)
        _error(refused, 507, "storage_full")
        assert _uploads_kept(data) == 1
    finally:
        stop_serve(proc)


def test_serve_answers_429_past_upload_quota(tmp_path: Path) -> None:
    """serve --upload-quota 1M lets one client upload 700 KiB, then answers 429."""
    data = tmp_path / "data"
    base, proc = start_serve(data, tmp_path / "serve.log", "--upload-quota", "1M")
    try:
        files = [("files", ("a.jpg", b"\xff" * (700 * KIB), "image/jpeg"))]
        assert httpx.post(f"{base}/api/upload", files=files, timeout=30).status_code == 201
        refused = httpx.post(f"{base}/api/upload", files=files, timeout=30)
        _error(refused, 429, "too_many_uploads")
        assert int(refused.headers["retry-after"]) >= 1
        assert _uploads_kept(data) == 1
    finally:
        stop_serve(proc)


@pytest.mark.parametrize(
    "args",
    [
        ["--max-upload-storage", "lots"],
        ["--max-upload-storage", "0"],
        ["--max-upload-storage", "5X"],
        ["--upload-quota", "-1"],
        ["--upload-quota", "0.1"],
    ],
)
def test_serve_bad_sizes_are_usage_errors(tmp_path: Path, args: list[str]) -> None:
    """A size that is not bytes or a number with K/M/G/T: exit 2, one line naming the option."""
    result = subprocess.run(
        [sys.executable, "-m", "batchtrack", "serve", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert args[0] in lines[-1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "batchtrack-data").exists()


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 2**20),
        ("500M", 500 * 2**20),
        ("2G", 2 * 2**30),
        ("1.5g", 3 * 2**29),
        ("64KiB", 64 * KIB),
        ("10 MB", 10 * 2**20),
        ("1T", 2**40),
    ],
)
def test_serve_sizes_are_bytes_or_binary_suffixes(text: str, size: int) -> None:
    """Sizes are plain bytes, or a number with K, M, G or T (powers of 1024)."""
    from batchtrack.cli import _size

    assert _size(text) == size
