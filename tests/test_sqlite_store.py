"""SQLiteStore on real files: processes sharing one file, crashes, reopening, bad files."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchtrack import BatchTracker, SQLiteStore, Status, StoreError, ValidationError
from batchtrack.stores import sqlite as sqlite_module
from batchtrack.stores.sqlite import SCHEMA_VERSION, SchemaVersionError
from batchtrack.testing import FakeClock

WORKER = textwrap.dedent(
    """
    import sys
    from batchtrack import BatchTracker, InvalidTransition, SQLiteStore

    path, batch_id, mode, *item_ids = sys.argv[1:]
    tracker = BatchTracker(SQLiteStore(path))
    for item_id in item_ids:
        try:
            if not tracker.start_item(batch_id, item_id).changed:
                continue  # another process has it
            if mode == "fail":
                event = tracker.fail_item(batch_id, item_id, "worker says no")
            else:
                event = tracker.complete_item(batch_id, item_id)
        except InvalidTransition:
            continue  # another process finished it already
        if event.changed:
            print(item_id, flush=True)
        if mode == "slow":
            import time; time.sleep(0.005)
    """
)


def _recount(path: Path, batch_id: str) -> dict[str, int]:
    db = sqlite3.connect(path)
    try:
        rows = db.execute(
            "SELECT i.status, count(*) FROM items i JOIN batches b ON b.key = i.batch_key"
            " WHERE b.batch_id = ? GROUP BY i.status",
            (batch_id,),
        ).fetchall()
        return {sqlite_module._STATUSES[code].value: n for code, n in rows}
    finally:
        db.close()


def _worker(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    script = tmp_path / "worker.py"
    if not script.exists():
        script.write_text(WORKER)
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True)


def test_processes_sharing_one_file_count_exactly(tmp_path: Path) -> None:
    """4 processes racing over every item of one batch: each transition applies once."""
    path = tmp_path / "shared.db"
    tracker = BatchTracker(SQLiteStore(path))
    snap = tracker.create_batch([f"{i}.jpg" for i in range(400)])
    ids = [item.id for item in snap.items]
    procs = [
        # Each process walks all items from a different starting point, so they collide.
        _worker(
            tmp_path,
            str(path),
            snap.batch_id,
            "fail" if n == 3 else "ok",
            *(ids[n * 100 :] + ids[: n * 100]),
        )
        for n in range(4)
    ]
    finished: list[list[str]] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        finished.append(out.split())
    # Every item was finished by exactly one process, whichever got to it first.
    assert sorted(i for per in finished for i in per) == sorted(ids)
    final = tracker.get(snap.batch_id)
    assert final.version == 800
    assert final.progress.failed == len(finished[3])  # the failing worker's items, no more
    assert final.progress.completed == 400 - len(finished[3])
    status = {item.id: item.status for item in final.items}
    assert all(status[i] is Status.FAILED for i in finished[3])
    recount = _recount(path, snap.batch_id)
    assert recount.get("completed", 0) == final.progress.completed
    assert recount.get("failed", 0) == final.progress.failed


def test_sigkill_mid_batch_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """A worker killed with SIGKILL leaves every returned transition, and no torn counts."""
    path = tmp_path / "crash.db"
    tracker = BatchTracker(SQLiteStore(path))
    snap = tracker.create_batch([f"{i}.jpg" for i in range(2000)])
    tracker.store.close()
    proc = _worker(tmp_path, str(path), snap.batch_id, "slow", *(i.id for i in snap.items))
    assert proc.stdout is not None
    acknowledged = [proc.stdout.readline().strip() for _ in range(50)]
    proc.send_signal(signal.SIGKILL)
    rest, _ = proc.communicate(timeout=30)
    acknowledged += rest.split()
    assert proc.returncode == -signal.SIGKILL

    reopened = BatchTracker(SQLiteStore(path))
    final = reopened.get(snap.batch_id)
    by_id = {item.id: item for item in final.items}
    assert all(by_id[i].status is Status.COMPLETED for i in acknowledged)
    assert final.progress.completed >= len(acknowledged)
    assert final.progress.completed < 2000  # it really was killed mid-batch
    recount = _recount(path, snap.batch_id)
    p = final.progress
    assert (
        recount.get("completed", 0),
        recount.get("processing", 0),
        recount.get("pending", 0),
    ) == (
        p.completed,
        p.processing,
        p.pending,
    )
    assert p.total == p.completed + p.failed + p.processing + p.pending


def test_reopen_after_close_keeps_everything(tmp_path: Path) -> None:
    """Batches, items, errors, timestamps, owners and ETA state survive close and reopen."""
    path = tmp_path / "keep.db"
    clock = FakeClock()
    with SQLiteStore(path) as store:
        tracker = BatchTracker(store, clock=clock)
        snap = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg"), ("c", "c.jpg")], owner="alice")
        tracker.start_item(snap.batch_id, "a")
        clock.advance(3)
        tracker.complete_item(snap.batch_id, "a")
        tracker.fail_item(snap.batch_id, "b", "not an image")
        before = tracker.get(snap.batch_id, owner="alice")
    with SQLiteStore(path) as store:
        after = BatchTracker(store, clock=clock).get(snap.batch_id, owner="alice")
    assert after == before
    assert after.items[1].error == "not an image"


def test_opening_a_newer_schema_fails_and_changes_nothing(tmp_path: Path) -> None:
    """A file with a newer schema version raises SchemaVersionError and is left untouched."""
    path = tmp_path / "future.db"
    SQLiteStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    before = path.read_bytes()
    with pytest.raises(SchemaVersionError, match="newer batchtrack"):
        SQLiteStore(path)
    assert path.read_bytes() == before


V1_FILE = Path(__file__).parent / "data" / "schema_v1.db"
"""A database written by batchtrack 0.1.0 (schema 1): one batch owned by "session:abc"
with three items, the first completed, the second processing, the third pending."""
V1_BATCH = "403c15cc-58ee-4980-95e7-c870b78fbfcb"
V1_CLOCK = 1764064800.0


def test_a_schema_1_file_migrates_in_place_and_keeps_its_batches(tmp_path: Path) -> None:
    """A file from the previous release opens, moves to the current schema, loses nothing."""
    path = tmp_path / "old.db"
    path.write_bytes(V1_FILE.read_bytes())
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    store = SQLiteStore(path)
    try:
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 7
        clock = FakeClock(V1_CLOCK + 10)
        tracker = BatchTracker(store, clock=clock, lease=5.0)
        snap = tracker.get(V1_BATCH, owner="session:abc")
        assert [i.status for i in snap.items] == [
            Status.COMPLETED,
            Status.PROCESSING,
            Status.PENDING,
        ]
        # The item a 0.1.0 worker was running counts as started once, leased for
        # LEGACY_LEASE from its start, so a worker lost in the upgrade is noticed too.
        assert [(i.attempts, i.source) for i in snap.items] == [(0, None), (1, None), (0, None)]
        assert snap.version == 3
        # When its items changed is unknown: all count as changed at the batch's version,
        # so a reader of what changed since an older version misses nothing.
        assert len(tracker.get(V1_BATCH, since=2).items) == 3
        assert tracker.get(V1_BATCH, since=3).items == ()
        assert [i.id for i in tracker.get(V1_BATCH, status="pending").items] == [snap.items[2].id]
        assert tracker.reclaim() == 0
        third = snap.items[2].id
        tracker.start_item(V1_BATCH, third)
        clock.advance(6)
        assert tracker.reclaim_items() == [(V1_BATCH, third, Status.PENDING)]
        clock.advance(V1_CLOCK + sqlite_module.LEGACY_LEASE - clock())
        second = snap.items[1].id
        assert tracker.reclaim_items() == [(V1_BATCH, second, Status.PENDING)]
        # Schema 4's paused flag: an old batch is not paused, and can be.
        assert tracker.get(V1_BATCH).status is Status.PROCESSING
        assert tracker.pause(V1_BATCH)
        assert tracker.get(V1_BATCH).status is Status.PAUSED
    finally:
        store.close()
    # Opening it again finds the current schema and migrates nothing twice.
    SQLiteStore(path).close()


def test_a_new_file_gets_the_current_schema_in_wal_mode(tmp_path: Path) -> None:
    """Opening a missing file creates it with the schema, user_version and WAL mode."""
    path = tmp_path / "new.db"
    SQLiteStore(path).close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"batches", "items"} <= tables
    finally:
        db.close()


def test_a_new_file_gets_small_pages_and_an_old_file_keeps_its_own(tmp_path: Path) -> None:
    """New files use 2048-byte pages (cheaper events); a file made with 4096 keeps them."""
    old = tmp_path / "old.db"
    made = sqlite3.connect(old)
    made.execute("CREATE TABLE before_batchtrack (a)")
    made.commit()
    made.close()
    for path in (tmp_path / "new.db", old):
        tracker = BatchTracker(SQLiteStore(path))
        snap = tracker.create_batch(["a.jpg"])
        tracker.complete_item(
            snap.batch_id, tracker.start_item(snap.batch_id, snap.items[0].id).item.id
        )
        tracker.store.close()
    sizes = [
        sqlite3.connect(path).execute("PRAGMA page_size").fetchone()[0]
        for path in (tmp_path / "new.db", old)
    ]
    assert sizes == [sqlite_module.PAGE_SIZE, 4096]
    assert sqlite_module.PAGE_SIZE == 2048


@pytest.mark.parametrize(("setting", "expected"), [("NORMAL", 1), ("full", 2)])
def test_synchronous_setting_is_applied(tmp_path: Path, setting: str, expected: int) -> None:
    """synchronous= is applied to every connection (NORMAL by default, FULL on request)."""
    store = SQLiteStore(tmp_path / "s.db", synchronous=setting)
    try:
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == expected
    finally:
        store.close()


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    """A non-database file raises StoreError and is not modified."""
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are my notes, not a database\n" * 200)
    before = path.read_bytes()
    with pytest.raises(StoreError, match=r"not a usable SQLite database|cannot prepare"):
        SQLiteStore(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_corrupt_database_is_refused(tmp_path: Path) -> None:
    """A database whose pages were overwritten raises StoreError on open or first use."""
    path = tmp_path / "corrupt.db"
    with SQLiteStore(path) as store:
        tracker = BatchTracker(store)
        snap = tracker.create_batch([f"{i}.jpg" for i in range(300)])
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # the schema page
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError):
        BatchTracker(SQLiteStore(path)).get(snap.batch_id)


def test_a_missing_folder_is_created_with_its_parents(tmp_path: Path) -> None:
    """Pasted into an empty folder, ``SQLiteStore("data/batches.db")`` just works."""
    path = tmp_path / "no" / "such" / "dir" / "x.db"
    with SQLiteStore(path) as store:
        tracker = BatchTracker(store)
        batch_id = tracker.create_batch(["a.jpg"]).batch_id
    assert path.is_file()
    with SQLiteStore(path) as store:
        assert BatchTracker(store).get(batch_id).progress.total == 1


def test_a_folder_that_cannot_be_created_is_refused(tmp_path: Path) -> None:
    """A file where a folder should be raises StoreError naming the database."""
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StoreError, match="cannot create the folder of"):
        SQLiteStore(tmp_path / "file" / "x.db")


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder this process cannot create files in.

    Root writes through permission bits, so as root the folder is made immutable
    (``chattr +i``) instead.
    """
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False).returncode:
        pytest.skip("cannot make a read-only folder as root here (chattr +i failed)")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_read_only_folder_is_refused(read_only_folder: Path) -> None:
    """A path in a folder the process may not write raises StoreError and writes nothing."""
    with pytest.raises(StoreError, match="cannot open"):
        SQLiteStore(read_only_folder / "x.db")
    assert list(read_only_folder.iterdir()) == []


def test_a_read_only_file_is_refused_on_write(tmp_path: Path) -> None:
    """A database opened read-only (immutable flag) fails writes with StoreError."""
    path = tmp_path / "ro.db"
    SQLiteStore(path).close()
    store = SQLiteStore(path)
    store._db.execute("PRAGMA query_only = ON")
    tracker = BatchTracker(store)
    with pytest.raises(StoreError, match="cannot write"):
        tracker.create_batch(["a.jpg"])
    store.close()


@pytest.mark.parametrize("path", ["", ":memory:", 42, None])
def test_paths_that_name_no_file_are_rejected(path: object) -> None:
    """'' and ':memory:' (one database per connection) and non-paths are refused."""
    with pytest.raises(ValidationError, match="file path"):
        SQLiteStore(path)  # type: ignore[arg-type]


def test_bad_settings_are_rejected(tmp_path: Path) -> None:
    """An unknown synchronous level or a non-positive timeout is refused before opening."""
    with pytest.raises(ValidationError, match="synchronous"):
        SQLiteStore(tmp_path / "x.db", synchronous="SOMETIMES")
    with pytest.raises(ValidationError, match="timeout"):
        SQLiteStore(tmp_path / "x.db", timeout=0)
    assert list(tmp_path.iterdir()) == []


