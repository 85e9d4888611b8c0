"""The file-storage boundary: one suite run over every storage, then what only S3 has.

Every test of the first part runs on a folder (``LocalFiles``) and on a real S3 server
(``S3Files`` over SeaweedFS, started by the fixtures in conftest): a storage of your own
passes when it passes these. The second part starts, kills and restarts S3 servers of its
own: a missing bucket, refused credentials, an endpoint that does not answer, and an
outage in the middle of the work.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from batchtrack import ValidationError
from batchtrack._extras import install_command
from batchtrack.exceptions import FileStorageError
from batchtrack.files import FileStorage, LocalFiles, from_url
from conftest import (
    S3_ACCESS_KEY,
    S3_SECRET_KEY,
    create_bucket,
    s3_environment,
    start_seaweedfs,
    stop_seaweedfs,
)

STORAGES = ["local", "s3"]
MiB = 2**20


@pytest.fixture(params=STORAGES)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> FileStorage:
    """A fresh, empty file storage of each kind in turn."""
    if request.param == "local":
        return LocalFiles(tmp_path / "files")
    made: FileStorage = request.getfixturevalue("s3_storage")
    return made


def _keys(storage: FileStorage, prefix: str = "") -> list[str]:
    return sorted(info.key for info in storage.list(prefix))


def _write(storage: FileStorage, *keys: str) -> None:
    for key in keys:
        storage.write_bytes(key, key.encode())


# -- writing and reading ---------------------------------------------------------------------


def test_a_committed_file_reads_back_whole(storage: FileStorage) -> None:
    """A file written in pieces is, once committed, the same bytes by open, read_bytes and
    size, and the commit and tell give its size."""
    data = os.urandom(100_000)
    out = storage.writer("results/a.bin")
    assert out.write(data[:40_000]) == 40_000
    out.write(data[40_000:])
    assert out.tell() == len(data)
    assert out.commit() == len(data)
    assert storage.read_bytes("results/a.bin") == data
    with storage.open("results/a.bin") as file:
        assert file.read() == data
    assert storage.size("results/a.bin") == len(data)


def test_an_uncommitted_file_is_invisible_everywhere(storage: FileStorage) -> None:
    """Until its writer commits, a file is absent to every call, here and in another
    instance on the same storage (another process or machine); then it is there whole."""
    twin = from_url(storage.url)
    data = os.urandom(300_000)
    out = storage.writer("uploads/u1")
    out.write(data)
    for view in (storage, twin):
        assert view.size("uploads/u1") is None
        with pytest.raises(FileNotFoundError):
            view.open("uploads/u1")
        assert _keys(view) == []
    out.commit()
    assert twin.read_bytes("uploads/u1") == data


def test_an_aborted_write_leaves_nothing(storage: FileStorage) -> None:
    """A writer aborted after 12 MiB (past S3Files' part size, so a multipart upload is under
    way), and one whose block raised, leave no file and nothing listed."""
    out = storage.writer("big/aborted")
    chunk = os.urandom(MiB)
    for _ in range(12):
        out.write(chunk)
    assert storage.size("big/aborted") is None
    out.abort()
    out.abort()  # twice is fine

    def broken_upload() -> None:
        with storage.writer("big/raised") as failing:
            failing.write(chunk)
            raise RuntimeError("the upload broke off")

    with pytest.raises(RuntimeError):
        broken_upload()
    for key in ("big/aborted", "big/raised"):
        assert storage.size(key) is None
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(key)
    assert _keys(storage) == []


def test_abort_after_commit_keeps_the_file(storage: FileStorage) -> None:
    """Aborting a writer that already committed changes nothing: the file stays."""
    with storage.writer("kept") as out:
        out.write(b"kept")
    out.abort()
    assert storage.read_bytes("kept") == b"kept"


def test_a_commit_replaces_a_file_atomically(storage: FileStorage) -> None:
    """While a new version is being written, readers get the old one whole; after the
    commit, the new one whole."""
    old, new = b"o" * 300_000, b"n" * 500_000
    storage.write_bytes("results/r.jpg", old)
    out = storage.writer("results/r.jpg")
    out.write(new[:250_000])
    assert storage.read_bytes("results/r.jpg") == old
    out.write(new[250_000:])
    assert storage.read_bytes("results/r.jpg") == old
    out.commit()
    assert storage.read_bytes("results/r.jpg") == new
    assert storage.size("results/r.jpg") == len(new)
    assert _keys(storage) == ["results/r.jpg"]


def test_a_large_streamed_write_round_trips(storage: FileStorage) -> None:
    """20 MiB written in 64 KiB chunks reads back identical, itself read in 1 MiB pieces."""
    rng = random.Random(20)
    written = hashlib.sha256()
    with storage.writer("uploads/large") as out:
        for _ in range(320):
            chunk = rng.randbytes(64 * 1024)
            written.update(chunk)
            out.write(chunk)
    assert storage.size("uploads/large") == 20 * MiB
    read = hashlib.sha256()
    total = 0
    with storage.open("uploads/large") as file:
        while piece := file.read(MiB):
            read.update(piece)
            total += len(piece)
    assert total == 20 * MiB
    assert read.hexdigest() == written.hexdigest()


def test_an_open_file_seeks_and_tells(storage: FileStorage) -> None:
    """An open file seeks from the start, the current position and the end (near and far,
    back and forth) and reads what is there; past the end it reads nothing."""
    data = os.urandom(3 * MiB + 123)
    storage.write_bytes("seek", data)
    with storage.open("seek") as file:
        assert file.seekable()
        assert file.read(10) == data[:10]
        assert file.tell() == 10
        assert file.seek(2 * MiB) == 2 * MiB
        assert file.read(5) == data[2 * MiB : 2 * MiB + 5]
        assert file.seek(-100, io.SEEK_END) == len(data) - 100
        assert file.read() == data[-100:]
        assert file.seek(5) == 5
        assert file.read(MiB) == data[5 : 5 + MiB]
        assert file.seek(-3, io.SEEK_CUR) == MiB + 2
        assert file.read(4) == data[MiB + 2 : MiB + 6]
        assert file.seek(100_000, io.SEEK_CUR) == MiB + 6 + 100_000
        assert file.read(7) == data[MiB + 100_006 : MiB + 100_013]
        file.seek(len(data) + 10)
        assert file.read() == b""
        file.seek(0)
        assert file.read() == data


def test_a_reader_never_mixes_two_versions(storage: FileStorage) -> None:
    """A file replaced while it is open is read on as the version that was opened, or
    the read fails with FileStorageError; it never hands out bytes of the new version."""
    old, new = os.urandom(6 * MiB), os.urandom(6 * MiB)
    storage.write_bytes("replaced", old)
    with storage.open("replaced") as file:
        assert file.read(10) == old[:10]
        storage.write_bytes("replaced", new)
        file.seek(5 * MiB)  # far ahead: past anything already on its way
        rest: bytes | FileStorageError
        try:
            rest = file.read()
        except FileStorageError as exc:
            rest = exc
    if isinstance(rest, FileStorageError):
        assert "changed while it was being read" in str(rest)
    else:
        assert rest == old[5 * MiB :]
    assert storage.read_bytes("replaced") == new


def test_an_empty_file_is_a_file(storage: FileStorage) -> None:
    """An empty file is stored, listed with size 0 and reads back empty."""
    with storage.writer("empty"):
        pass
    assert storage.size("empty") == 0
    assert storage.read_bytes("empty") == b""
    with storage.open("empty") as file:
        assert file.read() == b""
    assert [(info.key, info.size) for info in storage.list()] == [("empty", 0)]


def test_a_missing_file_has_no_size_and_cannot_be_opened(storage: FileStorage) -> None:
    """A key with no file: size None, FileNotFoundError from open and read_bytes."""
    _write(storage, "there")
    assert storage.size("missing") is None
    with pytest.raises(FileNotFoundError):
        storage.open("missing")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("results/missing.jpg")


def test_pillow_opens_images_from_the_storage(storage: FileStorage) -> None:
    """Pillow writes a JPEG through a writer and opens it through open; a two-frame TIFF,
    which Pillow reads by seeking back and forth, decodes to its exact pixels."""
    image_module = pytest.importorskip("PIL.Image")
    noise = image_module.frombytes("RGB", (1024, 1024), random.Random(3).randbytes(3 * MiB))
    with storage.writer("images/photo.jpg") as out:
        noise.save(out, "JPEG", quality=80)
    with storage.open("images/photo.jpg") as file, image_module.open(file) as image:
        assert image.format == "JPEG"
        assert image.size == (1024, 1024)
        image.load()
    second = noise.transpose(image_module.Transpose.ROTATE_90)
    tiff = io.BytesIO()
    noise.save(tiff, "TIFF", save_all=True, append_images=[second])
    storage.write_bytes("images/scan.tiff", tiff.getvalue())
    with storage.open("images/scan.tiff") as file, image_module.open(file) as image:
        assert image.format == "TIFF"
        assert getattr(image, "n_frames", 1) == 2
        image.seek(1)
        assert image.tobytes() == second.tobytes()
        image.seek(0)
        assert image.tobytes() == noise.tobytes()


# -- deleting --------------------------------------------------------------------------------


def test_delete_says_whether_there_was_a_file(storage: FileStorage) -> None:
    """delete removes the file and says True; a second delete, and one of a key never
    written, say False."""
    _write(storage, "d/one", "d/two")
    assert storage.delete("d/one") is True
    assert storage.delete("d/one") is False
    assert storage.delete("d/never") is False
    assert _keys(storage) == ["d/two"]


def test_delete_many_deletes_what_is_named_and_counts_it(storage: FileStorage) -> None:
    """delete_many removes the named files, skips missing ones, counts each file once."""
    _write(storage, "a", "b", "c", "keep/d")
    assert storage.delete_many(["a", "b", "missing", "a"]) == 2
    assert storage.delete_many([]) == 0
    assert storage.delete_many(["c"]) == 1
    assert _keys(storage) == ["keep/d"]


def test_delete_prefix_is_a_plain_string_prefix(storage: FileStorage) -> None:
    """delete_prefix removes every file whose key starts with the string, at any depth."""
    _write(storage, "results/abc.jpg", "results/abcd/x", "results/ab", "results/b", "top")
    assert storage.delete_prefix("results/abc") == 2
    assert _keys(storage) == ["results/ab", "results/b", "top"]
    assert storage.delete_prefix("results/") == 2
    assert storage.delete_prefix("nothing/") == 0
    assert _keys(storage) == ["top"]


def test_delete_prefix_refuses_an_empty_prefix(storage: FileStorage) -> None:
    """An empty prefix would delete everything: ValidationError, and nothing goes."""
    _write(storage, "a", "b/c")
    with pytest.raises(ValidationError):
        storage.delete_prefix("")
    assert _keys(storage) == ["a", "b/c"]


def test_listing_and_deleting_go_past_a_thousand_files(storage: FileStorage) -> None:
    """1,100 files (more than one S3 page or bulk delete holds) are all listed, and all
    deleted by delete_prefix and delete_many."""
    keys = [f"many/{n:05d}" for n in range(1100)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: storage.write_bytes(key, b"x"), keys))
    assert _keys(storage, "many/") == keys
    assert storage.delete_many(keys[:50]) == 50
    assert storage.delete_prefix("many/") == 1050
    assert _keys(storage) == []


# -- listing ---------------------------------------------------------------------------------


def test_list_is_a_plain_string_prefix_with_sizes_and_times(storage: FileStorage) -> None:
    """list(prefix) gives every file whose key starts with the string (any depth), with
    its size and a last-written time in epoch seconds."""
    keys = ["results/abc.jpg", "results/abcd/x", "results/ab", "results/b", "top", "other/abc"]
    before = time.time()
    _write(storage, *keys)
    after = time.time()
    assert _keys(storage, "results/abc") == ["results/abc.jpg", "results/abcd/x"]
    assert _keys(storage, "results/") == sorted(k for k in keys if k.startswith("results/"))
    assert _keys(storage, "res") == _keys(storage, "results/")
    assert _keys(storage, "results/abcd/") == ["results/abcd/x"]
    assert _keys(storage, "top") == ["top"]
    assert _keys(storage, "nothing") == []
    assert _keys(storage) == sorted(keys)
    for info in storage.list():
        assert info.size == len(info.key)
        # S3 keeps whole seconds; both clocks are this machine's.
        assert before - 2 <= info.modified <= after + 2


def test_a_prefix_that_climbs_out_is_refused(storage: FileStorage) -> None:
    """A prefix whose folder part climbs out (``../``, ``a/../``) is a ValidationError for
    list and delete_prefix, and nothing is deleted."""
    _write(storage, "a/b")
    for bad in ("../", "a/../", "../x"):
        with pytest.raises(ValidationError):
            list(storage.list(bad))
        with pytest.raises(ValidationError):
            storage.delete_prefix(bad)
    assert _keys(storage) == ["a/b"]


def test_older_than_picks_files_by_their_time(storage: FileStorage) -> None:
    """older_than gives the files under a prefix written before a time, and only those."""
    _write(storage, "logs/a", "logs/b", "other/c")
    now = time.time()
    assert sorted(i.key for i in storage.older_than("logs/", now + 60)) == ["logs/a", "logs/b"]
    assert storage.older_than("logs/", now - 3600) == []


def test_sweep_partial_leaves_nothing_of_an_abandoned_write(storage: FileStorage) -> None:
    """A writer abandoned mid-write (its process killed) leaves no visible file; the sweep
    removes whatever it left on disk (a folder's temporary file; S3 shows nothing)."""
    out = storage.writer("uploads/partial")
    out.write(os.urandom(100_000))
    time.sleep(0.05)
    removed = storage.sweep_partial("uploads/", 0.01)
    assert removed == (1 if isinstance(storage, LocalFiles) else 0)
    assert storage.size("uploads/partial") is None
    assert _keys(storage) == []
    if isinstance(storage, LocalFiles):
        assert [p for p in storage.root.rglob("*") if p.is_file()] == []
    out.abort()


# -- keys and locations ----------------------------------------------------------------------


def test_a_location_gives_its_key_back(storage: FileStorage) -> None:
    """location and key_of round-trip, also between two instances on the same storage;
    the location is an absolute path for a folder, ``s3://bucket/prefix/key`` for S3."""
    twin = from_url(storage.url)
    location = storage.location("results/x.jpg")
    assert storage.key_of(location) == "results/x.jpg"
    assert twin.key_of(location) == "results/x.jpg"
    if isinstance(storage, LocalFiles):
        assert Path(location).is_absolute()
        assert storage.key_of(Path(location).as_uri()) == "results/x.jpg"
    else:
        assert location == f"{storage.url}/results/x.jpg"
        assert location.startswith("s3://")


def test_a_foreign_location_has_no_key(storage: FileStorage) -> None:
    """key_of is None for what lies elsewhere: another folder or bucket, a sibling whose
    name merely starts the same, a relative path, a path that climbs out."""
    inside = storage.location("a")
    base = inside[: -len("/a")]
    for foreign in (
        "/elsewhere/x",
        "s3://another-bucket/x",
        f"{base}x/y",
        "relative/x",
        f"{inside}/../../../etc/passwd",
        f"{base}/.hidden",
        "",
    ):
        assert storage.key_of(foreign) is None, foreign


BAD_KEYS = ["../x", "/abs", "a//b", ".hidden", "a/.hidden", "", "a/", "a/../b", "a b", "x" * 1025]


def test_bad_keys_are_refused_and_touch_nothing(storage: FileStorage) -> None:
    """Every call refuses a bad key with ValidationError before touching anything: a
    delete_many with one bad key among good ones deletes none of them."""
    _write(storage, "good")
    calls: list[Callable[[str], Any]] = [
        storage.writer,
        storage.open,
        storage.size,
        storage.delete,
        storage.read_bytes,
        lambda key: storage.write_bytes(key, b"x"),
        storage.location,
        lambda key: storage.delete_many(["good", key]),
    ]
    for bad in BAD_KEYS:
        for call in calls:
            with pytest.raises(ValidationError):
                call(bad)
    assert _keys(storage) == ["good"]
    assert storage.read_bytes("good") == b"good"


# -- many at once ----------------------------------------------------------------------------


def test_threads_share_a_storage(storage: FileStorage) -> None:
    """Eight threads write and read files of their own and all rewrite one shared file:
    their own files read back, and every read of the shared one is one whole version."""
    versions = [bytes([n]) * (200_000 + n) for n in range(8)]
    start = threading.Barrier(8)

    def work(n: int) -> None:
        start.wait()
        for round_ in range(5):
            own = f"own/{n}/{round_}"
            storage.write_bytes(own, own.encode() * 1000)
            with storage.writer("shared") as out:
                out.write(versions[n][:100_000])
                out.write(versions[n][100_000:])
            assert storage.read_bytes("shared") in versions
            with storage.open("shared") as file:
                assert file.read() in versions
            assert storage.read_bytes(own) == own.encode() * 1000

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(work, n) for n in range(8)]:
            future.result()
    assert len(_keys(storage, "own/")) == 40
    assert storage.read_bytes("shared") in versions


def test_from_url_opens_the_same_storage(storage: FileStorage) -> None:
    """from_url of a storage's url is the same place: what one writes, the other reads."""
    twin = from_url(storage.url)
    assert twin.url == storage.url
    storage.write_bytes("shared/file", b"seen")
    assert twin.read_bytes("shared/file") == b"seen"
    assert twin.delete("shared/file") is True
    assert storage.size("shared/file") is None


# -- S3 only: construction -------------------------------------------------------------------


def _s3_files(bucket: str, prefix: str = "", **kwargs: Any) -> Any:
    from batchtrack.files.s3 import S3Files

    return S3Files(bucket, prefix, **kwargs)


def _one_clear_error(make: Callable[[], Any], within: float = 6.0) -> str:
    started = time.monotonic()
    with pytest.raises(FileStorageError) as caught:
        make()
    assert time.monotonic() - started < within
    message = str(caught.value)
    assert "\n" not in message
    assert caught.value.__cause__ is not None
    return message


def test_s3_a_missing_bucket_is_one_clear_error(s3_bucket: Any) -> None:
    """A bucket that does not exist: one FileStorageError line, in seconds."""
    message = _one_clear_error(lambda: _s3_files("no-such-bucket-here"))
    assert message == "s3://no-such-bucket-here: no such bucket"


def test_s3_wrong_credentials_are_one_clear_error(s3_bucket: Any) -> None:
    """A wrong secret or an unknown key: one FileStorageError line that says to check the
    AWS_* keys."""
    for wrong in ({"secret_access_key": "wrong"}, {"access_key_id": "nobody"}):
        message = _one_clear_error(lambda w=wrong: _s3_files(s3_bucket.name, "p", **w))
        assert message == (
            f"s3://{s3_bucket.name}/p: access denied "
            "(check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
        )


def test_s3_an_endpoint_nobody_listens_on_is_one_clear_error(s3_bucket: Any) -> None:
    """An endpoint where nothing listens: "cannot reach ... (connection refused)" in
    seconds, not after the outage budget."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    message = _one_clear_error(lambda: _s3_files(s3_bucket.name, endpoint=endpoint), 4.0)
    assert message == f"s3://{s3_bucket.name}: cannot reach {endpoint} (connection refused)"


def test_s3_an_endpoint_that_never_answers_is_one_clear_error(s3_bucket: Any) -> None:
    """An endpoint that takes the connection but never answers: one line, within seconds."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        message = _one_clear_error(lambda: _s3_files(s3_bucket.name, endpoint=endpoint))
    assert message == f"s3://{s3_bucket.name}: cannot reach {endpoint} (no answer in time)"


def test_s3_a_wrong_region_is_one_clear_error() -> None:
    """An endpoint that answers as AWS does for a bucket in another region (301
    PermanentRedirect, the right region in a header): one line that names it."""
    pytest.importorskip("obstore")
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class AnotherRegion(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<Error><Code>PermanentRedirect</Code><Message>...</Message></Error>"
            self.send_response(301)
            self.send_header("x-amz-bucket-region", "eu-west-1")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), AnotherRegion) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            message = _one_clear_error(
                lambda: _s3_files(
                    "far-away", endpoint=endpoint, access_key_id="k", secret_access_key="s"
                )
            )
        finally:
            server.shutdown()
    assert message == "s3://far-away: the bucket is in another region (eu-west-1): set AWS_REGION"


def test_s3_names_and_settings_are_checked(s3_bucket: Any) -> None:
    """A bucket name S3 refuses, a bad prefix, a part below 5 MiB, a non-positive retry
    time and an unknown option are ValidationErrors."""
    for kwargs in (
        {"bucket": "Not_A_Bucket"},
        {"bucket": s3_bucket.name, "prefix": "../up"},
        {"bucket": s3_bucket.name, "part_size": MiB},
        {"bucket": s3_bucket.name, "retry_timeout": 0},
        {"bucket": s3_bucket.name, "no_such_option": "x"},
    ):
        with pytest.raises(ValidationError):
            _s3_files(**kwargs)


