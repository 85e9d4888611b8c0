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

Damage: the first time a process opens a file, :data:`CHECK_SECONDS` of ``PRAGMA
quick_check`` (on a read-only connection) and a look at the schema find a file that was cut
short or overwritten, and :class:`~batchtrack.exceptions.DatabaseDamaged` refuses it before
anything is written to it. Damage met later (past what the check read, or done since) is
the same error.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs

from .. import _eta
from .._models import ItemSnapshot, Progress, Status
from ..exceptions import (
    BatchNotFound,
    DatabaseDamaged,
    ItemNotFound,
    StoreError,
    ValidationError,
)
from ._rows import CODE as _CODE
from ._rows import COLUMNS as _COLUMNS
from ._rows import FAILED as _FAILED
from ._rows import STATUSES as _STATUSES
from ._rows import counts as _counts
from ._rows import ends as _ends
from ._rows import header, pack_metadata, unpack_metadata
from ._rows import progress as _progress
from ._rows import result as _result
from ._rows import step as _step
from ._rows import values as _values
from .base import (
    BatchRecord,
    BulkResult,
    EventStats,
    ItemQuery,
    LostItem,
    OutboxEntry,
    Outcome,
    Store,
    Transition,
    TransitionResult,
    add_stats,
    end_marker,
    pack_stats,
    unpack_stats,
)

__all__ = ["CHECK_SECONDS", "PAGE_SIZE", "SCHEMA_VERSION", "SQLiteStore", "SchemaVersionError"]

SCHEMA_VERSION = 7
"""The schema this batchtrack writes; stored in ``PRAGMA user_version``."""

PAGE_SIZE = 2048
"""The page size of the files this store creates (``PRAGMA page_size``; SQLite's default
is 4096). Files made before keep theirs."""

PURGE_CHUNK = 500
""":meth:`SQLiteStore.purge_expired` deletes at most this many batches per transaction."""

LEGACY_LEASE = 300.0
"""The lease (seconds from their start) that items processing in a version-1 file get."""

CHECK_SECONDS = 2.0
"""How long the first open of a file in a process checks its pages, at most.

``PRAGMA quick_check`` reads every page of the file once (about 1 GB a second from the
page cache, 0.1 s for 600,000 items), so it checks a file of up to a gigabyte or two
whole; on a bigger one it stops here, and the file is trusted on the pages read, its
header and its schema. Damage beyond that surfaces, as the same
:class:`~batchtrack.exceptions.DatabaseDamaged`, at the first call that reads it.
"""