def test_a_closed_store_says_so(tmp_path: Path) -> None:
    """Using a store after close() raises StoreError, from any thread."""
    store = SQLiteStore(tmp_path / "x.db")
    tracker = BatchTracker(store)
    store.close()
    store.close()  # twice is fine
    import threading

    errors: list[BaseException] = []

    def use() -> None:
        try:
            tracker.create_batch(["a.jpg"])
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=use)
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert isinstance(errors[0], StoreError)
    assert "closed" in str(errors[0])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connection(tmp_path: Path) -> None:
    """After fork the child works through a connection of its own; the parent carries on."""
    path = tmp_path / "fork.db"
    store = SQLiteStore(path)
    tracker = BatchTracker(store)
    snap = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")])
    tracker.start_item(snap.batch_id, "a")  # the parent's connection exists before fork
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            tracker.complete_item(snap.batch_id, "a")
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    tracker.start_item(snap.batch_id, "b")
    final = tracker.get(snap.batch_id)
    assert [i.status for i in final.items] == [Status.COMPLETED, Status.PROCESSING]
    store.close()


def test_purge_works_in_bounded_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """purge_expired removes more batches than one chunk holds, in several transactions."""
    monkeypatch.setattr(sqlite_module, "PURGE_CHUNK", 7)
    clock = FakeClock()
    with SQLiteStore(tmp_path / "p.db") as store:
        tracker = BatchTracker(store, clock=clock)
        for n in range(23):
            tracker.create_batch([f"{n}.jpg"])
        keep = tracker.create_batch(["keep.jpg"])
        clock.advance(24 * 3600 - 1)
        tracker.start_item(keep.batch_id, keep.items[0].id)
        clock.advance(1)
        assert tracker.cleanup() == 23
        assert tracker.get(keep.batch_id).progress.processing == 1
        assert store._db.execute("SELECT count(*) FROM items").fetchone()[0] == 1


def test_status_is_readable_while_another_process_writes(tmp_path: Path) -> None:
    """A reader sees consistent snapshots while another process is completing items."""
    path = tmp_path / "live.db"
    tracker = BatchTracker(SQLiteStore(path))
    snap = tracker.create_batch([f"{i}.jpg" for i in range(300)])
    proc = _worker(tmp_path, str(path), snap.batch_id, "slow", *(i.id for i in snap.items))
    seen: list[int] = []
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        body = json.loads(json.dumps(tracker.get(snap.batch_id).to_dict()))
        p = body["progress"]
        assert p["total"] == p["completed"] + p["failed"] + p["processing"] + p["pending"]
        assert sum(1 for i in body["images"] if i["status"] == "completed") == p["completed"]
        seen.append(p["completed"])
        time.sleep(0.01)
    proc.communicate(timeout=60)
    assert seen == sorted(seen)  # progress never goes backwards
    assert tracker.get(snap.batch_id).progress.completed == 300


RECLAIMER = textwrap.dedent(
    """
    import sys, time
    from batchtrack import BatchTracker, SQLiteStore

    path, at = sys.argv[1], float(sys.argv[2])
    tracker = BatchTracker(SQLiteStore(path), clock=lambda: at, lease=5.0, max_attempts=2)
    while time.time() < float(sys.argv[3]):  # start together
        time.sleep(0.001)
    for batch_id, item_id, status in tracker.reclaim_items():
        print(batch_id, item_id, status.value, flush=True)
    """
)


