"""Damaged SQLite files are refused with one clear error, and SQLiteStore takes only paths
and sqlite:/// URLs."""

from __future__ import annotations

import logging
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

import batchtrack.stores.sqlite as sqlite_module
from batchtrack import BatchTracker, SQLiteStore, StoreError, ValidationError
from batchtrack.exceptions import DatabaseDamaged
from batchtrack.stores import from_url
from http_support import Service, free_port

BATCHES = 30
ITEMS = 200
OWNER = "tester"


def _database(path: Path) -> list[str]:
    """A database of BATCHES batches of ITEMS items (ids "0", "1", ...) of OWNER at
    ``path``; their ids, oldest first."""
    with SQLiteStore(path) as store:
        tracker = BatchTracker(store)
        ids = [
            tracker.create_batch(
                [(str(i), f"{b}-{i}.jpg") for i in range(ITEMS)], owner=OWNER
            ).batch_id
            for b in range(BATCHES)
        ]
    assert not Path(f"{path}-wal").exists()  # everything is in the file itself
    return ids


def _cut_tail(path: Path, size: int = 1000) -> None:
    os.truncate(path, path.stat().st_size - size)


def _garbage_in_middle(path: Path) -> None:
    """Overwrite a fifth of the file's pages, from a third of the way in, with noise."""
    size = path.stat().st_size
    start = (size // 3) // 4096 * 4096
    with path.open("r+b") as f:
        f.seek(start)
        f.write(random.Random(23).randbytes(size // 5))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-m", "batchtrack", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


# -- refused at open -------------------------------------------------------------------


def test_a_file_cut_short_is_refused_at_open_and_kept_untouched(tmp_path: Path) -> None:
    """A file whose last 1,000 bytes are gone raises DatabaseDamaged and is not written to."""
    path = tmp_path / "b.db"
    _database(path)
    _cut_tail(path)
    before = path.read_bytes()
    with pytest.raises(DatabaseDamaged) as caught:
        SQLiteStore(path)
    assert path.read_bytes() == before
    assert isinstance(caught.value, StoreError)
    assert caught.value.path == path


def test_garbage_pages_in_the_middle_are_refused_at_open(tmp_path: Path) -> None:
    """A file with overwritten pages in the middle raises DatabaseDamaged, unchanged."""
    path = tmp_path / "b.db"
    _database(path)
    _garbage_in_middle(path)
    before = path.read_bytes()
    with pytest.raises(DatabaseDamaged):
        SQLiteStore(path)
    assert path.read_bytes() == before


def test_the_damage_message_says_kept_and_how_to_recover(tmp_path: Path) -> None:
    """The message is one line: the file is damaged, kept untouched, and how to recover."""
    path = tmp_path / "my data" / "b.db"
    _database(path)
    _cut_tail(path)
    with pytest.raises(DatabaseDamaged) as caught:
        SQLiteStore(path)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{path} is damaged (" in message
    assert "kept untouched" in message
    recovered = tmp_path / "my data" / "b-recovered.db"
    assert f"sqlite3 '{path}' .recover | sqlite3 '{recovered}'" in message
    assert "move it aside" in message


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="no sqlite3 command")
def test_the_recovery_the_docs_give_brings_back_a_usable_file(tmp_path: Path) -> None:
    """On a file cut short, `.recover` (or `.dump` and the schema version, where sqlite3
    lacks `.recover`) makes a file SQLiteStore opens, with the first batches whole."""
    path = tmp_path / "b.db"
    ids = _database(path)
    _cut_tail(path)
    recovered = tmp_path / "b-recovered.db"
    shell = f"sqlite3 {path} .recover | sqlite3 {recovered}"
    done = subprocess.run(shell, shell=True, capture_output=True, text=True, timeout=60)
    if "error" in done.stderr:  # an sqlite3 built without .recover's sqlite_dbpage
        recovered.unlink()
        shell = f"sqlite3 {path} .dump | sqlite3 {recovered}"
        subprocess.run(shell, shell=True, capture_output=True, timeout=60)
        subprocess.run(
            ["sqlite3", str(recovered), f"PRAGMA user_version = {sqlite_module.SCHEMA_VERSION}"],
            check=True,
        )
    with SQLiteStore(recovered) as store:
        tracker = BatchTracker(store)
        assert tracker.get(ids[0]).progress.total == ITEMS
        tracker.create_batch(["new.jpg"])


def test_a_database_missing_a_table_is_refused_at_open(tmp_path: Path) -> None:
    """A current-schema file without its items table raises DatabaseDamaged naming it."""
    path = tmp_path / "b.db"
    _database(path)
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE items")
    db.close()
    with pytest.raises(DatabaseDamaged, match="the table items is missing"):
        SQLiteStore(path)


def test_a_whole_file_still_opens_with_its_batches(tmp_path: Path) -> None:
    """The check passes an undamaged file of many batches, which then reads as before."""
    path = tmp_path / "b.db"
    ids = _database(path)
    with SQLiteStore(path) as store:
        snap = BatchTracker(store).get(ids[-1])
    assert snap.progress.total == ITEMS


def test_a_file_is_checked_once_per_process_by_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight threads opening one file at once make one check, and later opens none."""
    path = tmp_path / "b.db"
    _database(path)
    calls = []
    examine = sqlite_module._examine

    def counted(*args: object) -> tuple[bool, str | None]:
        calls.append(threading.get_ident())
        return examine(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(sqlite_module, "_examine", counted)
    start = threading.Barrier(8)
    stores: list[SQLiteStore] = []

    def open_one() -> None:
        start.wait()
        stores.append(SQLiteStore(path))

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    SQLiteStore(path).close()
    for store in stores:
        store.close()
    assert len(stores) == 8
    assert len(calls) == 1


def test_checks_while_another_connection_writes_find_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opens checked while a writer moves items (each check forgotten, so each runs
    again) pass: the check reads one consistent snapshot and does not block the writer."""
    path = tmp_path / "b.db"
    ids = _database(path)
    writer = SQLiteStore(path)
    tracker = BatchTracker(writer)
    stop = threading.Event()
    moved = []

    def write() -> None:
        for batch_id in ids:
            for n in range(ITEMS):
                if stop.is_set():
                    return
                tracker.start_item(batch_id, str(n))
                moved.append(n)

    thread = threading.Thread(target=write)
    thread.start()
    try:
        for _ in range(20):
            monkeypatch.setattr(sqlite_module, "_checked", set())
            SQLiteStore(path).close()
    finally:
        stop.set()
        thread.join()
        writer.close()
    assert moved


# -- damage met later ------------------------------------------------------------------


def _trusted_damaged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[str]]:
    """A file cut short that opens: its check is given no time, as a very big file's
    check runs out of it, so the damage is met at run time."""
    monkeypatch.setattr(sqlite_module, "CHECK_SECONDS", 0.0)
    path = tmp_path / "b.db"
    ids = _database(path)
    _cut_tail(path)
    return path, ids


def _reads_of_every_batch(store: SQLiteStore, ids: list[str]) -> list[BaseException]:
    tracker = BatchTracker(store)
    errors = []
    for batch_id in ids:
        try:
            tracker.get(batch_id)
        except Exception as exc:
            errors.append(exc)
    return errors


def test_damage_met_at_run_time_is_the_same_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading pages the check did not reach raises DatabaseDamaged, not a bare sqlite3
    error, a generic StoreError or "not found"."""
    path, ids = _trusted_damaged(tmp_path, monkeypatch)
    with SQLiteStore(path) as store:
        errors = _reads_of_every_batch(store, ids)
    assert errors
    assert all(isinstance(e, DatabaseDamaged) for e in errors), errors
    assert "kept untouched" in str(errors[0])


def test_damage_met_by_a_write_is_the_same_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting items on pages overwritten with garbage, in a file opened without its
    check, raises DatabaseDamaged (before any other error)."""
    path = tmp_path / "b.db"
    ids = _database(path)
    _garbage_in_middle(path)
    monkeypatch.setattr(sqlite_module, "_examine", lambda path, timeout: (True, None))

    def start_every_item() -> None:
        tracker = BatchTracker(store)
        for batch_id in ids:
            for n in range(ITEMS):
                tracker.start_item(batch_id, str(n))

    with SQLiteStore(path) as store, pytest.raises(DatabaseDamaged):
        start_every_item()


def test_http_answers_damage_with_503_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the WSGI app, a batch on a damaged page is 503 store_unavailable (never 404
    or 500) saying the store needs repair, and the log says the file is damaged."""
    path, ids = _trusted_damaged(tmp_path, monkeypatch)
    service = Service(tmp_path / "svc", store=SQLiteStore(path), owner=lambda _: OWNER)
    transport = httpx.WSGITransport(app=service.wsgi)
    answers = {}
    try:
        with (
            caplog.at_level(logging.WARNING, logger="batchtrack"),
            httpx.Client(transport=transport, base_url="http://testserver") as client,
        ):
            for batch_id in ids:
                answers[batch_id] = client.get(f"/api/batch-status/{batch_id}")
    finally:
        service.close()
        service.tracker.store.close()
    statuses = {r.status_code for r in answers.values()}
    assert statuses <= {200, 503}, statuses
    damaged = [r for r in answers.values() if r.status_code == 503]
    assert damaged
    assert damaged[0].headers["content-type"].startswith("application/json")
    assert damaged[0].json()["error"]["code"] == "store_unavailable"
    # The client is not told to retry shortly: the file needs repair, which the log says.
    assert "damaged and needs repair" in damaged[0].json()["error"]["message"]
    assert "retry-after" not in damaged[0].headers
    assert "is damaged" in caplog.text


# -- the command line ------------------------------------------------------------------


def test_status_on_a_damaged_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """`batchtrack status` on a file with garbage pages prints one line saying it is
    damaged (not "not found", no traceback) and exits 2."""
    data = tmp_path / "data"
    ids = _database(data / "batchtrack.db")
    _garbage_in_middle(data / "batchtrack.db")
    for batch_id in (ids[0], ids[BATCHES // 2], ids[-1]):
        done = _run("status", batch_id, "--data-dir", str(data))
        assert done.returncode == 2, done.stderr
        assert done.stdout == ""
        assert len(done.stderr.splitlines()) == 1, done.stderr
        assert "is damaged" in done.stderr
        assert "kept untouched" in done.stderr
        assert "not found" not in done.stderr


def test_status_on_a_store_url_of_a_file_cut_short_is_one_line(tmp_path: Path) -> None:
    """`batchtrack status --store sqlite:///…` on a file cut short: one line, exit 2."""
    path = tmp_path / "b.db"
    ids = _database(path)
    _cut_tail(path)
    done = _run("status", ids[0], "--store", f"sqlite://{path}")
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "cannot use --store" in done.stderr
    assert "is damaged" in done.stderr


@pytest.mark.parametrize("dropped", ["TABLE items", "TABLE batches", "INDEX items_failed"])
def test_status_on_a_database_missing_a_table_is_one_line(tmp_path: Path, dropped: str) -> None:
    """`batchtrack status` on a database missing a table or index: one line, exit 2."""
    data = tmp_path / "data"
    ids = _database(data / "batchtrack.db")
    with sqlite3.connect(data / "batchtrack.db") as db:
        db.execute(f"DROP {dropped}")
    db.close()
    done = _run("status", ids[0], "--data-dir", str(data))
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert f"the {dropped.lower()} is missing" in done.stderr


def test_serve_on_a_damaged_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """`batchtrack serve` refuses a damaged database before serving: one line, exit 2,
    and the file is not written to."""
    data = tmp_path / "data"
    _database(data / "batchtrack.db")
    _cut_tail(data / "batchtrack.db")
    before = (data / "batchtrack.db").read_bytes()
    done = _run("serve", "--data-dir", str(data), "--port", str(free_port()), "--quiet")
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "is damaged" in done.stderr
    assert "kept untouched" in done.stderr
    assert (data / "batchtrack.db").read_bytes() == before


# -- URLs given to SQLiteStore ---------------------------------------------------------


def test_a_sqlite_url_names_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLiteStore("sqlite:///abs/path.db") opens that file (percent escapes decoded), as
    from_url does, and makes no ./sqlite: folder."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "my data" / "b.db"
    with SQLiteStore(f"sqlite://{str(path).replace(' ', '%20')}") as store:
        batch_id = BatchTracker(store).create_batch(["a.jpg"]).batch_id
        assert store.path == path
    with from_url(f"sqlite://{path}") as twin:
        assert BatchTracker(twin).get(batch_id).progress.total == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my data"]


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("sqlite://relative.db", "absolute file path"),
        ("sqlite:///", "absolute file path"),
        ("sqlite:///tmp/x.db?mode=ro", "no query"),
    ],
)
def test_a_malformed_sqlite_url_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, why: str
) -> None:
    """A sqlite URL that from_url refuses, SQLiteStore refuses the same way, creating
    nothing."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValidationError, match=why):
        SQLiteStore(url)
    with pytest.raises(ValidationError, match=why):
        from_url(url)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "url", ["redis://:s3cret@localhost:6379/0", "postgresql://u:s3cret@h/db", "memory://"]
)
def test_another_url_is_refused_pointing_to_from_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """A URL of another scheme is a ValidationError naming from_url, without the password,
    and creates no file."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValidationError, match=r"from_url") as caught:
        SQLiteStore(url)
    assert "s3cret" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []
