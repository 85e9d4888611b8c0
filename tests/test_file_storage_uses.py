"""Everything that touches a file, on every file storage: uploads, the image pipeline,
result downloads, the ZIP, removal with the batch, and the sweep of partial files.

Each test runs on a folder (``LocalFiles``) and on a real S3 server (``S3Files`` over
SeaweedFS, started by the tests): the same behaviour on both.
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from batchtrack import BatchTracker, Item, Orchestrator, SQLiteStore, Status
from batchtrack import asgi as asgi_module
from batchtrack.files import FileStorage, LocalFiles, ResultFiles
from batchtrack.imaging import ImagePipeline
from batchtrack.uploads import FileNotFound, FileTooLarge, StorageFull, UploadStore
from http_support import SyncASGIClient, jpeg

STORAGES = ["local", "s3"]


@pytest.fixture(params=STORAGES)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> FileStorage:
    """A fresh, empty file storage of each kind in turn."""
    if request.param == "local":
        return LocalFiles(tmp_path / "files")
    made: FileStorage = request.getfixturevalue("s3_storage")
    return made


def _keys(storage: FileStorage, prefix: str = "") -> list[str]:
    return sorted(info.key for info in storage.list(prefix))


def _twin(storage: FileStorage) -> FileStorage:
    """Another storage object on the same place: what another process or machine opens."""
    from batchtrack.files import from_url

    return from_url(storage.url)


# -- uploads -----------------------------------------------------------------------------


def test_an_upload_streams_into_the_storage_and_any_process_reads_it(
    storage: FileStorage,
) -> None:
    """An upload is its bytes and a sidecar in the storage; another UploadStore on the same
    storage (another machine) finds it, with its owner rule, and reads the same bytes."""
    data = jpeg((640, 480))
    mine = UploadStore(storage, prefix="uploads/")
    stored = mine.save("../../photo.jpg", io.BytesIO(data), owner="alice")
    assert (stored.filename, stored.size, stored.owner) == ("photo.jpg", len(data), "alice")
    assert _keys(storage, "uploads/") == [f"uploads/{stored.id}", f"uploads/{stored.id}.json"]
    assert storage.key_of(stored.location) == f"uploads/{stored.id}"
    theirs = UploadStore(_twin(storage), prefix="uploads/")
    found = theirs.get(stored.id, owner="alice")
    assert (found.filename, found.size, found.location) == (
        "photo.jpg",
        len(data),
        stored.location,
    )
    with theirs.open(stored.id) as file:
        assert file.read() == data
    with pytest.raises(FileNotFound):
        theirs.get(stored.id, owner="mallory")
    assert theirs.used_bytes == len(data)  # the new store counted what was there


def test_an_upload_over_the_limit_leaves_nothing_in_the_storage(storage: FileStorage) -> None:
    """A file over max_bytes, or over the storage's total cap, is dropped whole: no object,
    no sidecar, nothing counted."""
    uploads = UploadStore(storage, prefix="uploads/", max_bytes=1000, max_total_bytes=1500)
    with pytest.raises(FileTooLarge):
        uploads.save("big.jpg", io.BytesIO(b"x" * 1001))
    kept = uploads.save("small.jpg", io.BytesIO(b"x" * 900))
    with pytest.raises(StorageFull):
        uploads.save("more.jpg", io.BytesIO(b"x" * 900))
    assert _keys(storage) == [f"uploads/{kept.id}", f"uploads/{kept.id}.json"]
    assert uploads.used_bytes == 900


def test_expired_uploads_are_removed_from_the_storage(storage: FileStorage) -> None:
    """cleanup() deletes an expired upload's object and sidecar and keeps a fresh one."""
    now = [1_000_000.0]
    uploads = UploadStore(storage, prefix="uploads/", ttl=60, clock=lambda: now[0])
    old = uploads.save("old.jpg", io.BytesIO(b"old"))
    now[0] += 50
    new = uploads.save("new.jpg", io.BytesIO(b"new"))
    now[0] += 20
    assert uploads.cleanup() == 1
    assert _keys(storage) == [f"uploads/{new.id}", f"uploads/{new.id}.json"]
    with pytest.raises(FileNotFound):
        uploads.get(old.id)


# -- the image pipeline ------------------------------------------------------------------


def test_the_pipeline_reads_an_upload_by_its_location_and_writes_one_result(
    storage: FileStorage,
) -> None:
    """ImagePipeline over a storage: the item's source is the upload's location; the result
    is results/<item id>.jpg in the storage, shrunk, and nothing else is left."""
    uploads = UploadStore(storage, prefix="uploads/")
    stored = uploads.save("big.jpg", io.BytesIO(jpeg((1600, 1200))))
    pipeline = ImagePipeline(_twin(storage), prefix="results/", max_size=400)
    written = pipeline(Item("big.jpg", source=stored.location, id="item-1", batch_id="b"))
    assert _keys(storage, "results/") == ["results/item-1.jpg"]
    assert written in (
        storage.local_path("results/item-1.jpg"),
        storage.location("results/item-1.jpg"),
    )
    with storage.open("results/item-1.jpg") as file, Image.open(file) as image:
        assert image.size == (400, 300)
        assert not image.getexif()
    assert pipeline.results.find("item-1") == "results/item-1.jpg"
    assert pipeline.remove_results("b", ["item-1", "../escape", ""]) == 1
    assert _keys(storage, "results/") == []


def test_a_missing_source_fails_the_item_with_a_clear_error(storage: FileStorage) -> None:
    """A source location with no file behind it is "file not found", nothing is written."""
    from batchtrack import ProcessingError

    pipeline = ImagePipeline(storage, prefix="results/")
    with pytest.raises(ProcessingError, match="file not found"):
        pipeline(Item("gone.jpg", source=storage.location("uploads/gone"), id="x"))
    assert _keys(storage) == []


# -- the HTTP API: two web processes over one store and one storage ---------------------


@pytest.fixture
def two_webs(
    storage: FileStorage, tmp_path: Path
) -> Iterator[tuple[Callable[[], Any], Callable[[], Any], Orchestrator, FileStorage]]:
    """Two apps, each with its own tracker, storage object and orchestrator, sharing only
    a SQLite database and the file storage, like two web processes."""
    made: list[Any] = []
    orchestrators = []
    apps = []
    for _ in range(2):
        tracker = BatchTracker(SQLiteStore(tmp_path / "batches.db"))
        files = _twin(storage)
        pipeline = ImagePipeline(files, prefix="results/", max_size=300)
        tracker.add_removal_hook(pipeline.remove_results)
        orchestrator = Orchestrator(tracker, pipeline, concurrency=2)
        orchestrators.append(orchestrator)
        uploads = UploadStore(files, prefix="uploads/")
        apps.append(
            asgi_module.create_app(
                tracker, orchestrator, uploads, session_secret="a-secret-both-webs-share"
            )
        )

    def client(app: Any) -> Callable[[], Any]:
        def make() -> Any:
            made.append(SyncASGIClient(app))
            return made[-1]

        return make

    yield client(apps[0]), client(apps[1]), orchestrators[0], storage
    for c in made:
        c.close()
    for orchestrator in orchestrators:
        orchestrator.close()


def test_upload_on_one_web_start_on_the_other_download_from_both(two_webs: Any) -> None:
    """Upload through web 1, start through web 2 with the same session, then every result
    and the ZIP download from either; the batch's results go when it is deleted."""
    web1, web2, orchestrator, storage = two_webs
    one, two = web1(), web2()
    files = [("files", (f"p{n}.jpg", jpeg((500, 400)), "image/jpeg")) for n in range(3)]
    up = one.post("/api/upload", files=files)
    assert up.status_code == 201, up.text
    two.cookies.update(one.cookies)
    ids = [f["id"] for f in up.json()["files"]]
    started = two.post("/api/process-batch", json={"fileIds": ids})
    assert started.status_code == 202, started.text
    batch_id = started.json()["batchId"]
    body: dict[str, Any] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # web 2 runs it; web 1 watches
        body = one.get(f"/api/batch-status/{batch_id}").json()
        if body["status"] == "completed":
            break
        time.sleep(0.05)
    assert body["progress"] == {
        "total": 3,
        "completed": 3,
        "failed": 0,
        "processing": 0,
        "pending": 0,
        "cancelled": 0,
    }
    for n, image in enumerate(body["images"]):
        web = (one, two)[n % 2]
        result = web.get(f"/api/batch-results/{batch_id}/{image['id']}")
        assert result.status_code == 200, result.text
        with Image.open(io.BytesIO(result.content)) as shown:
            assert shown.size == (300, 240)
    for web in (one, two):
        archive = web.get(f"/api/batch-results/{batch_id}.zip")
        assert archive.status_code == 200
        with zipfile.ZipFile(io.BytesIO(archive.content)) as z:
            assert sorted(z.namelist()) == ["p0.jpg", "p1.jpg", "p2.jpg"]
    assert len(_keys(storage, "results/")) == 3
    assert orchestrator.tracker.delete(batch_id)  # web 1's tracker, web 2's batch
    assert _keys(storage, "results/") == []
    assert two.get(f"/api/batch-status/{batch_id}").status_code == 404


def test_result_files_over_a_storage_serve_a_processor_of_your_own(
    storage: FileStorage,
) -> None:
    """create_app(results_dir=ResultFiles(storage, prefix)) serves results that a processor
    of your own wrote as <prefix><item id>.<ext>."""
    tracker = BatchTracker()

    def processor(item: Item) -> None:
        storage.write_bytes(f"out/{item.id}.png", b"not really a png")

    with Orchestrator(tracker, processor) as orchestrator:
        app = asgi_module.create_app(
            tracker,
            orchestrator,
            UploadStore(_twin(storage), prefix="uploads/"),
            results_dir=ResultFiles(storage, "out/"),
            owner=lambda headers: "me",
        )
        snap = orchestrator.run([Item("a.txt", source=b"x")], owner="me")
        assert snap.status is Status.COMPLETED
        client = SyncASGIClient(app)
        try:
            item = snap.items[0].id
            result = client.get(f"/api/batch-results/{snap.batch_id}/{item}")
            assert result.status_code == 200
            assert result.content == b"not really a png"
            assert result.headers["content-type"] == "image/png"
            assert "a.png" in result.headers["content-disposition"]
        finally:
            client.close()