def test_processes_reclaiming_at_once_move_each_lost_item_once(tmp_path: Path) -> None:
    """4 processes reclaiming one file at the same moment: every lost item moves once."""
    path = tmp_path / "shared.db"
    clock = FakeClock()
    tracker = BatchTracker(SQLiteStore(path), clock=clock, lease=5.0, max_attempts=2)
    batches = [tracker.create_batch([f"{i}.jpg" for i in range(150)]) for _ in range(2)]
    for snap in batches:
        for item in snap.items[:100]:
            tracker.start_item(snap.batch_id, item.id)
    # Half of the first batch's running items finish in time; the other 150 are lost.
    for item in batches[0].items[:50]:
        tracker.complete_item(batches[0].batch_id, item.id)
    script = tmp_path / "reclaimer.py"
    script.write_text(RECLAIMER)
    at = clock() + 6
    go = time.time() + 1.0
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(path), repr(at), repr(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    moved: list[str] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        moved += out.splitlines()
    assert len(moved) == len(set(moved)) == 150  # 50 + 100 lost items, each moved once
    first = tracker.get(batches[0].batch_id)
    assert (first.progress.completed, first.progress.pending) == (50, 100)
    assert tracker.get(batches[1].batch_id).progress.pending == 150


def test_a_relative_path_names_one_file_whatever_the_folder_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative path is the file in the folder the store was made in, also for a thread
    that opens its connection after the process changed folder."""
    import threading

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    tracker = BatchTracker(SQLiteStore("batches.db"))
    snap = tracker.create_batch(["x.jpg"])
    monkeypatch.chdir(tmp_path / "b")
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(tracker.get(snap.batch_id).progress.total))
    thread.start()
    thread.join()
    assert seen == [1]
    assert not (tmp_path / "b" / "batches.db").exists()


def test_item_snapshots_are_kept_for_the_batches_read_last_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-process memo of item snapshots holds a bounded number of batches, newest kept."""
    monkeypatch.setattr(sqlite_module, "_ITEMS_MEMO_BATCHES", 5)
    store = SQLiteStore(tmp_path / "b.db")
    tracker = BatchTracker(store)
    try:
        batches = [tracker.create_batch([f"{n}.jpg"]).batch_id for n in range(8)]
        for batch_id in batches:
            assert len(tracker.get(batch_id).items) == 1
        held = {identity[1] for identity in store._items_memo}
        assert held == set(batches[-5:])
        # A batch whose snapshots were dropped reads whole again.
        assert tracker.get(batches[0]).items[0].filename == "0.jpg"
    finally:
        store.close()


def test_a_schema_5_file_gains_the_outbox_and_ends_batches_into_it(tmp_path: Path) -> None:
    """A schema-5 file (no outbox) migrates to 6, keeps its batch, and the batch's end
    writes an end marker there."""
    path = tmp_path / "old.db"
    store = SQLiteStore(path)
    batch_id = BatchTracker(store).create_batch([("a", "a.jpg")]).batch_id
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE outbox")
        db.execute("DROP TABLE webhooks_gone")
        db.execute("DROP TABLE batch_metadata")
        db.execute("DROP INDEX batches_by_owner")
        db.execute("DROP INDEX batches_by_time")
        db.execute("PRAGMA user_version = 5")
    store = SQLiteStore(path)
    try:
        tracker = BatchTracker(store)
        tracker.start_item(batch_id, "a")
        tracker.complete_item(batch_id, "a")
        [marker] = store.outbox_claim(tracker.clock(), 10, tracker.clock() + 60)
        assert (marker.batch_id, marker.version) == (batch_id, 2)
        store.outbox_unsubscribe("http://gone.example/")
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("SELECT url FROM webhooks_gone").fetchall() == [("http://gone.example/",)]
