"""What serve keeps in memory does not grow with the uploads and batches it has seen."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchtrack._http import _CACHED_BODIES, _CACHED_BYTES, _ENTRY_BYTES, BodyCache
from batchtrack.files.base import FileStorage, FileWriter
from batchtrack.files.local import LocalFiles
from batchtrack.uploads import UploadStore


class Clock:
    """A clock that tests move by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingScandir:
    """os.scandir, counting the entries its iterators have handed out."""

    def __init__(self) -> None:
        self.real = os.scandir
        self.handed = 0

    def __call__(self, path: Any = ".") -> Any:
        outer = self

        class Wrapped:
            def __init__(self) -> None:
                self.inner = outer.real(path)

            def __iter__(self) -> Wrapped:
                return self

            def __next__(self) -> os.DirEntry[str]:
                entry = next(self.inner)
                outer.handed += 1
                return entry

            def __enter__(self) -> Wrapped:
                return self

            def __exit__(self, *exc: object) -> None:
                self.inner.close()

            def close(self) -> None:
                self.inner.close()

        return Wrapped()


class Recording(FileStorage):
    """A LocalFiles that records, in order, the sidecars it reads and the files it deletes."""

    def __init__(self, inner: LocalFiles) -> None:
        self.inner = inner
        self.url = inner.url
        self.events: list[tuple[str, str]] = []

    def writer(self, key: str) -> FileWriter:
        return self.inner.writer(key)

    def open(self, key: str) -> Any:
        if key.endswith(".json"):
            self.events.append(("read", key))
        return self.inner.open(key)

    def size(self, key: str) -> int | None:
        return self.inner.size(key)

    def delete(self, key: str) -> bool:
        self.events.append(("delete", key))
        return self.inner.delete(key)

    def list(self, prefix: str = "") -> Iterator[Any]:
        return self.inner.list(prefix)

    def local_path(self, key: str) -> Path | None:
        return self.inner.local_path(key)


def _fill(store: UploadStore, count: int) -> None:
    for n in range(count):
        store.save(f"f{n}.jpg", io.BytesIO(b"x" * 10))


def test_status_body_cache_never_holds_more_than_its_cap() -> None:
    """Thousands of big status bodies never make the cache hold more bytes than its cap."""
    cache = BodyCache(1_000_000)
    body = b"x" * 30_000
    for n in range(5_000):
        cache.put(f"batch-{n}", f'"{n}.1.-"', body)
        assert cache.held <= 1_000_000
    assert 0 < len(cache) <= 1_000_000 // 30_000
    assert cache.get("batch-4999") == ('"4999.1.-"', body)
    assert cache.get("batch-0") is None


def test_status_body_cache_drops_the_least_recently_used_first() -> None:
    """A body read again outlives bodies stored after it but not read since."""
    cache = BodyCache(3 * (102 + _ENTRY_BYTES))
    for key in ("a", "b", "c"):
        cache.put(key, "t", b"x" * 100)
    assert cache.get("a") is not None
    cache.put("d", "t", b"x" * 100)
    assert cache.get("b") is None
    assert cache.get("a") is not None
    assert cache.get("d") is not None


def test_status_body_cache_replacing_a_body_counts_only_the_new_one() -> None:
    """Storing a batch's body again replaces its bytes in the count instead of adding."""
    cache = BodyCache(10_000)
    for version in range(100):
        cache.put("batch", f'"{version}"', b"x" * 1_000)
    assert len(cache) == 1
    assert cache.held == len("batch") + len('"99"') + 1_000 + _ENTRY_BYTES


def test_status_body_cache_of_the_api_is_capped_at_eight_megabytes() -> None:
    """The API's status-body cache holds at most 8 MB of big bodies, and 2,048 small ones."""
    assert _CACHED_BYTES == 8 * 2**20
    cache = BodyCache(_CACHED_BYTES)
    for n in range(2_048):
        cache.put(f"{n:036d}", '"1.2.3-4"', b"x" * 32 * 1024)
        assert cache.held <= _CACHED_BYTES
    assert len(cache) < 2_048
    for n in range(10_000):
        cache.put(f"small-{n}", '"1.2.3-4"', b"x" * 100)
    assert len(cache) == _CACHED_BODIES


def test_local_listing_streams_a_big_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first file of a listing arrives before the folder's other entries are read."""
    storage = LocalFiles(tmp_path)
    folder = tmp_path / "uploads"
    folder.mkdir()
    for n in range(2_000):
        (folder / f"f{n:05d}").write_bytes(b"x")
    counting = CountingScandir()
    monkeypatch.setattr(os, "scandir", counting)
    listing = storage.list("uploads/")
    first = next(listing)
    assert first.key.startswith("uploads/f")
    assert counting.handed < 100
    listing.close()
    assert sum(1 for _ in storage.list("uploads/")) == 2_000