def test_s3_without_obstore_says_how_to_install_it() -> None:
    """Importing batchtrack.files.s3 without obstore fails with the pip hint, and
    batchtrack.files itself never imports obstore."""
    code = (
        "import sys\n"
        "import batchtrack, batchtrack.files\n"
        "assert 'obstore' not in sys.modules\n"
        "sys.modules['obstore'] = None\n"
        "try:\n"
        "    import batchtrack.files.s3\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert install_command("s3") in out


_FORK = """
import os, signal, sys
from batchtrack.exceptions import FileStorageError
from batchtrack.files.s3 import S3Files

files = S3Files(sys.argv[1], "forked")
if sys.argv[2] == "used":
    files.write_bytes("parent", b"before the fork")
pid = os.fork()
if pid == 0:
    signal.alarm(20)  # a hang ends here, as a failure
    try:
        files.write_bytes("child", b"from the child")
        os._exit(0 if files.read_bytes("child") == b"from the child" else 3)
    except FileStorageError as exc:
        print(exc, flush=True)
        os._exit(4)
_, status = os.waitpid(pid, 0)
print("child exit", os.waitstatus_to_exitcode(status), flush=True)
print("parent reads", files.size("child"), flush=True)
"""


def _fork(bucket: str, mode: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", _FORK, bucket, mode],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_s3_a_storage_made_before_a_fork_works_in_the_child(s3_bucket: Any) -> None:
    """Creating a storage (its bucket check included) starts nothing that a fork breaks:
    a child forked afterwards (Celery's prefork pool, gunicorn --preload) uses it."""
    assert _fork(s3_bucket.name, "made") == ["child exit 0", "parent reads 14"]


def test_s3_a_storage_used_before_a_fork_says_so_in_the_child(s3_bucket: Any) -> None:
    """Once obstore has worked in a process its threads are there only: a child forked
    after that gets one clear FileStorageError at once instead of hanging."""
    lines = _fork(s3_bucket.name, "used")
    assert lines[1:] == ["child exit 4", "parent reads None"]
    assert lines[0].startswith(f"s3://{s3_bucket.name}/forked: obstore was started in process")


# -- S3 only: outages ------------------------------------------------------------------------


class Server:
    """A SeaweedFS of this module's own, to kill and restart on the same folder and ports."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.proc, port = start_seaweedfs(folder)
        self.endpoint = f"http://127.0.0.1:{port}"

    def kill(self) -> None:
        stop_seaweedfs(self.proc, kill=True)

    def restart(self) -> None:
        self.proc, port = start_seaweedfs(self.folder)
        assert f"http://127.0.0.1:{port}" == self.endpoint

    def storage(self, bucket: str, retry_timeout: float) -> Any:
        return _s3_files(
            bucket,
            prefix="p",
            endpoint=self.endpoint,
            retry_timeout=retry_timeout,
            access_key_id=S3_ACCESS_KEY,
            secret_access_key=S3_SECRET_KEY,
        )


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A SeaweedFS that tests may SIGKILL, as long as they start it again."""
    pytest.importorskip("obstore")
    server = Server(tmp_path_factory.mktemp("killable-seaweedfs"))
    yield server
    stop_seaweedfs(server.proc)


def test_s3_a_server_killed_mid_run_fails_fast_and_loses_nothing(own_server: Server) -> None:
    """SIGKILL of the server mid-run: every call (a streamed write and read under way
    too) raises one FileStorageError line within the retry time; restarted on the same
    folder, the same storage works again, every committed file intact, the half-written
    one absent."""
    create_bucket(own_server.endpoint, "killed")
    storage = own_server.storage("killed", retry_timeout=2.0)
    committed = {f"c/{n}": os.urandom(50_000 * (n + 1)) for n in range(6)}
    committed["c/big"] = os.urandom(12 * MiB)
    for key, data in committed.items():
        storage.write_bytes(key, data)
    reader = storage.open("c/big")
    head = reader.read(MiB)
    writer = storage.writer("half")
    for _ in range(10):
        writer.write(os.urandom(MiB))
    own_server.kill()

    def rest_of_read() -> None:
        assert head + reader.read() == committed["c/big"]

    def rest_of_write() -> None:
        writer.write(b"end")
        writer.commit()

    calls: list[Callable[[], object]] = [
        lambda: storage.size("c/0"),
        lambda: storage.read_bytes("c/0"),
        lambda: storage.open("c/1"),
        lambda: storage.write_bytes("new", b"x"),
        lambda: storage.delete("c/0"),
        lambda: storage.delete_many(["c/0", "c/1"]),
        lambda: list(storage.list("c/")),
        rest_of_write,
        rest_of_read,
    ]

    def timed(call: Callable[[], object]) -> tuple[float, BaseException | None]:
        started = time.monotonic()
        try:
            call()
        except BaseException as exc:
            return time.monotonic() - started, exc
        return time.monotonic() - started, None

    with ThreadPoolExecutor(len(calls)) as pool:  # all at once: one retry time in all
        outcomes = list(pool.map(timed, calls))
    for call, (took, error) in zip(calls, outcomes, strict=True):
        assert took < 2.0 + 4.0
        if error is None:
            # Only the read may finish: its whole body can be on its way before the kill.
            assert call is rest_of_read
            continue
        assert isinstance(error, FileStorageError), repr(error)
        assert "\n" not in str(error)
        assert f"cannot reach {own_server.endpoint}" in str(error) or "broke off" in str(error)
    own_server.restart()
    for key, data in committed.items():
        assert storage.read_bytes(key) == data
    assert storage.size("half") is None
    assert _keys(storage) == sorted(committed)
    storage.write_bytes("after", b"fine")
    assert storage.read_bytes("after") == b"fine"


def test_s3_a_short_outage_is_retried(own_server: Server) -> None:
    """Calls made while the server is down succeed once it is back within the retry
    time: the read returns the file, the write is stored once and whole."""
    create_bucket(own_server.endpoint, "blip")
    storage = own_server.storage("blip", retry_timeout=30.0)
    data = os.urandom(300_000)
    storage.write_bytes("before", data)
    own_server.kill()
    results: dict[str, Any] = {}

    def read() -> None:
        results["read"] = storage.read_bytes("before")

    def write() -> None:
        results["wrote"] = storage.write_bytes("during", data[::-1])

    threads = [threading.Thread(target=read), threading.Thread(target=write)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # both are retrying against a closed port by now
    own_server.restart()
    for thread in threads:
        thread.join(30)
    assert results == {"read": data, "wrote": len(data)}
    assert storage.read_bytes("during") == data[::-1]
    assert _keys(storage) == ["before", "during"]


def test_s3_the_environment_names_the_endpoint_and_keys(
    s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With only the AWS_* variables set (as `batchtrack serve --files s3://...` is run),
    from_url opens the bucket and the prefix, and a plain http:// endpoint just works."""
    for name, value in s3_environment(s3_server).items():
        monkeypatch.setenv(name, value)
    bucket = create_bucket(s3_server, "from-the-environment")
    storage = from_url("s3://from-the-environment/some/prefix")
    assert storage.url == "s3://from-the-environment/some/prefix"
    storage.write_bytes("k", b"v")
    assert [meta["path"] for meta in bucket.list()] == ["some/prefix/k"]
    assert storage.location("k") == "s3://from-the-environment/some/prefix/k"
