"""A store in one SQLite file, shared by every thread and process that opens it.

Built on the standard library's :mod:`sqlite3`. The database runs in WAL mode, so readers
never block the writer; each transition is one short ``BEGIN IMMEDIATE`` transaction that
reads the item's status, updates the item and the batch's counters together, and commits.
SQLite serialises those transactions across every connection to the file, so any number
of threads and processes never lose or double an update.

Durability: with the default ``synchronous="NORMAL"`` a transition that returned survives
a crash of the process (or of every process); a power loss or OS crash may lose the last
transactions before the WAL was checkpointed, but never corrupts the file. Pass
``synchronous="FULL"`` to make every returned transition survive power loss too, at the
cost of an ``fsync`` per transition.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

from .._models import ItemSnapshot, Progress, Status
from ..exceptions import BatchNotFound, ItemNotFound, StoreError, ValidationError
from .base import (
    BatchRecord,
    Outcome,
    Store,
    Transition,
    TransitionResult,
    add_stats,
    pack_stats,
    unpack_stats,
)

__all__ = ["SCHEMA_VERSION", "SQLiteStore", "SchemaVersionError"]

SCHEMA_VERSION = 1
"""The schema this batchtrack writes; stored in ``PRAGMA user_version``."""

PURGE_CHUNK = 500
""":meth:`SQLiteStore.purge_expired` deletes at most this many batches per transaction."""

# Statuses are stored as small integers: their position in this tuple.
_STATUSES = (Status.PENDING, Status.PROCESSING, Status.COMPLETED, Status.FAILED)
_CODE = {status: code for code, status in enumerate(_STATUSES)}
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")

# Each entry migrates the schema from version i to i + 1; run inside one transaction.
_MIGRATIONS: list[tuple[str, ...]] = [
    (
        # Items refer to their batch by an integer key, which keeps item rows small.
        """CREATE TABLE batches (
            key         INTEGER PRIMARY KEY,
            batch_id    TEXT NOT NULL UNIQUE,
            owner       TEXT,
            created_at  REAL NOT NULL,
            updated_at  REAL NOT NULL,
            finished_at REAL,
            expires_at  REAL NOT NULL,
            version     INTEGER NOT NULL,
            total       INTEGER NOT NULL,
            completed   INTEGER NOT NULL,
            failed      INTEGER NOT NULL,
            processing  INTEGER NOT NULL,
            pending     INTEGER NOT NULL,
            stats       BLOB NOT NULL
        )""",
        # No index on expires_at: it changes with every transition, and keeping an index
        # current would cost each transition one more page write. purge_expired scans
        # the batches table instead, which is small next to the items table.
        # Rows are stored in batch order, so a snapshot is one range scan; the index
        # finds one item for a transition.
        """CREATE TABLE items (
            batch_key INTEGER NOT NULL,
            position  INTEGER NOT NULL,
            item_id   TEXT NOT NULL,
            filename  TEXT NOT NULL,
            status    INTEGER NOT NULL,
            error     TEXT,
            changed_at REAL NOT NULL,
            PRIMARY KEY (batch_key, position)
        ) WITHOUT ROWID""",
        "CREATE UNIQUE INDEX items_by_id ON items (batch_key, item_id)",
    ),
]
assert len(_MIGRATIONS) == SCHEMA_VERSION

# The batch header, in the order _header() reads it.
_COLUMNS = (
    "batch_id",
    "owner",
    "created_at",
    "updated_at",
    "finished_at",
    "expires_at",
    "version",
    "total",
    "completed",
    "failed",
    "processing",
    "pending",
    "stats",
)
_HEADER = f"SELECT {', '.join(_COLUMNS)}, key FROM batches WHERE batch_id = ?"
_HEADER_AND_ITEM = (
    f"SELECT {', '.join('b.' + c for c in _COLUMNS)},"
    " i.filename, i.status, i.error, b.key, i.position, i.changed_at FROM batches b"
    " LEFT JOIN items i ON i.batch_key = b.key AND i.item_id = ?"
    " WHERE b.batch_id = ?"
)


class SchemaVersionError(StoreError):
    """The database was written by a newer batchtrack; it is left untouched."""


def _header(row: Sequence[Any], items: tuple[ItemSnapshot, ...] = ()) -> BatchRecord:
    return BatchRecord(
        batch_id=row[0],
        owner=row[1],
        created_at=row[2],
        updated_at=row[3],
        finished_at=row[4],
        expires_at=row[5],
        version=row[6],
        progress=Progress(row[7], row[8], row[9], row[10], row[11]),
        stats=unpack_stats(row[12]),
        items=items,
    )


@attrs.define
class _Connection:
    """A connection and the process that opened it (a forked child must not reuse it)."""

    db: sqlite3.Connection
    pid: int


@attrs.define(init=False)
class SQLiteStore(Store):
    """Batches in an SQLite database file that threads and processes share.

    Args:
        path: The database file; created (with its schema) when missing. Its folder must
            exist.
        synchronous: SQLite's ``synchronous`` setting: ``"NORMAL"`` (default: survives
            process crashes) or ``"FULL"`` (survives power loss too; slower).
        timeout: Seconds to wait for another connection's write lock before failing.

    Raises:
        ValidationError: A path that cannot name a file (``""``, ``":memory:"``), or a bad
            setting.
        SchemaVersionError: The file was written by a newer batchtrack.
        StoreError: The file cannot be opened or is not an SQLite database.
    """

    path: Path
    synchronous: str
    timeout: float
    _local: threading.local
    _all: list[sqlite3.Connection]
    _all_lock: threading.Lock
    _closed: bool

    def __init__(
        self, path: str | os.PathLike[str], *, synchronous: str = "NORMAL", timeout: float = 30.0
    ) -> None:
        if not isinstance(path, (str, os.PathLike)) or str(path) in ("", ":memory:"):
            raise ValidationError(
                f"SQLiteStore needs a file path, not {path!r} (use MemoryStore for memory)"
            )
        if not isinstance(synchronous, str) or synchronous.upper() not in _SYNCHRONOUS:
            raise ValidationError(f"synchronous must be one of {_SYNCHRONOUS}, not {synchronous!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValidationError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.__attrs_init__(
            Path(path),
            synchronous.upper(),
            float(timeout),
            threading.local(),
            [],
            threading.Lock(),
            False,
        )
        self._migrate()

    # -- connections ---------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError(f"the store on {self.path} is closed")
        try:
            db = sqlite3.connect(
                self.path,
                timeout=self.timeout,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # close() may run in another thread
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the database {self.path}: {exc}") from exc
        try:
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"cannot use WAL mode on {self.path} (got {mode!r})")
            db.execute(f"PRAGMA synchronous = {self.synchronous}")
        except sqlite3.DatabaseError as exc:
            db.close()
            raise StoreError(f"{self.path} is not a usable SQLite database: {exc}") from exc
        except BaseException:
            db.close()
            raise
        with self._all_lock:
            self._all.append(db)
        return db

    @property
    def _db(self) -> sqlite3.Connection:
        conn: _Connection | None = getattr(self._local, "conn", None)
        pid = os.getpid()
        if conn is None or conn.pid != pid:
            # A connection inherited through fork belongs to the parent: never touch it.
            conn = self._local.conn = _Connection(self._connect(), pid)
        return conn.db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding SQLite's write lock from the start."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write to {self.path}: {exc}") from exc
        try:
            yield db
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot write to {self.path}: {exc}") from exc
            raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: a consistent snapshot of the file."""
        db = self._db
        try:
            db.execute("BEGIN")
            try:
                yield db
            finally:
                db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {self.path}: {exc}") from exc

    def _migrate(self) -> None:
        try:
            with self._write() as db:
                current = db.execute("PRAGMA user_version").fetchone()[0]
                if current > SCHEMA_VERSION:
                    raise SchemaVersionError(
                        f"{self.path} has schema version {current}, written by a newer "
                        f"batchtrack; this one understands up to {SCHEMA_VERSION}. "
                        "Upgrade batchtrack; the file was not changed."
                    )
                for version in range(current, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[version]:
                        db.execute(statement)
                if current != SCHEMA_VERSION:
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot prepare the database {self.path}: {exc}") from exc

    def close(self) -> None:
        """Close every connection this store opened, in every thread."""
        with self._all_lock:
            self._closed = True
            connections, self._all = self._all, []
        for db in connections:
            db.close()

    # -- the store boundary --------------------------------------------------------------

    def create(self, batch: BatchRecord, items: Sequence[ItemSnapshot]) -> None:
        p = batch.progress
        with self._write() as db:
            try:
                key = db.execute(
                    f"INSERT INTO batches ({', '.join(_COLUMNS)})"
                    f" VALUES ({', '.join('?' * len(_COLUMNS))})",
                    (
                        batch.batch_id,
                        batch.owner,
                        batch.created_at,
                        batch.updated_at,
                        batch.finished_at,
                        batch.expires_at,
                        batch.version,
                        p.total,
                        p.completed,
                        p.failed,
                        p.processing,
                        p.pending,
                        pack_stats(batch.stats),
                    ),
                ).lastrowid
            except sqlite3.IntegrityError as exc:
                raise StoreError(f"batch {batch.batch_id!r} exists already") from exc
            db.executemany(
                "INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    (
                        key,
                        n,
                        item.id,
                        item.filename,
                        _CODE[item.status],
                        item.error,
                        batch.created_at,
                    )
                    for n, item in enumerate(items)
                ),
            )

    def apply(self, batch_id: str, transition: Transition) -> TransitionResult:
        # The hot path: one BEGIN IMMEDIATE, one read of the batch and the item, two
        # updates, one commit. Holding the write lock from the start makes computing the
        # new header here as safe as computing it in SQL, and cheaper.
        with self._write() as db:
            row = db.execute(_HEADER_AND_ITEM, (transition.item_id, batch_id)).fetchone()
            if row is None or row[5] <= transition.at:
                raise BatchNotFound(batch_id)
            if row[13] is None:
                raise ItemNotFound(batch_id, transition.item_id)
            previous = _STATUSES[row[14]]
            target = transition.target
            if previous is target or previous not in transition.sources:
                outcome = Outcome.UNCHANGED if previous is target else Outcome.REJECTED
                item = ItemSnapshot(transition.item_id, row[13], previous, row[15])
                return _result(outcome, previous, item, _header(row))

            counts = {
                Status.COMPLETED: row[8],
                Status.FAILED: row[9],
                Status.PROCESSING: row[10],
                Status.PENDING: row[11],
            }
            counts[previous] -= 1
            counts[target] += 1
            stats = unpack_stats(row[12])
            contributions = transition.stats.get(previous)
            if contributions:
                add_stats(stats, contributions, transition.at - row[18])
                packed = pack_stats(stats)
            else:
                packed = row[12]
            if counts[Status.PENDING] or counts[Status.PROCESSING]:
                finished_at, expires_at = None, transition.expires_at_open
            else:
                finished_at, expires_at = transition.at, transition.expires_at_finished
            version = row[6] + 1
            db.execute(
                "UPDATE items SET status = ?, error = ?, changed_at = ?"
                " WHERE batch_key = ? AND position = ?",
                (_CODE[target], transition.error, transition.at, row[16], row[17]),
            )
            db.execute(
                "UPDATE batches SET updated_at = ?, finished_at = ?, expires_at = ?,"
                " version = ?, completed = ?, failed = ?, processing = ?, pending = ?,"
                " stats = ? WHERE key = ?",
                (
                    transition.at,
                    finished_at,
                    expires_at,
                    version,
                    counts[Status.COMPLETED],
                    counts[Status.FAILED],
                    counts[Status.PROCESSING],
                    counts[Status.PENDING],
                    packed,
                    row[16],
                ),
            )
        return TransitionResult(
            Outcome.APPLIED,
            previous,
            ItemSnapshot(transition.item_id, row[13], target, transition.error),
            Progress(
                row[7],
                counts[Status.COMPLETED],
                counts[Status.FAILED],
                counts[Status.PROCESSING],
                counts[Status.PENDING],
            ),
            version,
            row[2],
            finished_at,
            expires_at,
            stats,
        )

    def load(self, batch_id: str, *, items: bool = True) -> BatchRecord | None:
        with self._read() as db:
            row = db.execute(_HEADER, (batch_id,)).fetchone()
            if row is None:
                return None
            if not items:
                return _header(row)
            statuses = _STATUSES
            rows = db.execute(
                "SELECT item_id, filename, status, error FROM items"
                " WHERE batch_key = ? ORDER BY position",
                (row[13],),
            ).fetchall()
        return _header(row, tuple(ItemSnapshot(i, f, statuses[s], e) for i, f, s, e in rows))

    def delete(self, batch_id: str) -> bool:
        with self._write() as db:
            row = db.execute("SELECT key FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
            if row is None:
                return False
            db.execute("DELETE FROM items WHERE batch_key = ?", row)
            db.execute("DELETE FROM batches WHERE key = ?", row)
            return True

    def purge_expired(self, now: float) -> int:
        removed = 0
        while True:
            # Bounded chunks keep each write transaction short, so workers updating other
            # batches wait milliseconds, not for the whole sweep.
            with self._write() as db:
                keys = [
                    r[0]
                    for r in db.execute(
                        "SELECT key FROM batches WHERE expires_at <= ? LIMIT ?",
                        (now, PURGE_CHUNK),
                    )
                ]
                if keys:
                    marks = ",".join("?" * len(keys))
                    db.execute(f"DELETE FROM items WHERE batch_key IN ({marks})", keys)
                    db.execute(f"DELETE FROM batches WHERE key IN ({marks})", keys)
            removed += len(keys)
            if len(keys) < PURGE_CHUNK:
                return removed


def _result(
    outcome: Outcome, previous: Status, item: ItemSnapshot, header: BatchRecord
) -> TransitionResult:
    return TransitionResult(
        outcome,
        previous,
        item,
        header.progress,
        header.version,
        header.created_at,
        header.finished_at,
        header.expires_at,
        header.stats,
    )