# Statuses are stored as small integers: their position in this tuple.
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
    (
        # Version 2: where each item's input is, how often it was started, and the lease
        # of a processing item with its last heartbeat.
        "ALTER TABLE items ADD COLUMN source TEXT",
        "ALTER TABLE items ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE items ADD COLUMN lease_until REAL",
        "ALTER TABLE items ADD COLUMN beat_at REAL",
        # Only processing items hold a lease, so this index stays as small as the work in
        # flight, and finding lost items costs what is lost.
        "CREATE INDEX items_by_lease ON items (lease_until) WHERE lease_until IS NOT NULL",
        # Items a version-1 worker was running get the default lease from their start, so
        # that the items of a worker that did not survive the upgrade are reclaimed too.
        f"UPDATE items SET lease_until = changed_at + {LEGACY_LEASE}, beat_at = changed_at,"
        " attempts = 1 WHERE status = 1",
    ),
    (
        # Version 3: the batch version each item's last change produced, for reads of
        # what changed since a version, and an index of failed items for pages of them.
        # Pages of the other statuses walk the primary key: those statuses are common
        # while anyone pages them (a rare pending or processing item is found through
        # a since-read), and every index costs each transition page writes.
        "ALTER TABLE items ADD COLUMN version INTEGER NOT NULL DEFAULT 0",
        # When items changed before the upgrade is unknown: count every item of a batch
        # that ever changed as changed at its current version (a since-read of such a
        # batch returns more than changed, never less).
        "UPDATE items SET version = (SELECT b.version FROM batches b"
        " WHERE b.key = items.batch_key)",
        # Items never changed (version 0) are left out: a since-read never wants them,
        # and an item's first change then adds an entry without moving one.
        "CREATE INDEX items_by_version ON items (batch_key, version) WHERE version > 0",
        f"CREATE INDEX items_failed ON items (batch_key, position) WHERE status = {_FAILED}",
    ),
    (
        # Version 4: a batch can be paused. (Cancelled items need no column: their count
        # is what the total leaves over, and older files hold none; items an older
        # batchtrack cancelled stay failed with the error "cancelled".)
        "ALTER TABLE batches ADD COLUMN paused INTEGER NOT NULL DEFAULT 0",
    ),
    (
        # Version 5: idempotency keys, one row per owner ('' for none) and key, written
        # in the transaction that creates its batch; the primary key makes two creators
        # with one key meet.
        """CREATE TABLE batch_keys (
            owner       TEXT NOT NULL,
            key         TEXT NOT NULL,
            batch_id    TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            expires_at  REAL NOT NULL,
            PRIMARY KEY (owner, key)
        ) WITHOUT ROWID""",
        # And how far a processing item is, as its processor reported (NULL otherwise).
        "ALTER TABLE items ADD COLUMN progress REAL",
        "ALTER TABLE items ADD COLUMN stage TEXT",
    ),
    (
        # Version 6: the webhook outbox. A transition that ends a batch adds its end
        # marker (url NULL) in its own transaction; the webhook sender turns a marker into
        # one delivery per URL and settles each. Batches that ended before stay unsent.
        # (IF NOT EXISTS: a file set back to an older version by hand keeps its outbox.)
        """CREATE TABLE IF NOT EXISTS outbox (
            entry_id    TEXT PRIMARY KEY,
            batch_id    TEXT NOT NULL,
            version     INTEGER NOT NULL,
            ended_at    REAL NOT NULL,
            url         TEXT,
            body        TEXT,
            attempts    INTEGER NOT NULL DEFAULT 0,
            next_at     REAL NOT NULL,
            lease_until REAL
        ) WITHOUT ROWID""",
        "CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_at)",
        # Markers go with their batch (delete, purge_expired); deliveries stay.
        "CREATE INDEX IF NOT EXISTS outbox_markers ON outbox (batch_id) WHERE url IS NULL",
        "CREATE TABLE IF NOT EXISTS webhooks_gone (url TEXT PRIMARY KEY) WITHOUT ROWID",
    ),
    (
        # Version 7: a batch's metadata (JSON), in a table of its own so that the
        # batch row every transition rewrites stays small: read with the header by load
        # and list_batches, never by a transition; a batch without metadata has no row.
        # And the batches in creation order per owner and over all, for list_batches:
        # no column of these indexes changes after creation, so transitions write no
        # index page.
        """CREATE TABLE IF NOT EXISTS batch_metadata (
            batch_key INTEGER PRIMARY KEY,
            metadata  TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS batches_by_owner ON batches (owner, created_at, batch_id)",
        "CREATE INDEX IF NOT EXISTS batches_by_time ON batches (created_at, batch_id)",
    ),
]
assert len(_MIGRATIONS) == SCHEMA_VERSION

# What a file of the current schema holds; one missing is damage (or a hand that dropped it).
_SCHEMA_OBJECTS = (
    ("table", "batches"),
    ("table", "items"),
    ("table", "batch_keys"),
    ("table", "outbox"),
    ("table", "webhooks_gone"),
    ("table", "batch_metadata"),
    ("index", "items_by_id"),
    ("index", "items_by_lease"),
    ("index", "items_by_version"),
    ("index", "items_failed"),
    ("index", "batches_by_owner"),
    ("index", "batches_by_time"),
)
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")  # a scheme; a drive letter has no //
_SQLITE_INTERRUPT = 9
_SQLITE_CORRUPT = 11

# The files (device, inode) this process found whole, and a lock per file being checked:
# threads opening one file wait for one check instead of making their own.
_checked: set[tuple[int, int]] = set()
_checking: dict[tuple[int, int], threading.Lock] = {}
_checking_lock = threading.Lock()

# An item as load() and load_items() read it: what a snapshot shows, then the version and
# position that identify the snapshot in SQLiteStore._items_memo.
_ITEM_COLUMNS = (
    "item_id, filename, status, error, attempts, source, version, position, progress, stage"
)
_ITEMS_MEMO_SIZE = 250_000  # items kept in _items_memo, over all batches
# Batches kept there: in a long-running server most are finished (or gone) and never read
# again, yet each would hold its items until the item count above is reached.
_ITEMS_MEMO_BATCHES = 1_000
_STALE_CHUNK = 500  # changed items read per query
_NO_ITEM = (-1, None)

# The batch header, in the order _header() reads it; every row _header() reads ends with
# the paused flag.
# _HEADER and _LISTED rows also carry the metadata (before the paused flag): _loaded().
_LISTED = (
    f"SELECT {', '.join('b.' + c for c in _COLUMNS)}, b.key, m.metadata, b.paused"
    " FROM batches b{index} LEFT JOIN batch_metadata m ON m.batch_key = b.key"
)
_HEADER = _LISTED.format(index="") + " WHERE b.batch_id = ?"
_HEADER_AND_ITEM = (
    f"SELECT {', '.join('b.' + c for c in _COLUMNS)},"
    " i.filename, i.status, i.error, b.key, i.position, i.changed_at, i.attempts,"
    " i.source, i.lease_until, b.paused FROM batches b"
    " LEFT JOIN items i ON i.batch_key = b.key AND i.item_id = ?"
    " WHERE b.batch_id = ?"
)


_WRITE_HEADER = (
    "UPDATE batches SET updated_at = ?, finished_at = ?, expires_at = ?,"
    " version = ?, completed = ?, failed = ?, processing = ?, pending = ?,"
    " stats = ? WHERE key = ?"
)


def _write_header(
    db: sqlite3.Connection,
    at: float,
    finished_at: float | None,
    expires_at: float,
    version: int,
    counts: Mapping[Status, int],
    packed: bytes,
    key: int,
) -> None:
    """Write a batch's header after transitions: its times, version, counts and stats."""
    db.execute(
        _WRITE_HEADER,
        (
            at,
            finished_at,
            expires_at,
            version,
            counts[Status.COMPLETED],
            counts[Status.FAILED],
            counts[Status.PROCESSING],
            counts[Status.PENDING],
            packed,
            key,
        ),
    )


# An applied transition's item row.
_MOVE_ITEM = (
    "UPDATE items SET status = ?, error = ?, changed_at = ?, attempts = ?,"
    " lease_until = ?, beat_at = ?, version = ?, progress = NULL, stage = NULL"
    " WHERE batch_key = ? AND position = ?"
)

# Removes the end markers of the batches a subquery (or one "?") names.
_DROP_MARKERS = "DELETE FROM outbox WHERE url IS NULL AND batch_id IN ({})"


def _mark_end(
    db: sqlite3.Connection, row: Sequence[Any], finished_at: float | None, version: int, at: float
) -> None:
    """Add the end marker of a batch (header ``row`` as it was) that a transition ended."""
    if finished_at is not None and row[4] is None:
        marker = end_marker(row[0], version, at)
        db.execute(
            "INSERT OR IGNORE INTO outbox (entry_id, batch_id, version, ended_at, next_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (marker.entry_id, row[0], version, at, at),
        )


class SchemaVersionError(StoreError):
    """The database was written by a newer batchtrack; it is left untouched."""


def _header(row: Sequence[Any], items: tuple[ItemSnapshot, ...] = ()) -> BatchRecord:
    return header(row, unpack_stats(row[12]), items, row[-1])


def _loaded(row: Sequence[Any], items: tuple[ItemSnapshot, ...] = ()) -> BatchRecord:
    """A ``_HEADER`` row's batch, with its metadata."""
    return header(row, unpack_stats(row[12]), items, row[-1], unpack_metadata(row[14]))


def url_path(url: str) -> str:
    """The file a ``sqlite:///absolute/path.db`` URL names (percent escapes decoded).

    The one reading of SQLite URLs, for :func:`batchtrack.stores.from_url` and
    :class:`SQLiteStore`.

    Raises:
        ValueError: Not such a URL; the message says why, without the URL.
    """
    parts = urlsplit(url.strip())
    if parts.scheme.lower() != "sqlite":
        raise ValueError("not a sqlite:/// URL")
    if parts.netloc or not parts.path.startswith("/") or parts.path == "/":
        raise ValueError("SQLite needs an absolute file path after sqlite:///")
    if parts.query or parts.fragment:
        raise ValueError("SQLite URLs take no query")
    return unquote(parts.path)


def _is_damage(exc: sqlite3.Error) -> bool:
    """Whether SQLite found the file malformed (``SQLITE_CORRUPT`` and its variants)."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if isinstance(code, int):
        return code & 0xFF == _SQLITE_CORRUPT
    return "malformed" in str(exc)


def _is_interrupt(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF == _SQLITE_INTERRUPT
    return str(exc) == "interrupted"


def _check(path: Path, timeout: float) -> None:
    """Refuse a damaged file; each file is checked once per process, by one thread.

    Raises:
        DatabaseDamaged: SQLite found malformed pages, or a table or index is missing.
    """
    try:
        info = path.stat()
    except OSError:
        return  # a new file; one that cannot be read is reported when it is opened
    key = (info.st_dev, info.st_ino)
    if info.st_size == 0 or key in _checked:
        return
    with _checking_lock:
        lock = _checking.setdefault(key, threading.Lock())
    with lock:
        if key in _checked:
            return
        whole, detail = _examine(path, timeout)
        if whole:
            _checked.add(key)
    if detail is not None:
        raise DatabaseDamaged(path, detail)


def _examine(path: Path, timeout: float) -> tuple[bool, str | None]:
    """Check ``path`` on a read-only connection (which never writes the file, not even a
    checkpoint when it closes): ``(True, None)`` when it is whole, ``(False, what)`` when
    it is damaged, ``(False, None)`` when it cannot be checked (not a database, locked,
    ...; opening it for use then says why)."""
    try:
        db = sqlite3.connect(
            f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=timeout, isolation_level=None
        )
    except sqlite3.Error:
        return False, None
    try:
        deadline = time.monotonic() + CHECK_SECONDS
        db.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
        db.execute("BEGIN")  # one snapshot: writers in other processes go on meanwhile
        try:
            # At most 3 problems: one is enough to refuse, a few say what kind of damage.
            found = [r[0] for r in db.execute("PRAGMA quick_check(3)")]
        except sqlite3.OperationalError as exc:
            if not _is_interrupt(exc):
                raise
            found = ["ok"]  # a big file: trusted on the pages read and on its schema
        db.set_progress_handler(None, 0)
        if found != ["ok"]:
            lines = [n for f in found for n in f.splitlines() if not n.startswith("***")]
            return False, "; ".join(lines)[:300] or "quick_check failed"
        if db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            present = set(db.execute("SELECT type, name FROM sqlite_master"))
            missing = [
                f"the {t} {n} is missing" for t, n in _SCHEMA_OBJECTS if (t, n) not in present
            ]
            if missing:
                return False, "; ".join(missing)
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        return False, str(exc) if _is_damage(exc) else None
    finally:
        db.close()
    return True, None


@attrs.define
class _Connection:
    """A connection and the process that opened it (a forked child must not reuse it)."""

    db: sqlite3.Connection
    pid: int


def _header_and_item(
    db: sqlite3.Connection, batch_id: str, item_id: str, at: float
) -> tuple[Any, ItemSnapshot]:
    """The batch's header row joined with one item's row, and that item's snapshot (as
    renew and report need it: no progress or stage).

    Raises:
        BatchNotFound: The batch is missing or expired at ``at``.
        ItemNotFound: The batch has no such item.
    """
    row = db.execute(_HEADER_AND_ITEM, (item_id, batch_id)).fetchone()
    if row is None or row[5] <= at:
        raise BatchNotFound(batch_id)
    if row[13] is None:
        raise ItemNotFound(batch_id, item_id)
    return row, ItemSnapshot(item_id, row[13], _STATUSES[row[14]], row[15], row[19], row[20])


@attrs.define(init=False)
class SQLiteStore(Store):
    """Batches in an SQLite database file that threads and processes share.

    Args:
        path: The database file; created (with its schema, and its folder with any
            missing parents) when missing. A ``sqlite:///absolute/path.db`` URL names
            the file too (read as :func:`batchtrack.stores.from_url` reads it).
        synchronous: SQLite's ``synchronous`` setting: ``"NORMAL"`` (default: survives
            process crashes) or ``"FULL"`` (survives power loss too; slower).
        timeout: Seconds to wait for another connection's write lock before failing.

    Raises:
        ValidationError: A path that cannot name a file (``""``, ``":memory:"``), a URL
            that is not a well-formed ``sqlite:///`` one, or a bad setting.
        SchemaVersionError: The file was written by a newer batchtrack.
        DatabaseDamaged: The file is damaged; it was not written to.
        StoreError: The file cannot be opened or is not an SQLite database.
    """

    path: Path
    synchronous: str
    timeout: float
    _local: threading.local
    _all: list[sqlite3.Connection]
    _all_lock: threading.Lock
    _closed: bool
    # The last stats blob written or read, decoded: consecutive transitions of a batch
    # mostly see the blob the previous one wrote, so this skips most decoding. Replaced
    # whole (one atomic assignment), never mutated.
    _stats_memo: tuple[bytes, dict[str, float]]
    # Per batch (key, id, creation time): item snapshots by position, with the version
    # each was made at. Emptied when it holds too many items.
    _items_memo: dict[tuple[int, str, float], dict[int, tuple[int, ItemSnapshot]]]

    def __init__(
        self, path: str | os.PathLike[str], *, synchronous: str = "NORMAL", timeout: float = 30.0
    ) -> None:
        if not isinstance(path, (str, os.PathLike)) or str(path) in ("", ":memory:"):
            raise ValidationError(
                f"SQLiteStore needs a file path, not {path!r} (use MemoryStore for memory)"
            )
        if isinstance(path, str) and (url := _URL.match(path.strip())):
            path = self._from_url(path, url[1])
        if not isinstance(synchronous, str) or synchronous.upper() not in _SYNCHRONOUS:
            raise ValidationError(f"synchronous must be one of {_SYNCHRONOUS}, not {synchronous!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValidationError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.__attrs_init__(
            # Absolute now: each thread opens its own connection later, maybe after a chdir.
            Path(path).absolute(),
            synchronous.upper(),
            float(timeout),
            threading.local(),
            [],
            threading.Lock(),
            False,
            (b"", {}),
            {},
        )
        _check(self.path, self.timeout)
        self._migrate()

    @staticmethod
    def _from_url(url: str, scheme: str) -> str:
        """The file of a ``sqlite:///`` URL given as the path; any other URL is refused
        (it would otherwise name a file such as ``./redis:/host``)."""
        if scheme.lower() != "sqlite":
            # Only the scheme is shown: the rest may hold a password.
            raise ValidationError(
                f"SQLiteStore needs a file path or a sqlite:///absolute/path.db URL, not a "
                f"{scheme}:// URL; batchtrack.stores.from_url(url) makes the store a URL names"
            )
        try:
            return url_path(url)
        except ValueError as exc:
            raise ValidationError(
                f"not a usable SQLite URL: {url!r} ({exc}); use sqlite:///absolute/path.db"
                " or a plain file path"
            ) from None

    # -- connections ---------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError(f"the store on {self.path} is closed")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the folder of {self.path}: {exc}") from exc
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
            # Only a new, empty file takes it (an existing one keeps its page size): each
            # transition dirties about five pages (the item, two of its indexes, the
            # header) and the WAL writes each whole, so smaller pages make events cheaper
            # (docs/benchmarks.rst, "Single events"); reads of big batches cost the same.
            db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"cannot use WAL mode on {self.path} (got {mode!r})")
            db.execute(f"PRAGMA synchronous = {self.synchronous}")
        except sqlite3.DatabaseError as exc:
            db.close()
            raise self._failure(f"{self.path} is not a usable SQLite database:", exc) from exc
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
            raise self._failure(f"cannot write to {self.path}:", exc) from exc
        try:
            yield db
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                # A damaged file may refuse even this; the first error says why.
                with suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise self._failure(f"cannot write to {self.path}:", exc) from exc
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
            raise self._failure(f"cannot read {self.path}:", exc) from exc

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
            raise self._failure(f"cannot prepare the database {self.path}:", exc) from exc

    def _failure(self, doing: str, exc: sqlite3.Error) -> StoreError:
        """The error to raise for ``exc``: :class:`DatabaseDamaged` when the file is
        malformed, else a :class:`StoreError` saying what could not be done."""
        if _is_damage(exc):
            return DatabaseDamaged(self.path, str(exc))
        return StoreError(f"{doing} {exc}")

    def close(self) -> None:
        """Close every connection this store opened, in every thread."""
        with self._all_lock:
            self._closed = True
            connections, self._all = self._all, []
        for db in connections:
            db.close()

    # -- the store boundary --------------------------------------------------------------

    def create(self, batch: BatchRecord, items: Sequence[ItemSnapshot]) -> None:
        with self._write() as db:
            self._insert(db, batch, items)

    def create_keyed(
        self,
        batch: BatchRecord,
        items: Sequence[ItemSnapshot],
        key: str,
        fingerprint: str,
        key_expires_at: float,
    ) -> tuple[str, str] | None:
        now = batch.created_at
        owner = batch.owner or ""
        # BEGIN IMMEDIATE holds the write lock from the start: a second creator with the
        # same key waits, then finds the row.
        with self._write() as db:
            row = db.execute(
                "SELECT k.batch_id, k.fingerprint FROM batch_keys k"
                " JOIN batches b ON b.batch_id = k.batch_id"
                " WHERE k.owner = ? AND k.key = ? AND k.expires_at > ? AND b.expires_at > ?",
                (owner, key, now, now),
            ).fetchone()
            if row is not None:
                return row[0], row[1]
            db.execute(
                "INSERT OR REPLACE INTO batch_keys (owner, key, batch_id, fingerprint,"
                " expires_at) VALUES (?, ?, ?, ?, ?)",
                (owner, key, batch.batch_id, fingerprint, key_expires_at),
            )
            self._insert(db, batch, items)
        return None

    @staticmethod
    def _insert(db: sqlite3.Connection, batch: BatchRecord, items: Sequence[ItemSnapshot]) -> None:
        """Write a new batch and its items, inside the caller's write transaction."""
        try:
            key = db.execute(
                f"INSERT INTO batches ({', '.join(_COLUMNS)})"
                f" VALUES ({', '.join('?' * len(_COLUMNS))})",
                _values(batch),
            ).lastrowid
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"batch {batch.batch_id!r} exists already") from exc
        if batch.metadata:
            db.execute(
                "INSERT INTO batch_metadata (batch_key, metadata) VALUES (?, ?)",
                (key, pack_metadata(batch.metadata)),
            )
        db.executemany(
            "INSERT INTO items (batch_key, position, item_id, filename, status, error,"
            " changed_at, source, attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                (
                    key,
                    n,
                    item.id,
                    item.filename,
                    _CODE[item.status],
                    item.error,
                    batch.created_at,
                    item.source,
                    item.attempts,
                )
                for n, item in enumerate(items)
            ),
        )

    def apply(self, batch_id: str, transition: Transition) -> TransitionResult:
        # The hot path: one BEGIN IMMEDIATE, one read of the batch and the item, two
        # updates, one commit. Holding the write lock from the start makes computing the
        # new header here as safe as computing it in SQL, and cheaper.
        with self._write() as db:
            return self._apply_in(db, batch_id, transition)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.apply is not SQLiteStore.apply:  # what it applies must be what applies
            cls._apply_parts = Store._apply_parts  # type: ignore[method-assign]

    def _apply_parts(
        self,
        batch_id: str,
        item_id: str,
        target: Status,
        sources: frozenset[Status],
        at: float,
        error: str | None,
        expires_at_open: float,
        expires_at_finished: float,
        stats: EventStats,
        lease_until: float | None,
    ) -> tuple[Outcome, Status, ItemSnapshot, Progress, int, float, float, Mapping[str, float]]:
        # The tracker's hot path: _apply_in's statements for a start (the one with a
        # lease), completion or failure, without the Transition and TransitionResult
        # objects, the ETA sums added in one piece (_eta.added) from (origin, lease).
        with self._write() as db:
            row = db.execute(_HEADER_AND_ITEM, (item_id, batch_id)).fetchone()
            if row is None or row[5] <= at:
                raise BatchNotFound(batch_id)
            if row[13] is None:
                raise ItemNotFound(batch_id, item_id)
            previous = _STATUSES[row[14]]
            attempts = row[19]
            start = lease_until is not None
            if previous is target or previous not in sources or (start and row[-1]):
                outcome = (
                    Outcome.UNCHANGED
                    if previous is target
                    else Outcome.REJECTED
                    if previous not in sources
                    else Outcome.PAUSED
                )
                item = ItemSnapshot(item_id, row[13], previous, row[15], attempts, row[20])
                head = _header(row)
                return (
                    outcome,
                    previous,
                    item,
                    head.progress,
                    head.version,
                    head.created_at,
                    head.expires_at,
                    head.stats,
                )
            counts = _counts(row)
            counts[previous] -= 1
            counts[target] += 1
            packed = row[12]
            memo_blob, decoded = self._stats_memo
            if packed != memo_blob:
                decoded = unpack_stats(packed)
            elapsed = at - row[18]
            if isinstance(stats, tuple):
                added = _eta.added(decoded, previous, target, at, stats[0], stats[1], elapsed)
            else:
                added = None
                contributions = stats.get(previous)
                if contributions:
                    added = dict(decoded)
                    add_stats(added, contributions, elapsed)
            if added is not None:
                decoded, packed = added, pack_stats(added)
            self._stats_memo = (packed, decoded)
            if start:
                attempts += 1
            version = row[6] + 1
            db.execute(
                _MOVE_ITEM,
                (
                    _CODE[target],
                    error,
                    at,
                    attempts,
                    lease_until,
                    None if lease_until is None else at,
                    version,
                    row[16],
                    row[17],
                ),
            )
            finished_at: float | None
            if counts[Status.PENDING] or counts[Status.PROCESSING]:
                finished_at, expires_at = None, expires_at_open
            else:
                finished_at, expires_at = at, expires_at_finished
            _write_header(db, at, finished_at, expires_at, version, counts, packed, row[16])
            _mark_end(db, row, finished_at, version, at)
        return (
            Outcome.APPLIED,
            previous,
            ItemSnapshot(item_id, row[13], target, error, attempts, row[20]),
            _progress(row[7], counts),
            version,
            row[2],
            expires_at,
            decoded,
        )

    def apply_all(self, batch_id: str, transitions: Sequence[Transition]) -> list[TransitionResult]:
        # One transaction and one commit (the costly part) for all of them, the header
        # kept here and written once; an unknown batch or item raises inside it, which
        # rolls back what was applied before.
        with self._write() as db:
            head: list[Any] = []
            results = [self._apply_in(db, batch_id, t, head) for t in transitions]
            if head and head[13]:  # something applied
                db.execute(_WRITE_HEADER, (*head[3:7], *head[8:13], head[14]))
        return results

    def _apply_in(
        self,
        db: sqlite3.Connection,
        batch_id: str,
        transition: Transition,
        head: list[Any] | None = None,
    ) -> TransitionResult:
        """:meth:`apply` inside the caller's write transaction.

        With ``head``, the batch's header is kept in it (its columns, whether it
        changed, the batch's key) instead of being written: the caller writes it once.
        """
        row = db.execute(_HEADER_AND_ITEM, (transition.item_id, batch_id)).fetchone()
        if head is not None and row is not None:
            if head:
                row = (*head[:13], *row[13:])
            else:
                head += [*row[:13], False, row[16]]
        if row is None or row[5] <= transition.at:
            raise BatchNotFound(batch_id)
        if row[13] is None:
            raise ItemNotFound(batch_id, transition.item_id)
        previous = _STATUSES[row[14]]
        target = transition.target
        attempts = row[19]
        if (
            previous is target
            or previous not in transition.sources
            or (
                transition.lost_before is not None
                and (row[21] is None or row[21] > transition.lost_before)
            )
            or (transition.max_attempts is not None and attempts >= transition.max_attempts)
        ):
            outcome = Outcome.UNCHANGED if previous is target else Outcome.REJECTED
            item = ItemSnapshot(transition.item_id, row[13], previous, row[15], attempts, row[20])
            return _result(outcome, previous, item, _header(row))
        if transition.unless_paused and row[-1]:
            item = ItemSnapshot(transition.item_id, row[13], previous, row[15], attempts, row[20])
            return _result(Outcome.PAUSED, previous, item, _header(row))

        counts, packed, stats, attempts = _step(
            row,
            row[12],
            self._stats_memo,
            previous,
            transition,
            transition.at - row[18],
            attempts,
        )
        self._stats_memo = (packed, stats)
        lease = transition.lease_until
        db.execute(
            _MOVE_ITEM,
            (
                _CODE[target],
                transition.error,
                transition.at,
                attempts,
                lease,
                None if lease is None else transition.at,
                row[6] + 1,
                row[16],
                row[17],
            ),
        )
        if head is None:
            finished_at, expires_at, version = self._settle(db, row, counts, packed, transition, 1)
        else:
            finished_at, expires_at = _ends(counts, transition)
            version = row[6] + 1
            head[3:7] = (transition.at, finished_at, expires_at, version)
            head[8:13] = (
                counts[Status.COMPLETED],
                counts[Status.FAILED],
                counts[Status.PROCESSING],
                counts[Status.PENDING],
                packed,
            )
            head[13] = True
            _mark_end(db, row, finished_at, version, transition.at)
        return TransitionResult(
            Outcome.APPLIED,
            previous,
            ItemSnapshot(transition.item_id, row[13], target, transition.error, attempts, row[20]),
            _progress(row[7], counts),
            version,
            row[2],
            finished_at,
            expires_at,
            stats,
        )

    @staticmethod
    def _settle(
        db: sqlite3.Connection,
        row: Sequence[Any],
        counts: dict[Status, int],
        packed: bytes,
        transition: Transition,
        changes: int,
    ) -> tuple[float | None, float, int]:
        """Write the batch header after ``changes`` items moved; return its new
        ``finished_at``, ``expires_at`` and version."""
        finished_at, expires_at = _ends(counts, transition)
        version = row[6] + changes
        _write_header(db, transition.at, finished_at, expires_at, version, counts, packed, row[16])
        _mark_end(db, row, finished_at, version, transition.at)
        return finished_at, expires_at, version

    def set_paused(self, batch_id: str, paused: bool, at: float, expires_at_open: float) -> bool:
        with self._write() as db:
            row = db.execute(
                "SELECT expires_at, finished_at, paused FROM batches WHERE batch_id = ?",
                (batch_id,),
            ).fetchone()
            if row is None or row[0] <= at:
                raise BatchNotFound(batch_id)
            if bool(row[2]) is paused or (paused and row[1] is not None):
                return False
            db.execute(
                "UPDATE batches SET paused = ?, version = version + 1, updated_at = ?,"
                " expires_at = CASE WHEN finished_at IS NULL THEN ? ELSE expires_at END"
                " WHERE batch_id = ?",
                (int(paused), at, expires_at_open, batch_id),
            )
        return True

    def renew(
        self, batch_id: str, item_id: str, at: float, lease_until: float, expires_at_open: float
    ) -> TransitionResult:
        with self._write() as db:
            row, item = _header_and_item(db, batch_id, item_id, at)
            status = item.status
            header = _header(row)
            if status is not Status.PROCESSING:
                return _result(Outcome.REJECTED, status, item, header)
            db.execute(
                "UPDATE items SET lease_until = ?, beat_at = ?"
                " WHERE batch_key = ? AND position = ?",
                (lease_until, at, row[16], row[17]),
            )
            db.execute(
                "UPDATE batches SET expires_at = ? WHERE key = ?", (expires_at_open, row[16])
            )
        return _result(
            Outcome.APPLIED, status, item, attrs.evolve(header, expires_at=expires_at_open)
        )

    def report(
        self,
        batch_id: str,
        item_id: str,
        fraction: float,
        stage: str | None,
        at: float,
        expires_at_open: float,
    ) -> ItemSnapshot:
        with self._write() as db:
            row, item = _header_and_item(db, batch_id, item_id, at)
            status = item.status
            if status is not Status.PROCESSING:
                return item
            version = row[6] + 1
            db.execute(
                "UPDATE items SET progress = ?, stage = ?, version = ?"
                " WHERE batch_key = ? AND position = ?",
                (fraction, stage, version, row[16], row[17]),
            )
            db.execute(
                "UPDATE batches SET version = ?, updated_at = ?, expires_at = ? WHERE key = ?",
                (version, at, expires_at_open, row[16]),
            )
        return attrs.evolve(item, progress=fraction, stage=stage)

    def apply_many(
        self, batch_id: str, transition: Transition, item_ids: Sequence[str] | None = None
    ) -> BulkResult:
        target = transition.target
        sources = [_CODE[s] for s in transition.sources if s is not target]
        with self._write() as db:
            row = db.execute(
                f"SELECT {', '.join(_COLUMNS)}, NULL, NULL, NULL, key, paused FROM batches"
                " WHERE batch_id = ?",
                (batch_id,),
            ).fetchone()
            if row is None or row[5] <= transition.at:
                raise BatchNotFound(batch_id)
            key = row[16]
            if item_ids is None:
                marks = ",".join("?" * len(sources))
                found = db.execute(
                    f"SELECT position, status FROM items WHERE batch_key = ?"
                    f" AND status IN ({marks})",
                    (key, *sources),
                ).fetchall()
            else:
                found = []
                rejected = []
                for item_id in dict.fromkeys(item_ids):
                    hit = db.execute(
                        "SELECT position, status FROM items WHERE batch_key = ? AND item_id = ?",
                        (key, item_id),
                    ).fetchone()
                    if hit is None:
                        raise ItemNotFound(batch_id, item_id)
                    if hit[1] not in sources:
                        rejected.append((item_id, _STATUSES[hit[1]]))
                    found.append(hit)
                if rejected:
                    header = _header(row)
                    return BulkResult(0, tuple(rejected), header.progress, header.version)
            found.sort()  # by position: versions are counted in creation order
            counts = _counts(row)
            for _, code in found:
                counts[_STATUSES[code]] -= 1
                counts[target] += 1
            if found:
                attempts = "0" if transition.reset_attempts else "attempts"
                db.executemany(
                    f"UPDATE items SET status = ?, error = ?, changed_at = ?,"
                    f" attempts = {attempts}, lease_until = NULL, version = ?,"
                    f" progress = NULL, stage = NULL WHERE batch_key = ? AND position = ?",
                    (
                        # One version each, in order, as if applied one by one.
                        (_CODE[target], transition.error, transition.at, row[6] + n, key, position)
                        for n, (position, _) in enumerate(found, 1)
                    ),
                )
                _, _, version = self._settle(db, row, counts, row[12], transition, len(found))
            else:
                version = row[6]
        return BulkResult(
            len(found),
            (),
            _progress(row[7], counts),
            version,
        )

    def lost(self, now: float, limit: int) -> list[LostItem]:
        with self._read() as db:
            rows = db.execute(
                "SELECT b.batch_id, i.item_id, i.attempts, i.beat_at, i.lease_until"
                " FROM items i INDEXED BY items_by_lease"
                " JOIN batches b ON b.key = i.batch_key"
                " WHERE i.lease_until <= ? AND i.lease_until IS NOT NULL"
                " AND i.status = ? AND b.expires_at > ?"
                " ORDER BY i.lease_until LIMIT ?",
                (now, _CODE[Status.PROCESSING], now, limit),
            ).fetchall()
        return [LostItem(*r) for r in rows]

    def open_batches(self, now: float) -> list[str]:
        with self._read() as db:
            return [
                r[0]
                for r in db.execute(
                    "SELECT batch_id FROM batches WHERE finished_at IS NULL AND expires_at > ?",
                    (now,),
                )
            ]

    def load(self, batch_id: str, *, items: bool = True) -> BatchRecord | None:
        with self._read() as db:
            row = db.execute(_HEADER, (batch_id,)).fetchone()
            if row is None:
                return None
            if not items:
                return _loaded(row)
            snapshots = self._all_items(db, row)
        return _loaded(row, snapshots)

    def _all_items(self, db: sqlite3.Connection, header: Sequence[Any]) -> tuple[ItemSnapshot, ...]:
        """Every item of the batch of ``header`` (a ``_HEADER`` row), in order.

        Reading only each item's version, and whole rows just for the items that changed
        since this process last read them, costs a third of reading every row; unchanged
        items come back as the same snapshots, with the JSON already made of them.
        """
        key = header[13]
        memo = self._memo(header)
        if not memo:
            rows = db.execute(
                f"SELECT {_ITEM_COLUMNS} FROM items WHERE batch_key = ? ORDER BY position",
                (key,),
            ).fetchall()
            return self._snapshots(memo, rows)
        versions = db.execute(
            "SELECT position, version FROM items WHERE batch_key = ? ORDER BY position", (key,)
        ).fetchall()
        get = memo.get
        stale = [
            position for position, version in versions if get(position, _NO_ITEM)[0] != version
        ]
        for first in range(0, len(stale), _STALE_CHUNK):
            chunk = stale[first : first + _STALE_CHUNK]
            self._snapshots(
                memo,
                db.execute(
                    f"SELECT {_ITEM_COLUMNS} FROM items WHERE batch_key = ?"
                    f" AND position IN ({','.join('?' * len(chunk))})",
                    (key, *chunk),
                ).fetchall(),
            )
        return tuple([memo[position][1] for position, _ in versions])

    def _memo(self, header: Sequence[Any]) -> dict[int, tuple[int, ItemSnapshot]]:
        """This process's snapshots of the batch's items by position, with the version
        each was made at (a version names one state of one item of one batch)."""
        identity = (header[13], header[0], header[2])  # key, id, created_at
        memos = self._items_memo
        memo = memos.get(identity)
        if memo is None:
            # The batches first read longest ago go first (list() copies under the GIL,
            # while other threads add memos).
            held = list(memos)
            items = sum(map(len, list(memos.values())))
            for oldest in held:
                if len(memos) < _ITEMS_MEMO_BATCHES and items <= _ITEMS_MEMO_SIZE:
                    break
                items -= len(memos.pop(oldest, {}))
            memo = memos[identity] = {}
        return memo

    def load_items(self, batch_id: str, query: ItemQuery) -> BatchRecord | None:
        # Each read walks one index from where it starts: items_by_version for what
        # changed, items_failed for failed items, the primary key for the rest.
        where = ["batch_key = ?"]
        args: list[Any] = []
        index = " NOT INDEXED"
        if query.since is not None:
            where.append("version > 0 AND version > ?")  # the literal admits the index
            args.append(query.since)
            index = " INDEXED BY items_by_version"
        if query.status is not None:
            # A literal, so that the planner may use the partial index items_failed.
            where.append(f"status = {_CODE[query.status]}")
            if query.since is None and query.status is Status.FAILED:
                index = " INDEXED BY items_failed"
        with self._read() as db:
            row = db.execute(_HEADER, (batch_id,)).fetchone()
            if row is None:
                return None
            key = row[13]
            if query.after is not None:
                hit = db.execute(
                    "SELECT position FROM items WHERE batch_key = ? AND item_id = ?",
                    (key, query.after),
                ).fetchone()
                if hit is None:
                    raise ItemNotFound(batch_id, query.after)
                where.append("position > ?")
                args.append(hit[0])
            rows = db.execute(
                f"SELECT {_ITEM_COLUMNS}"
                f" FROM items{index} WHERE {' AND '.join(where)} ORDER BY position LIMIT ?",
                (key, *args, -1 if query.limit is None else query.limit),
            ).fetchall()
            memo = self._memo(row)
        return _loaded(row, self._snapshots(memo, rows))

    @staticmethod
    def _snapshots(
        memo: dict[int, tuple[int, ItemSnapshot]], rows: list[Any]
    ) -> tuple[ItemSnapshot, ...]:
        """The items of ``rows`` (``_ITEM_COLUMNS``), reusing the snapshot ``memo`` has of
        an item at the same version, and keeping the new ones there."""
        statuses = _STATUSES
        found = []
        for item_id, filename, status, error, attempts, source, version, position, p, g in rows:
            seen = memo.get(position)
            if seen is None or seen[0] != version:
                snapshot = ItemSnapshot(
                    item_id, filename, statuses[status], error, attempts, source, p, g
                )
                seen = memo[position] = (version, snapshot)
            found.append(seen[1])
        return tuple(found)

    def list_batches(
        self, owner: str | None, now: float, limit: int, after: str | None
    ) -> list[BatchRecord]:
        # One walk down batches_by_owner (or batches_by_time) from the cursor; expired
        # batches not yet purged are skipped on the way.
        where = ["b.expires_at > ?"]
        args: list[Any] = [now]
        index = " INDEXED BY batches_by_time"
        if owner is not None:
            where.append("b.owner = ?")
            args.append(owner)
            index = " INDEXED BY batches_by_owner"
        with self._read() as db:
            if after is not None:
                hit = db.execute(
                    "SELECT created_at, owner FROM batches WHERE batch_id = ?", (after,)
                ).fetchone()
                if hit is None or (owner is not None and hit[1] != owner):
                    raise BatchNotFound(after)
                where.append("(b.created_at, b.batch_id) < (?, ?)")
                args += [hit[0], after]
            rows = db.execute(
                f"{_LISTED.format(index=index)} WHERE {' AND '.join(where)}"
                " ORDER BY b.created_at DESC, b.batch_id DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [_loaded(row) for row in rows]

    def delete(self, batch_id: str) -> bool:
        # list() copies the keys at once: other threads add memos meanwhile.
        for identity in [i for i in list(self._items_memo) if i[1] == batch_id]:
            self._items_memo.pop(identity, None)
        with self._write() as db:
            row = db.execute("SELECT key FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
            if row is None:
                return False
            db.execute("DELETE FROM items WHERE batch_key = ?", row)
            db.execute("DELETE FROM batch_metadata WHERE batch_key = ?", row)
            db.execute("DELETE FROM batches WHERE key = ?", row)
            db.execute(_DROP_MARKERS.format("?"), (batch_id,))
            return True

    def expired(self, now: float, limit: int) -> list[str]:
        with self._read() as db:
            return [
                r[0]
                for r in db.execute(
                    "SELECT batch_id FROM batches WHERE expires_at <= ? LIMIT ?", (now, limit)
                )
            ]

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
                if removed == 0:
                    db.execute("DELETE FROM batch_keys WHERE expires_at <= ?", (now,))
                if keys:
                    marks = ",".join("?" * len(keys))
                    db.execute(
                        _DROP_MARKERS.format(
                            f"SELECT batch_id FROM batches WHERE key IN ({marks})"
                        ),
                        keys,
                    )
                    db.execute(f"DELETE FROM items WHERE batch_key IN ({marks})", keys)
                    db.execute(f"DELETE FROM batch_metadata WHERE batch_key IN ({marks})", keys)
                    db.execute(f"DELETE FROM batches WHERE key IN ({marks})", keys)
            removed += len(keys)
            if len(keys) < PURGE_CHUNK:
                return removed

    # -- the outbox ------------------------------------------------------------------------

    def outbox_claim(self, now: float, limit: int, lease_until: float) -> list[OutboxEntry]:
        # Senders look every second: when nothing is due, a read answers, and no
        # writer waits for the write lock a claim takes.
        with self._read() as db:
            due = db.execute(
                "SELECT 1 FROM outbox INDEXED BY outbox_due WHERE next_at <= ? LIMIT 1", (now,)
            ).fetchone()
        if due is None:
            return []
        with self._write() as db:
            rows = db.execute(
                "SELECT entry_id, batch_id, version, ended_at, url, body, attempts FROM outbox"
                " INDEXED BY outbox_due WHERE next_at <= ?"
                " AND (lease_until IS NULL OR lease_until <= ?) ORDER BY next_at LIMIT ?",
                (now, now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE outbox SET lease_until = ? WHERE entry_id = ?",
                ((lease_until, r[0]) for r in rows),
            )
        return [OutboxEntry(*r) for r in rows]

    def outbox_expand(self, entry_id: str, deliveries: Sequence[OutboxEntry], at: float) -> None:
        with self._write() as db:
            db.execute("DELETE FROM outbox WHERE entry_id = ?", (entry_id,))
            db.executemany(
                "INSERT OR IGNORE INTO outbox (entry_id, batch_id, version, ended_at, url,"
                " body, attempts, next_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    (e.entry_id, e.batch_id, e.version, e.ended_at, e.url, e.body, e.attempts, at)
                    for e in deliveries
                ),
            )

    def outbox_done(self, entry_id: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM outbox WHERE entry_id = ?", (entry_id,))

    def outbox_retry(self, entry_id: str, attempts: int, next_at: float) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE outbox SET attempts = ?, next_at = ?, lease_until = NULL"
                " WHERE entry_id = ?",
                (attempts, next_at, entry_id),
            )

    def outbox_unsubscribe(self, url: str) -> None:
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO webhooks_gone (url) VALUES (?)", (url,))
            db.execute("DELETE FROM outbox WHERE url = ?", (url,))

    def outbox_unsubscribed(self) -> frozenset[str]:
        with self._read() as db:
            return frozenset(r[0] for r in db.execute("SELECT url FROM webhooks_gone"))