def test_sweep_partial_deletes_before_reading_the_whole_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sweeping deletes a leftover before it has read every entry of a big folder."""
    storage = LocalFiles(tmp_path)
    folder = tmp_path / "up"
    folder.mkdir()
    old = time.time() - 7200
    for n in range(400):
        (folder / f"f{n:04d}").write_bytes(b"x")
    for n in range(200):
        part = folder / f".batchtrack-{n:04d}.part"
        part.write_bytes(b"x")
        os.utime(part, (old, old))
    counting = CountingScandir()
    monkeypatch.setattr(os, "scandir", counting)
    seen_at_first_unlink: list[int] = []
    real_unlink = os.unlink

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        seen_at_first_unlink.append(counting.handed)
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    assert storage.sweep_partial("up/", 3600) == 200
    assert seen_at_first_unlink[0] < 600


def test_sweep_partial_still_finds_leftovers_at_any_depth(tmp_path: Path) -> None:
    """Sweeping removes old partial files in nested and dotted folders, and nothing else."""
    storage = LocalFiles(tmp_path)
    old = time.time() - 7200
    leftovers = [
        tmp_path / "up" / ".batchtrack-a.part",
        tmp_path / "up" / "deep" / ".batchtrack-b.part",
        tmp_path / "up" / ".hidden" / ".batchtrack-c.part",
    ]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (old, old))
    fresh = tmp_path / "up" / ".batchtrack-new.part"
    fresh.write_bytes(b"x")
    kept = tmp_path / "up" / "file.part"
    kept.write_bytes(b"x")
    os.utime(kept, (old, old))
    assert storage.sweep_partial("up/", 3600) == 3
    assert not any(path.exists() for path in leftovers)
    assert fresh.exists()
    assert kept.exists()


def test_upload_scan_reads_sidecars_one_at_a_time(tmp_path: Path) -> None:
    """Scanning uploads reads a sidecar only when its upload is asked for, not all upfront."""
    storage = Recording(LocalFiles(tmp_path))
    store = UploadStore(storage, clock=Clock(), min_free_bytes=0)
    _fill(store, 50)
    storage.events.clear()
    scan = store._scan()
    next(scan)
    assert [kind for kind, _ in storage.events] == ["read"]
    scan.close()


def test_upload_cleanup_deletes_while_it_reads(tmp_path: Path) -> None:
    """Cleanup deletes expired uploads as it reads their sidecars, not after reading them all."""
    clock = Clock()
    storage = Recording(LocalFiles(tmp_path))
    store = UploadStore(storage, clock=clock, ttl=60, min_free_bytes=0)
    _fill(store, 50)
    clock.now += 3600
    storage.events.clear()
    assert store.cleanup() == 50
    kinds = [kind for kind, _ in storage.events]
    assert kinds.count("read") == 50
    assert kinds.index("delete") < len(kinds) - 1 - kinds[::-1].index("read")
    assert store.used_bytes == 0
    assert list(storage.list()) == []


def test_upload_cleanup_keeps_live_uploads_and_their_total(tmp_path: Path) -> None:
    """A streamed cleanup deletes only expired uploads and recounts the live ones' bytes."""
    clock = Clock()
    store = UploadStore(LocalFiles(tmp_path), clock=clock, ttl=100, min_free_bytes=0)
    _fill(store, 30)
    clock.now += 60
    _fill(store, 20)
    clock.now += 60
    assert store.cleanup() == 30
    assert store.used_bytes == 20 * 10
    assert len(list(store._scan())) == 20


def test_upload_cleanup_updates_the_index_in_place(tmp_path: Path) -> None:
    """Cleanup recounts into the existing upload index instead of building copies of it."""
    clock = Clock()
    store = UploadStore(LocalFiles(tmp_path), clock=clock, ttl=100, min_free_bytes=0)
    _fill(store, 20)
    index = store._files
    other = UploadStore(LocalFiles(tmp_path), clock=clock, ttl=100, min_free_bytes=0)
    clock.now += 1
    _fill(other, 5)  # another process's uploads, taken in by the scan
    assert store.cleanup() == 0
    assert store._files is index
    assert len(index) == 25
    assert store.used_bytes == 25 * 10
    times = [created_at for created_at, _ in index.values()]
    assert times == sorted(times)


def test_serve_trims_malloc_after_its_maintenance_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve's maintenance loop gives freed heap back to the system after each round."""
    import threading

    from batchtrack import _demo

    trimmed = threading.Event()
    monkeypatch.setattr(_demo, "trim_malloc", trimmed.set)
    _app, close = _demo.build(tmp_path, concurrency=1)
    try:
        assert trimmed.wait(30)  # the results sweep runs a second after start
    finally:
        close()


def test_trim_malloc_runs_on_glibc() -> None:
    """trim_malloc calls glibc's malloc_trim where there is one, and is a no-op elsewhere."""
    import platform

    from batchtrack._demo import trim_malloc

    assert trim_malloc() is (platform.libc_ver()[0] == "glibc")


def test_upload_cleanup_holds_no_object_per_live_upload(tmp_path: Path) -> None:
    """Cleanup of thousands of live uploads tallies them in bytes, not in Python objects."""
    import tracemalloc

    count = 8_000
    store = UploadStore(LocalFiles(tmp_path), min_free_bytes=0)
    _fill(store, count)
    tracemalloc.start()
    try:
        assert store.cleanup() == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 500_000 + 50 * count  # a dict entry per upload costs ~300 B
    assert store.used_bytes == count * 10
    assert len(store._files) == count


def test_upload_cleanup_takes_in_and_drops_what_other_processes_did(tmp_path: Path) -> None:
    """The streamed recount adds another process's uploads and drops those it deleted."""
    clock = Clock()
    store = UploadStore(LocalFiles(tmp_path), clock=clock, min_free_bytes=0)
    _fill(store, 10)
    other = UploadStore(LocalFiles(tmp_path), clock=clock, min_free_bytes=0)
    for file_id in list(store._files)[:3]:
        other.delete(file_id)
    other.save("new.jpg", io.BytesIO(b"y" * 7))
    assert store.cleanup() == 0
    assert len(store._files) == 8
    assert store.used_bytes == 7 * 10 + 7