def test_a_folder_path_still_works_as_before(tmp_path: Path) -> None:
    """UploadStore(folder) and ImagePipeline(folder) keep their layout: <id>, <id>.json and
    <item id>.jpg at the top of each folder, and sources are plain paths."""
    uploads = UploadStore(tmp_path / "uploads")
    stored = uploads.save("a.jpg", io.BytesIO(jpeg((50, 40))))
    assert stored.path == tmp_path / "uploads" / stored.id
    assert stored.location == str(tmp_path / "uploads" / stored.id)
    pipeline = ImagePipeline(tmp_path / "out")
    written = pipeline(Item("a.jpg", source=stored.location, id="i1"))
    assert written == tmp_path / "out" / "i1.jpg"
    assert (tmp_path / "out" / "i1.jpg").stat().st_mode & 0o044  # readable by others too


# -- outages -------------------------------------------------------------------------------


def test_an_object_store_outage_is_503_for_uploads_and_a_clear_item_error(tmp_path: Path) -> None:
    """With the S3 server killed: an upload answers 503 JSON and keeps nothing, a running
    item fails with one clear line; restarted, the retried batch completes with exactly
    one result per item."""
    import threading

    from batchtrack.files.s3 import S3Files
    from conftest import (
        S3_ACCESS_KEY,
        S3_SECRET_KEY,
        create_bucket,
        start_seaweedfs,
        stop_seaweedfs,
    )

    pytest.importorskip("obstore")
    proc, port = start_seaweedfs(tmp_path / "s3")
    try:
        endpoint = f"http://127.0.0.1:{port}"
        bucket = create_bucket(endpoint, "outage")
        storage = S3Files(
            "outage",
            "app",
            endpoint=endpoint,
            region="us-east-1",
            access_key_id=S3_ACCESS_KEY,
            secret_access_key=S3_SECRET_KEY,
            retry_timeout=1.0,
        )
        gate = threading.Event()
        pipeline = ImagePipeline(storage, prefix="results/", max_size=200)

        def processor(item: Item) -> Any:
            gate.wait(30)
            return pipeline(item)

        tracker = BatchTracker()
        with Orchestrator(tracker, processor, concurrency=2) as orchestrator:
            app = asgi_module.create_app(
                tracker,
                orchestrator,
                UploadStore(storage, prefix="uploads/"),
                owner=lambda headers: "me",
            )
            client = SyncASGIClient(app)
            try:
                files = [("files", (f"{n}.jpg", jpeg((400, 300)), "image/jpeg")) for n in range(2)]
                up = client.post("/api/upload", files=files)
                assert up.status_code == 201, up.text
                ids = [f["id"] for f in up.json()["files"]]
                started = client.post("/api/process-batch", json={"fileIds": ids})
                assert started.status_code == 202, started.text
                batch_id = started.json()["batchId"]
                stop_seaweedfs(proc, kill=True)
                gate.set()  # the items now meet the outage
                down = client.post("/api/upload", files=files[:1])
                assert down.status_code == 503, down.text
                assert down.json()["error"]["code"] == "storage_unavailable"
                assert down.headers["retry-after"]
                assert "Traceback" not in down.text
                snap = orchestrator.wait(batch_id, timeout=60)
                assert snap.progress.failed == 2
                for item in snap.items:
                    assert item.error == "the file storage could not be reached; retry later"
                proc, _ = start_seaweedfs(tmp_path / "s3")
                assert tracker.retry(batch_id) == 2
                orchestrator.resume(batch_id)
                snap = orchestrator.wait(batch_id, timeout=60)
                assert snap.status is Status.COMPLETED
                keys = sorted(info["path"] for info in bucket.list("app/"))
                assert keys == sorted(
                    [f"app/uploads/{i}" for i in ids]
                    + [f"app/uploads/{i}.json" for i in ids]
                    + [f"app/results/{item.id}.jpg" for item in snap.items]
                )
            finally:
                client.close()
    finally:
        stop_seaweedfs(proc)


def test_a_pipeline_over_a_storage_pickles_for_process_pools(storage: FileStorage) -> None:
    """ImagePipeline over a storage survives pickling (what a process pool or a Dask
    cluster does with the processor) and writes to the same place after."""
    import pickle

    pipeline = ImagePipeline(storage, prefix="results/", max_size=100)
    copy = pickle.loads(pickle.dumps(pipeline))
    data = jpeg((300, 200))
    copy(Item("a.jpg", source=data, id="pickled"))
    assert _keys(storage, "results/") == ["results/pickled.jpg"]
