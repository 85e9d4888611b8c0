"""A store in PostgreSQL, shared by every process on every host that reaches the server.

Needs psycopg 3 and its pool: ``pip install 'batchtrack[postgres]'``.

A transition is two statements on a pooled connection in autocommit mode: one reads the
batch and the item together; one writes the item and the batch's counts, version, times
and ETA sums (worked out in Python by the same code as every store, so ETAs agree to the
bit) only if the batch's version is still the one read — a compare-and-set on the
batch's row. The row serialises every writer of a batch across connections, processes
and hosts (a concurrent writer waits for it, finds the version moved, and reads again),
so no update is ever lost or counted twice, and batches never wait for each other.
Several transitions together (:meth:`PostgresStore.apply_all`, an orchestrator's call)
are the same with one read and one write for them all, and usually no read: the store
keeps what its last write left and lets the write's version guard check it.
Changes that decide on more than the version (reclaims, bulk retries and cancels,
deletes, expiry sweeps) lock the batch's row first (``SELECT ... FOR UPDATE``) and read
after the lock. Every change also sends ``pg_notify(channel, batch_id)`` in its own
transaction, which PostgreSQL delivers only if it commits: :meth:`PostgresStore.listen`
turns those into calls.

Tables, under ``table_prefix`` (default ``batchtrack_``), in the connection's current
schema (the first of its ``search_path``, usually ``public``):

- ``<prefix>schema`` — one row: the schema version;
- ``<prefix>batches`` — one row per batch: the header, the counts, the ETA sums (packed
  doubles, :func:`~batchtrack.stores.base.pack_stats`);
- ``<prefix>items`` — one row per item, keyed by (batch, position), with partial indexes
  for leases (the work in flight), changed items (``since`` reads) and failed items.

The schema is created on first use and migrated in one transaction under an advisory
lock, so any number of processes may start at once; a schema written by a newer
batchtrack raises :class:`SchemaVersionError` and is left untouched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict
    from psycopg_pool import ConnectionPool
except ImportError as exc:  # pragma: no cover - depends on the environment
    from .._extras import missing

    raise ImportError(
        missing("batchtrack.stores.postgres", "psycopg 3 and psycopg-pool", "postgres")
    ) from exc

import attrs

from .._models import ItemSnapshot, Status
from ..exceptions import BatchNotFound, ItemNotFound, StoreError, ValidationError
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
    ItemQuery,
    LostItem,
    OutboxEntry,
    Outcome,
    PackedStats,
    Store,
    Transition,
    TransitionResult,
    end_marker,
)
from .sqlite import SchemaVersionError  # one error for every store's newer schema

__all__ = ["SCHEMA_VERSION", "PostgresStore", "SchemaVersionError"]

log = logging.getLogger("batchtrack")

SCHEMA_VERSION = 5
"""The schema this batchtrack writes; kept in the ``<prefix>schema`` table."""

PURGE_CHUNK = 500
""":meth:`PostgresStore.purge_expired` deletes at most this many batches per transaction."""


_IDLE = psycopg.pq.TransactionStatus.IDLE
_PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,39}")
_LISTEN_POLL = 0.5  # seconds between two looks at listen()'s stop event
_TRIES = 1000  # compare-and-set rounds before a transition gives up (each lost to a writer)
_AHEAD = 64  # pending items apply_all reads beyond those named, for the calls after it
_MEMO_ITEMS = 1024  # items kept per batch for apply_all's next call, at most
_MEMO_BATCHES = 64  # batches kept so, at most
_DONE = frozenset({_CODE[Status.COMPLETED], _FAILED})

# Each entry makes the schema of its version from the one before, in one transaction.
# {batches}, {items} are the qualified table names, {p} the prefix (for index names).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        # Items refer to their batch by an integer key, which keeps item rows and their
        # indexes small. The batch row is rewritten by every transition: the free space
        # fillfactor leaves lets PostgreSQL do that in place (a HOT update: no index
        # touched), as no indexed column of it ever changes.
        """CREATE TABLE {batches} (
            key         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            batch_id    text NOT NULL UNIQUE,
            owner       text,
            created_at  double precision NOT NULL,
            updated_at  double precision NOT NULL,
            finished_at double precision,
            expires_at  double precision NOT NULL,
            version     bigint NOT NULL,
            total       integer NOT NULL,
            completed   integer NOT NULL,
            failed      integer NOT NULL,
            processing  integer NOT NULL,
            pending     integer NOT NULL,
            stats       bytea NOT NULL
        ) WITH (fillfactor = 70)""",
        # No index on expires_at: it changes with every transition, and an index would
        # cost each one an index write (and its HOT update). Sweeps scan the batches
        # table instead, which is small next to the items table.
        """CREATE TABLE {items} (
            batch_key   bigint NOT NULL,
            position    integer NOT NULL,
            item_id     text NOT NULL,
            filename    text NOT NULL,
            status      smallint NOT NULL,
            error       text,
            changed_at  double precision NOT NULL,
            source      text,
            attempts    integer NOT NULL DEFAULT 0,
            lease_until double precision,
            beat_at     double precision,
            version     bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (batch_key, position)
        )""",
        'CREATE UNIQUE INDEX "{p}items_by_id" ON {items} (batch_key, item_id)',
        # Only processing items hold a lease, so this index stays as small as the work in
        # flight, and finding lost items costs what is lost.
        'CREATE INDEX "{p}items_by_lease" ON {items} (lease_until) WHERE lease_until IS NOT NULL',
        # Items never changed (version 0) are left out: a since-read never wants them.
        'CREATE INDEX "{p}items_by_version" ON {items} (batch_key, version) WHERE version > 0',
        f'CREATE INDEX "{{p}}items_failed" ON {{items}} (batch_key, position)'
        f" WHERE status = {_FAILED}",
    ),
    2: (
        # A batch can be paused. (Cancelled items need no column: their count is what
        # the total leaves over; items an older batchtrack cancelled stay failed with the
        # error "cancelled".)
        "ALTER TABLE {batches} ADD COLUMN paused boolean NOT NULL DEFAULT false",
    ),
    3: (
        # Idempotency keys, one row per owner ('' for none) and key, written in the
        # transaction that creates its batch; the primary key makes two creators meet.
        """CREATE TABLE {keys} (
            owner       text NOT NULL,
            key         text NOT NULL,
            batch_id    text NOT NULL,
            fingerprint text NOT NULL,
            expires_at  double precision NOT NULL,
            PRIMARY KEY (owner, key)
        )""",
        # And how far a processing item is, as its processor reported (NULL otherwise).
        "ALTER TABLE {items} ADD COLUMN progress double precision",
        "ALTER TABLE {items} ADD COLUMN stage text",
    ),
    4: (
        # The webhook outbox: a transition that ends a batch adds its end marker (url
        # NULL) in its own statement; the webhook sender turns a marker into one delivery
        # per URL and settles each. Markers go with their batch; deliveries stay.
        """CREATE TABLE IF NOT EXISTS {outbox} (
            entry_id    text PRIMARY KEY,
            batch_id    text NOT NULL,
            version     bigint NOT NULL,
            ended_at    double precision NOT NULL,
            url         text,
            body        text,
            attempts    integer NOT NULL DEFAULT 0,
            next_at     double precision NOT NULL,
            lease_until double precision
        )""",
        'CREATE INDEX IF NOT EXISTS "{p}outbox_due" ON {outbox} (next_at)',
        'CREATE INDEX IF NOT EXISTS "{p}outbox_markers" ON {outbox} (batch_id) WHERE url IS NULL',
        "CREATE TABLE IF NOT EXISTS {gone} (url text PRIMARY KEY)",
    ),
    5: (
        # A batch's metadata (JSON), in a table of its own so that the batch row every
        # transition rewrites stays small; read with the header by load and
        # list_batches, never by a transition; a batch without metadata has no row.
        """CREATE TABLE IF NOT EXISTS {metadata} (
            batch_key bigint PRIMARY KEY,
            metadata  text NOT NULL
        )""",
        # The batches in creation order per owner and over all, for list_batches. No
        # column of these ever changes, so transitions keep their HOT updates.
        'CREATE INDEX IF NOT EXISTS "{p}batches_by_owner"'
        " ON {batches} (owner, created_at, batch_id)",
        'CREATE INDEX IF NOT EXISTS "{p}batches_by_time" ON {batches} (created_at, batch_id)',
    ),
}
assert sorted(_MIGRATIONS) == list(range(1, SCHEMA_VERSION + 1))

# The batch header, in the order _header() reads it.
_ITEM_COLUMNS = "item_id, filename, status, error, attempts, source, progress, stage"
_COPY_COLUMNS = (
    "batch_key, position, item_id, filename, status, error, changed_at, source, attempts"
)


def _one_line(exc: BaseException) -> str:
    """The first line of an error's message (psycopg's carry DETAIL and HINT lines)."""
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def _store_error(what: str, exc: psycopg.Error) -> StoreError:
    if isinstance(exc, pg_errors.InsufficientPrivilege):
        return StoreError(
            f"PostgreSQL refused to {what}: {_one_line(exc)} "
            "(the database user needs to read and write these tables)"
        )
    return StoreError(f"PostgreSQL failed to {what}: {_one_line(exc)}")


def _header(row: Sequence[Any], items: tuple[ItemSnapshot, ...] = ()) -> BatchRecord:
    # Header rows are the columns, the key, then the paused flag.
    return header(row, PackedStats(bytes(row[12])), items, row[14])


def _loaded(row: Sequence[Any], items: tuple[ItemSnapshot, ...] = ()) -> BatchRecord:
    # Rows of the "loaded" statement: a header row, then the metadata.
    return header(row, PackedStats(bytes(row[12])), items, row[14], unpack_metadata(row[15]))


@attrs.define(eq=False, init=False)
class PostgresStore(Store):
    """Batches in PostgreSQL, for web and processing workers on many hosts.

    Args:
        dsn_or_pool: A libpq connection string or URL
            (``postgresql://user:password@host:5432/db``, ``"host=... dbname=..."``), or
            a ``psycopg_pool.ConnectionPool`` whose connections are in autocommit mode
            (``kwargs={"autocommit": True}``); a pool given is not closed by
            :meth:`close`.
        table_prefix: Put before every table name (lower-case letters, digits and ``_``,
            at most 40 characters), so several applications can share a database; it
            also names the notification channel (``<prefix>changes``).
        max_connections: The most connections the store's own pool opens.
        timeout: Seconds to wait for a connection (to connect, or for a free one in the
            pool) before failing with :class:`~batchtrack.StoreError`.

    Raises:
        ValidationError: A DSN that does not parse, a bad prefix or setting, or a pool
            whose connections are not in autocommit mode.
        SchemaVersionError: The tables were written by a newer batchtrack.
        StoreError: The server cannot be reached, refuses the connection, or the user
            may not create or read the tables.

    Every method raises :class:`~batchtrack.StoreError` (the psycopg error attached)
    when the server cannot be reached or answers with an error: never a silent success.
    """

    table_prefix: str
    max_connections: int
    timeout: float
    _pool: Any
    _owns_pool: bool
    _pid: int
    _orphans: list[Any]  # pools inherited through fork: the parent's, never touched
    _lock: threading.Lock
    _conninfo: str
    _connect_kwargs: dict[str, Any]
    _schema: str
    _channel: str
    _sql: dict[str, str]
    _closed: bool
    # The last stats blob written or read, decoded (see SQLiteStore): consecutive
    # transitions of a batch mostly see the blob the previous one wrote.
    _stats_memo: tuple[bytes, dict[str, float]]
    # Per batch, its header and some of its items as apply_all last read or wrote them,
    # all true at the header's version: what its next call decides on (see apply_all).
    _memo: dict[str, tuple[Any, dict[str, Any]]]
    _memo_lock: threading.Lock

    # Change notifications (see listen): this store has them.
    can_listen = True

    def __init__(
        self,
        dsn_or_pool: Any,
        *,
        table_prefix: str = "batchtrack_",
        max_connections: int = 10,
        timeout: float = 10.0,
    ) -> None:
        if not isinstance(table_prefix, str) or not _PREFIX.fullmatch(table_prefix):
            raise ValidationError(
                "table_prefix must be lower-case letters, digits and '_' (not starting "
                f"with a digit), at most 40 characters; got {table_prefix!r}"
            )
        if (
            isinstance(max_connections, bool)
            or not isinstance(max_connections, int)
            or max_connections < 1
        ):
            raise ValidationError(f"max_connections must be >= 1, not {max_connections!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValidationError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if isinstance(dsn_or_pool, ConnectionPool):
            pool: Any = dsn_or_pool
            conninfo, kwargs = pool.conninfo, dict(pool.kwargs or {})
            if not kwargs.get("autocommit"):
                raise ValidationError(
                    "PostgresStore needs a pool of autocommit connections: "
                    "ConnectionPool(..., kwargs={'autocommit': True})"
                )
            owns = False
        elif isinstance(dsn_or_pool, str):
            pool = None
            conninfo, kwargs = dsn_or_pool, self._defaults(dsn_or_pool, timeout)
            owns = True
        else:
            raise ValidationError(
                "PostgresStore needs a PostgreSQL URL or DSN like "
                "'postgresql://user@host:5432/db', or a psycopg_pool.ConnectionPool; "
                f"got {type(dsn_or_pool).__name__}"
            )
        self.__attrs_init__(
            table_prefix,
            max_connections,
            float(timeout),
            pool,
            owns,
            os.getpid(),
            [],
            threading.Lock(),
            conninfo,
            kwargs,
            "",
            f"{table_prefix}changes",
            {},
            False,
            (b"", {}),
            {},
            threading.Lock(),
        )
        self._prepare()
        if self._pool is None:
            self._pool = self._new_pool()

    @staticmethod
    def _defaults(dsn: str, timeout: float) -> dict[str, Any]:
        """Connection settings for a DSN: autocommit, and a connect timeout and an
        application name unless the DSN has its own."""
        try:
            given = conninfo_to_dict(dsn)
        except psycopg.Error as exc:
            raise ValidationError(
                f"not a usable PostgreSQL URL or DSN: {_one_line(exc)}; expected the form "
                "'postgresql://user:password@host:5432/dbname'"
            ) from None
        kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in given:
            kwargs["connect_timeout"] = max(2, round(timeout))
        if "application_name" not in given:
            kwargs["application_name"] = "batchtrack"
        return kwargs

    def _new_pool(self) -> Any:
        return ConnectionPool(
            self._conninfo,
            kwargs=self._connect_kwargs,
            min_size=1,
            max_size=self.max_connections,
            timeout=self.timeout,
            name=f"batchtrack-{self.table_prefix}",
            num_workers=2,
            open=True,
        )

    def _connect(self, what: str) -> psycopg.Connection[Any]:
        """A connection of its own (not from the pool), in autocommit mode."""
        try:
            return psycopg.connect(self._conninfo, **{**self._connect_kwargs, "autocommit": True})
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to PostgreSQL to {what}: {_one_line(exc)}") from exc

    # -- schema ------------------------------------------------------------------------

    def _prepare(self) -> None:
        """Find the schema, create or migrate the tables, and make the statements."""
        with self._connect("prepare the tables") as conn:
            try:
                row = conn.execute("SELECT current_schema()").fetchone()
                if row is None or row[0] is None:
                    raise StoreError(
                        "the connection's search_path names no schema to keep the tables in"
                    )
                self._schema = row[0]
                self._sql = self._statements()
                names = self._names()
                current = self._version(conn, names["version"])
                if current == SCHEMA_VERSION:
                    return
                self._check_not_newer(current)
                with conn.transaction():
                    # One migrator at a time per schema and prefix; the others wait, then
                    # find the work done.
                    conn.execute(
                        "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                        (f"batchtrack schema {self._schema}.{self.table_prefix}",),
                    )
                    conn.execute(
                        f"CREATE TABLE IF NOT EXISTS {names['version']} (version integer NOT NULL)"
                    )
                    current = self._version(conn, names["version"])
                    self._check_not_newer(current)
                    for version in range(current + 1, SCHEMA_VERSION + 1):
                        for statement in _MIGRATIONS[version]:
                            conn.execute(statement.format(**names))
                    if current != SCHEMA_VERSION:
                        conn.execute(f"DELETE FROM {names['version']}")
                        conn.execute(
                            f"INSERT INTO {names['version']} VALUES (%s)", (SCHEMA_VERSION,)
                        )
            except psycopg.Error as exc:
                raise _store_error(
                    f"prepare the tables {self.table_prefix}* in schema {self._schema!r}", exc
                ) from exc

    def _names(self) -> dict[str, str]:
        """The qualified, quoted table names, and the prefix."""
        schema = '"' + self._schema.replace('"', '""') + '"'
        p = self.table_prefix
        return {
            "batches": f'{schema}."{p}batches"',
            "items": f'{schema}."{p}items"',
            "version": f'{schema}."{p}schema"',
            "keys": f'{schema}."{p}keys"',
            "outbox": f'{schema}."{p}outbox"',
            "gone": f'{schema}."{p}webhooks_gone"',
            "metadata": f'{schema}."{p}metadata"',
            "p": p,
        }

    @staticmethod
    def _version(conn: psycopg.Connection[Any], table: str) -> int:
        """The schema version in ``table``; 0 when there is none yet."""
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
        if not row or not row[0]:
            return 0
        found = conn.execute(f"SELECT max(version) FROM {table}").fetchone()
        return int(found[0]) if found and found[0] is not None else 0

    def _check_not_newer(self, current: int) -> None:
        if current > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"the tables {self.table_prefix}* in schema {self._schema!r} have schema "
                f"version {current}, written by a newer batchtrack; this one understands up "
                f"to {SCHEMA_VERSION}. Upgrade batchtrack; the tables were not changed."
            )

    def _statements(self) -> dict[str, str]:
        """Every statement of the store, with its table names in place."""
        n = self._names()
        b, i, o = n["batches"], n["items"], n["outbox"]
        key_of = f"SELECT key FROM {b} WHERE batch_id = %s"
        write_item = (
            f"WITH batch AS (UPDATE {b} SET updated_at = %s, finished_at = %s,"
            " expires_at = %s, version = %s, completed = %s, failed = %s,"
            " processing = %s, pending = %s, stats = %s"
            " WHERE key = %s AND version = %s RETURNING key),"
            f" item AS (UPDATE {i} SET status = %s, error = %s, changed_at = %s,"
            " attempts = %s, lease_until = %s, beat_at = %s, version = %s,"
            " progress = NULL, stage = NULL"
            " WHERE batch_key = (SELECT key FROM batch) AND position = %s)"
        )
        # The end marker: the (entry id, batch id, version, at, at) of end_marker().
        end = (
            f"INSERT INTO {o} (entry_id, batch_id, version, ended_at, next_at)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
        )
        outbox = "entry_id, batch_id, version, ended_at, url, body, attempts"
        listed = (
            f"SELECT {', '.join('b.' + c for c in _COLUMNS)}, b.key, b.paused, m.metadata"
            f" FROM {b} b LEFT JOIN {n['metadata']} m ON m.batch_key = b.key"
        )
        return {
            "loaded": f"{listed} WHERE b.batch_id = %s",
            "listed": listed,
            "after": f"SELECT created_at, owner FROM {b} WHERE batch_id = %s",
            "create_metadata": f"INSERT INTO {n['metadata']} (batch_key, metadata) VALUES (%s, %s)",
            "delete_metadata": f"DELETE FROM {n['metadata']} WHERE batch_key = %s",
            "purge_metadata": f"DELETE FROM {n['metadata']} WHERE batch_key = ANY(%s)",
            "header": f"SELECT {', '.join(_COLUMNS)}, key, paused FROM {b} WHERE batch_id = %s",
            # A transition reads the batch and the item in one statement (one snapshot,
            # no lock, no transaction), decides, and writes both in one statement that
            # applies only if the batch's version is still the one it read: a
            # compare-and-set on the batch's row, which serialises every writer of the
            # batch (a concurrent one waits for the row, then finds the version moved
            # and reads again). Two round trips, one commit; one round trip and no
            # write at all when nothing is to change (a redelivered message).
            "peek": (
                f"SELECT {', '.join('b.' + c for c in _COLUMNS)}, b.key, i.filename,"
                " i.status, i.error, i.position, i.changed_at, i.attempts, i.source,"
                f" i.lease_until, b.paused FROM {b} b LEFT JOIN {i} i"
                " ON i.batch_key = b.key AND i.item_id = %s WHERE b.batch_id = %s"
            ),
            "write_item": write_item + " SELECT pg_notify(%s, %s) FROM batch",
            # The same for the transition that ends its batch, with the end marker.
            "write_item_end": (
                write_item + f", ended AS (INSERT INTO {o} (entry_id, batch_id, version, ended_at,"
                " next_at) SELECT %s, %s, %s, %s, %s FROM batch ON CONFLICT DO NOTHING)"
                " SELECT pg_notify(%s, %s) FROM batch"
            ),
            "end": end,
            # apply_all's read: the header, the items named and the next pending items
            # after them (the ones an orchestrator starts next, kept for the calls after
            # this one), in one statement: one snapshot, one round trip.
            "peek_all": (
                f"WITH h AS (SELECT {', '.join(_COLUMNS)}, key, paused FROM {b}"
                " WHERE batch_id = %s),"
                f" named AS (SELECT i.* FROM {i} i, h WHERE i.batch_key = h.key"
                " AND i.item_id = ANY(%s)),"
                # (Keys as subqueries, not a join: the planner then walks the primary
                # key in order and stops after the limit.)
                f" ahead AS (SELECT i.* FROM {i} i WHERE i.batch_key = (SELECT key FROM h)"
                " AND i.position > (SELECT max(position) FROM named)"
                f" AND i.status = {_CODE[Status.PENDING]} ORDER BY i.position LIMIT %s)"
                " SELECT h.*, n.item_id, n.filename, n.status, n.error, n.position,"
                " n.changed_at, n.attempts, n.source, n.lease_until FROM h LEFT JOIN"
                " (SELECT * FROM named UNION ALL SELECT * FROM ahead) n ON true"
            ),
            # apply_all's write: the header, every item changed (its last state), the end
            # markers and the notification, in one statement that applies only if the
            # batch's version is still the one its decisions were made on (as
            # write_item); it answers one row when it applied.
            "write_all": (
                f"WITH batch AS (UPDATE {b} SET updated_at = %s, finished_at = %s,"
                " expires_at = %s, version = %s, completed = %s, failed = %s,"
                " processing = %s, pending = %s, stats = %s"
                " WHERE key = %s AND version = %s RETURNING key),"
                f" item AS (UPDATE {i} SET status = v.status, error = v.error,"
                " changed_at = v.changed_at, attempts = v.attempts,"
                " lease_until = v.lease_until, beat_at = v.beat_at, version = v.version,"
                " progress = NULL, stage = NULL FROM (SELECT"
                " unnest(%s::integer[]) AS position, unnest(%s::smallint[]) AS status,"
                " unnest(%s::text[]) AS error, unnest(%s::float8[]) AS changed_at,"
                " unnest(%s::integer[]) AS attempts, unnest(%s::float8[]) AS lease_until,"
                " unnest(%s::float8[]) AS beat_at, unnest(%s::bigint[]) AS version) v"
                f" WHERE batch_key = (SELECT key FROM batch) AND {i}.position = v.position),"
                f" ended AS (INSERT INTO {o} (entry_id, batch_id, version, ended_at, next_at)"
                " SELECT m.* FROM batch, unnest(%s::text[], %s::text[], %s::bigint[],"
                " %s::float8[], %s::float8[]) m ON CONFLICT DO NOTHING)"
                " SELECT pg_notify(%s, %s) FROM batch"
            ),
            # Claimers skip the rows another claimer holds: never two for one entry.
            "outbox_claim": (
                f"UPDATE {o} SET lease_until = %s WHERE entry_id IN (SELECT entry_id FROM {o}"
                " WHERE next_at <= %s AND (lease_until IS NULL OR lease_until <= %s)"
                " ORDER BY next_at LIMIT %s FOR UPDATE SKIP LOCKED)"
                f" RETURNING {outbox}, next_at"
            ),
            "outbox_add": (
                f"INSERT INTO {o} ({outbox}, next_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT DO NOTHING"
            ),
            "outbox_done": f"DELETE FROM {o} WHERE entry_id = %s",
            "outbox_retry": (
                f"UPDATE {o} SET attempts = %s, next_at = %s, lease_until = NULL"
                " WHERE entry_id = %s"
            ),
            "unsubscribe": f"INSERT INTO {n['gone']} (url) VALUES (%s) ON CONFLICT DO NOTHING",
            "unsubscribe_drop": f"DELETE FROM {o} WHERE url = %s",
            "unsubscribed": f"SELECT url FROM {n['gone']}",
            "drop_markers": f"DELETE FROM {o} WHERE url IS NULL AND batch_id = ANY(%s)",
            # A heartbeat changes no version: the batch's expiry and the item's lease.
            "renew": (
                f"WITH batch AS (UPDATE {b} SET expires_at = %s"
                " WHERE key = %s AND version = %s RETURNING key)"
                f" UPDATE {i} SET lease_until = %s, beat_at = %s"
                " WHERE batch_key = (SELECT key FROM batch) AND position = %s RETURNING 1"
            ),
            # Writers that decide on more than a version take the batch row's lock
            # first (SELECT ... FOR UPDATE), and compare-and-set writers wait for them:
            # reclaims (a lease, which heartbeats change without a version), bulk
            # changes, deletes. They read the item after the lock, in a statement of
            # its own: one statement that waited for the lock would see the batch's new
            # row but the item as it was (READ COMMITTED re-reads only the rows it
            # locks). Both go to the server together (pipeline mode): one round trip.
            "lock_header": (
                f"SELECT {', '.join(_COLUMNS)}, key, paused FROM {b} WHERE batch_id = %s FOR UPDATE"
            ),
            "report": (
                f"UPDATE {i} SET progress = %s, stage = %s, version = %s"
                " WHERE batch_key = %s AND position = %s"
            ),
            "report_batch": (
                f"UPDATE {b} SET version = %s, updated_at = %s, expires_at = %s WHERE key = %s"
            ),
            "set_paused": (
                f"UPDATE {b} SET paused = %s, version = version + 1, updated_at = %s,"
                " expires_at = CASE WHEN finished_at IS NULL THEN %s ELSE expires_at END"
                " WHERE key = %s"
            ),
            "item": (
                "SELECT filename, status, error, position, changed_at, attempts, source,"
                f" lease_until FROM {i} WHERE batch_key = ({key_of}) AND item_id = %s"
            ),
            "write_many": (
                f"WITH moved AS (UPDATE {i} SET status = %s, error = %s, changed_at = %s,"
                " attempts = CASE WHEN %s THEN 0 ELSE attempts END, lease_until = NULL,"
                " progress = NULL, stage = NULL, version = v.version"
                " FROM (SELECT unnest(%s::integer[]) AS position,"
                " unnest(%s::bigint[]) AS version) v"
                f" WHERE batch_key = %s AND {i}.position = v.position),"
                f" batch AS (UPDATE {b} SET updated_at = %s, finished_at = %s,"
                " expires_at = %s, version = %s, completed = %s, failed = %s,"
                " processing = %s, pending = %s WHERE key = %s)"
                " SELECT pg_notify(%s, %s)"
            ),
            "create": (
                f"INSERT INTO {b} ({', '.join(_COLUMNS)})"
                f" VALUES ({', '.join(['%s'] * len(_COLUMNS))}) RETURNING key"
            ),
            "copy": f"COPY {i} ({_COPY_COLUMNS}) FROM STDIN",
            # A creator with a key inserts its row or, when the key is taken, waits for
            # the creator holding it to commit and then locks the row it wrote.
            "claim_key": (
                f"INSERT INTO {n['keys']} (owner, key, batch_id, fingerprint, expires_at)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (owner, key) DO NOTHING"
                " RETURNING batch_id"
            ),
            "lock_key": (
                f"SELECT batch_id, fingerprint, expires_at FROM {n['keys']}"
                " WHERE owner = %s AND key = %s FOR UPDATE"
            ),
            "batch_alive": f"SELECT 1 FROM {b} WHERE batch_id = %s AND expires_at > %s",
            "replace_key": (
                f"UPDATE {n['keys']} SET batch_id = %s, fingerprint = %s, expires_at = %s"
                " WHERE owner = %s AND key = %s"
            ),
            "purge_keys": f"DELETE FROM {n['keys']} WHERE expires_at <= %s",
            "notify": "SELECT pg_notify(%s, %s)",
            "notify_many": "SELECT pg_notify(%s, unnest(%s::text[]))",
            "items": (
                f"SELECT {_ITEM_COLUMNS} FROM {i} WHERE batch_key = ({key_of}) ORDER BY position"
            ),
            "position": f"SELECT position FROM {i} WHERE batch_key = ({key_of}) AND item_id = %s",
            "named": (
                f"SELECT item_id, position, status FROM {i}"
                f" WHERE batch_key = ({key_of}) AND item_id = ANY(%s)"
            ),
            "in_status": (
                f"SELECT position, status FROM {i}"
                f" WHERE batch_key = ({key_of}) AND status = ANY(%s)"
            ),
            "lost": (
                "SELECT b.batch_id, i.item_id, i.attempts, i.beat_at, i.lease_until"
                f" FROM {i} i JOIN {b} b ON b.key = i.batch_key"
                f" WHERE i.lease_until <= %s AND i.status = {_CODE[Status.PROCESSING]}"
                " AND b.expires_at > %s ORDER BY i.lease_until LIMIT %s"
            ),
            "open": f"SELECT batch_id FROM {b} WHERE finished_at IS NULL AND expires_at > %s",
            "expired": f"SELECT batch_id FROM {b} WHERE expires_at <= %s LIMIT %s",
            "delete": f"DELETE FROM {b} WHERE batch_id = %s RETURNING key",
            "delete_items": f"DELETE FROM {i} WHERE batch_key = %s",
            # Locked in key order, so that two sweepers never deadlock; a batch a
            # transition revived meanwhile fails the re-checked condition and stays.
            "purge_lock": (
                f"SELECT key, batch_id FROM {b} WHERE expires_at <= %s"
                " ORDER BY key LIMIT %s FOR UPDATE"
            ),
            "purge_items": f"DELETE FROM {i} WHERE batch_key = ANY(%s)",
            "purge_batches": f"DELETE FROM {b} WHERE key = ANY(%s)",
            "items_table": i,
            "key_of": key_of,
        }

    # -- connections -------------------------------------------------------------------

    def _the_pool(self) -> Any:
        if self._closed:
            raise StoreError(f"the PostgreSQL store {self.table_prefix}* is closed")
        if self._pid != os.getpid() and self._owns_pool:
            with self._lock:
                if self._pid != os.getpid():
                    # A forked child: the inherited pool's connections are the parent's
                    # sessions. Keep it referenced (closing or collecting it would end
                    # them) and open a pool of our own.
                    self._orphans.append(self._pool)
                    self._pool = self._new_pool()
                    self._pid = os.getpid()
        return self._pool

    @contextmanager
    def _transaction(
        self, what: str, begin: str = "BEGIN", *, pipeline: bool = True
    ) -> Iterator[psycopg.Connection[Any]]:
        """One transaction on a pooled connection; psycopg errors become StoreError.

        In pipeline mode (the default) statements are sent as they are executed and the
        client waits only when it fetches a result: ``BEGIN`` and the reads that follow
        it cost one round trip, the writes and ``COMMIT`` another.
        """
        pool = self._the_pool()
        try:
            with pool.connection() as conn:
                try:
                    with conn.pipeline() if pipeline else contextlib.nullcontext():
                        conn.execute(begin)
                        yield conn
                        conn.execute("COMMIT")
                except BaseException:
                    if not conn.closed and conn.info.transaction_status != _IDLE:
                        # A broken connection cannot roll back; the pool drops it.
                        with contextlib.suppress(psycopg.Error):
                            conn.execute("ROLLBACK")
                    raise
        except psycopg.Error as exc:
            self._after_error(pool, exc)
            raise _store_error(what, exc) from exc

    def _read(self, what: str, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Any]]:
        """The rows of each statement, all read from one snapshot, in one round trip (a
        read-only REPEATABLE READ transaction, pipelined)."""
        pool = self._the_pool()
        try:
            with pool.connection() as conn:
                try:
                    with conn.pipeline() as pipe:
                        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                        cursors = [conn.execute(q, args) for q, args in statements]
                        conn.execute("COMMIT")
                        pipe.sync()
                        return [cursor.fetchall() for cursor in cursors]
                except BaseException:
                    if not conn.closed and conn.info.transaction_status != _IDLE:
                        with contextlib.suppress(psycopg.Error):
                            conn.execute("ROLLBACK")
                    raise
        except psycopg.Error as exc:
            self._after_error(pool, exc)
            raise _store_error(what, exc) from exc

    def _query(self, what: str, statement: str, args: Sequence[Any]) -> list[Any]:
        """The rows of one statement, on its own (one statement is one snapshot)."""
        pool = self._the_pool()
        try:
            with pool.connection() as conn:
                rows: list[Any] = conn.execute(statement, args).fetchall()
                return rows
        except psycopg.Error as exc:
            self._after_error(pool, exc)
            raise _store_error(what, exc) from exc

    @staticmethod
    def _after_error(pool: Any, exc: psycopg.Error) -> None:
        """After a lost connection, have the pool test its idle ones, so that the next
        calls get live connections instead of failing one by one (after a restart)."""
        if isinstance(exc, psycopg.OperationalError):
            try:
                pool.check()
            except Exception:  # the pool is closed, or the check failed: nothing to do
                log.debug("batchtrack: checking the pool failed", exc_info=True)

    def close(self) -> None:
        """Close the store's own pool (a pool that was given stays open)."""
        self._closed = True
        if self._owns_pool and self._pid == os.getpid():
            self._pool.close()

    # -- the store boundary ------------------------------------------------------------

    def create(self, batch: BatchRecord, items: Sequence[ItemSnapshot]) -> None:
        # COPY needs the connection outside pipeline mode.
        with self._transaction(f"create batch {batch.batch_id!r}", pipeline=False) as conn:
            self._insert(conn, batch, items)

    def create_keyed(
        self,
        batch: BatchRecord,
        items: Sequence[ItemSnapshot],
        key: str,
        fingerprint: str,
        key_expires_at: float,
    ) -> tuple[str, str] | None:
        q = self._sql
        now = batch.created_at
        owner = batch.owner or ""
        with self._transaction(f"create batch {batch.batch_id!r}", pipeline=False) as conn:
            claimed = conn.execute(
                q["claim_key"], (owner, key, batch.batch_id, fingerprint, key_expires_at)
            ).fetchone()
            if claimed is None:
                # Each statement below reads what was committed when it began: after the
                # lock, the batch of whoever wrote the row last.
                row = conn.execute(q["lock_key"], (owner, key)).fetchone()
                if (
                    row is not None
                    and row[2] > now
                    and conn.execute(q["batch_alive"], (row[0], now)).fetchone() is not None
                ):
                    return str(row[0]), str(row[1])
                conn.execute(
                    q["replace_key"], (batch.batch_id, fingerprint, key_expires_at, owner, key)
                )
            self._insert(conn, batch, items)
        return None

    def _insert(
        self, conn: psycopg.Connection[Any], batch: BatchRecord, items: Sequence[ItemSnapshot]
    ) -> None:
        """Write a new batch and its items, inside the caller's transaction."""
        q = self._sql
        try:
            row = conn.execute(
                q["create"],
                _values(batch),
            ).fetchone()
        except pg_errors.UniqueViolation:
            raise StoreError(f"batch {batch.batch_id!r} exists already") from None
        assert row is not None
        key = row[0]
        if batch.metadata:
            conn.execute(q["create_metadata"], (key, pack_metadata(batch.metadata)))
        created = batch.created_at
        with conn.cursor() as cursor, cursor.copy(q["copy"]) as copy:
            for n, item in enumerate(items):
                copy.write_row(
                    (
                        key,
                        n,
                        item.id,
                        item.filename,
                        _CODE[item.status],
                        item.error,
                        created,
                        item.source,
                        item.attempts,
                    )
                )
        conn.execute(q["notify"], (self._channel, batch.batch_id))

    def _peek(self, what: str, batch_id: str, item_id: str, at: float) -> tuple[Any, Any]:
        """The batch's header and the item, read together without a lock."""
        rows = self._query(what, self._sql["peek"], (item_id, batch_id))
        if not rows or rows[0][5] <= at:
            raise BatchNotFound(batch_id)
        row = rows[0]
        if row[14] is None:
            raise ItemNotFound(batch_id, item_id)
        return (*row[:14], row[-1]), row[14:]

    def _locked(
        self, conn: psycopg.Connection[Any], batch_id: str, item_id: str, at: float
    ) -> tuple[Any, Any]:
        """The batch's header, its row locked, and the item read after the lock."""
        head = conn.execute(self._sql["lock_header"], (batch_id,))
        found = conn.execute(self._sql["item"], (batch_id, item_id))
        row, item = head.fetchone(), found.fetchone()
        if row is None or row[5] <= at:
            raise BatchNotFound(batch_id)
        if item is None:
            raise ItemNotFound(batch_id, item_id)
        return row, item

    @staticmethod
    def _unchanged(transition: Transition, item: Any, paused: bool) -> Outcome | None:
        """What a transition does to an item (an ``item`` row) of a batch (paused or
        not) if it changes nothing; None when it applies."""
        previous = _STATUSES[item[1]]
        if previous is transition.target:
            return Outcome.UNCHANGED
        if (
            previous not in transition.sources
            or (
                transition.lost_before is not None
                and (item[7] is None or item[7] > transition.lost_before)
            )
            or (transition.max_attempts is not None and item[5] >= transition.max_attempts)
        ):
            return Outcome.REJECTED
        if transition.unless_paused and paused:
            return Outcome.PAUSED
        return None

    def apply(self, batch_id: str, transition: Transition) -> TransitionResult:
        self._memo.pop(batch_id, None)  # its version moves on: apply_all reads again
        item_id = transition.item_id
        what = f"update batch {batch_id!r}"
        if transition.lost_before is not None:
            with self._transaction(what) as conn:
                row, it = self._locked(conn, batch_id, item_id, transition.at)
                outcome = self._unchanged(transition, it, row[14])
                if outcome is not None:
                    return _result(outcome, _STATUSES[it[1]], _item(item_id, it), _header(row))
                args, result = self._move(batch_id, transition, row, it)
                conn.execute(*self._write_item(row, args, result))  # holds the lock: applies
            return result
        for _ in range(_TRIES):
            row, it = self._peek(what, batch_id, item_id, transition.at)
            outcome = self._unchanged(transition, it, row[14])
            if outcome is not None:
                return _result(outcome, _STATUSES[it[1]], _item(item_id, it), _header(row))
            args, result = self._move(batch_id, transition, row, it)
            if self._query(what, *self._write_item(row, args, result)):
                return result
        raise _contended(batch_id)

    def apply_all(self, batch_id: str, transitions: Sequence[Transition]) -> list[TransitionResult]:
        # An optimistic compare-and-set, like apply's, for the whole call: the header and
        # every item named read in one statement, every transition decided in Python,
        # and header, items, end markers and notification written in one statement that
        # applies only if the batch's version is still the one read; when another writer
        # won, all of it again. The read also takes the next pending items, and what the
        # write leaves is kept (_memo): the next call, deciding on those, skips its read
        # (one round trip) and the version guard of its write tells whether they were
        # still true. Reclaims (lost_before) decide on a lease, which heartbeats change
        # without a version: they take the batch row's lock instead.
        if not transitions:
            return []
        if any(t.lost_before is not None for t in transitions):
            return self._apply_all_locked(batch_id, transitions)
        what = f"update batch {batch_id!r}"
        names = list(dict.fromkeys(t.item_id for t in transitions))
        at = min(t.at for t in transitions)
        for _ in range(_TRIES):
            known = self._memo.get(batch_id)
            if (
                known is None
                or known[0][5] <= at  # (maybe a heartbeat moved it on: read)
                or any(name not in known[1] for name in names)
            ):
                known = self._peek_all(what, batch_id, names)
                fresh = True
            else:
                fresh = False
            row, items = known
            _check(batch_id, transitions, row, items)
            results, row, changed, ends = self._decide(batch_id, transitions, row, items)
            if not changed:
                if fresh:  # nothing to write: the read was the answer
                    return results
                self._memo.pop(batch_id, None)  # judged on what was kept: read to confirm
                continue
            args = self._write_all(known[0], row, changed, ends)
            if self._query(what, self._sql["write_all"], args):
                self._keep(batch_id, row, {**items, **{k: v[0] for k, v in changed.items()}})
                return results
            self._memo.pop(batch_id, None)
        raise _contended(batch_id)

    def _peek_all(self, what: str, batch_id: str, names: list[str]) -> tuple[Any, dict[str, Any]]:
        """The batch's header and its items named and the next pending ones, as
        ``(row, {item_id: item})``, from one snapshot; kept for the next call."""
        rows = self._query(what, self._sql["peek_all"], (batch_id, names, _AHEAD))
        if not rows:
            raise BatchNotFound(batch_id)
        row = rows[0][:15]
        items = {r[15]: r[16:] for r in rows if r[15] is not None}
        kept = self._memo.get(batch_id)
        if kept is not None and kept[0][6] == row[6] and kept[0][13] == row[13]:
            items = {**kept[1], **items}  # the same version: what was kept is still true
        self._keep(batch_id, row, items)
        return row, items

    def _keep(self, batch_id: str, row: Any, items: dict[str, Any]) -> None:
        """Keep ``row`` and ``items`` (all true at ``row``'s version) for the next call
        on the batch, unless something newer is kept already: its pending and
        processing items (finished ones are rarely named again), at most _MEMO_ITEMS of
        them, and at most _MEMO_BATCHES batches."""
        memo = self._memo
        items = {k: v for k, v in items.items() if v[1] not in _DONE}
        with self._memo_lock:
            kept = memo.get(batch_id)
            if kept is not None and kept[0][13] == row[13] and kept[0][6] > row[6]:
                return
            if len(items) > _MEMO_ITEMS:
                items = dict(list(items.items())[-_MEMO_ITEMS:])
            memo.pop(batch_id, None)
            if row[4] is not None:  # finished: no more starts to come
                return
            memo[batch_id] = (row, items)
            while len(memo) > _MEMO_BATCHES:
                memo.pop(next(iter(memo)))

    def _decide(
        self, batch_id: str, transitions: Sequence[Transition], row: Any, items: dict[str, Any]
    ) -> tuple[list[TransitionResult], Any, dict[str, Any], list[tuple[Any, ...]]]:
        """Judge each transition as apply would, after the ones before: the results, the
        header after them all, the items changed (their last state and write
        arguments), and the end markers of the transitions that ended the batch."""
        results = []
        changed: dict[str, Any] = {}
        ends: list[tuple[Any, ...]] = []
        items = dict(items)
        for transition in transitions:
            it = items[transition.item_id]
            outcome = self._unchanged(transition, it, row[14])
            if outcome is not None:
                item = _item(transition.item_id, it)
                results.append(_result(outcome, _STATUSES[it[1]], item, _header(row)))
                continue
            args, result = self._move(batch_id, transition, row, it)
            results.append(result)
            if result.finished_at is not None and row[4] is None:  # it ended the batch
                marker = end_marker(row[0], result.version, result.finished_at)
                stamp = marker.ended_at
                ends.append((marker.entry_id, marker.batch_id, marker.version, stamp, stamp))
            row = _after(row, transition, result, args)
            it = (
                it[0],
                _CODE[transition.target],
                transition.error,
                it[3],
                transition.at,
                args[14],
                it[6],
                args[15],
            )
            items[transition.item_id] = it
            changed[transition.item_id] = (it, args)
        return results, row, changed, ends

    def _write_all(
        self, before: Any, row: Any, changed: dict[str, Any], ends: list[tuple[Any, ...]]
    ) -> tuple[Any, ...]:
        """The arguments of ``write_all``: the header ``row`` (guarded by ``before``'s
        version), the ``changed`` items, the end markers."""
        writes = [args for _, args in changed.values()]
        return (
            row[3],
            row[4],
            row[5],
            row[6],
            *row[8:13],
            row[13],
            before[6],
            [a[18] for a in writes],
            [a[11] for a in writes],
            [a[12] for a in writes],
            [a[13] for a in writes],
            [a[14] for a in writes],
            [a[15] for a in writes],
            [a[16] for a in writes],
            [a[17] for a in writes],
            *([e[k] for e in ends] for k in range(5)),
            self._channel,
            row[0],
        )

    def _apply_all_locked(
        self, batch_id: str, transitions: Sequence[Transition]
    ) -> list[TransitionResult]:
        """apply_all in one transaction holding the batch row's lock: the header and
        every item read in one round trip (pipeline mode), the writes and the commit in
        a second one. For reclaims, which decide on a lease."""
        self._memo.pop(batch_id, None)
        q = self._sql
        with self._transaction(f"update batch {batch_id!r}") as conn:
            head = conn.execute(q["lock_header"], (batch_id,))
            reads = {
                item_id: conn.execute(q["item"], (batch_id, item_id))
                for item_id in dict.fromkeys(t.item_id for t in transitions)
            }
            row: Any = head.fetchone()
            items: dict[str, Any] = {item_id: read.fetchone() for item_id, read in reads.items()}
            _check(batch_id, transitions, row, items)
            results, after, changed, ends = self._decide(batch_id, transitions, row, items)
            if changed:  # holds the lock: it applies
                conn.execute(self._sql["write_all"], self._write_all(row, after, changed, ends))
        return results

    def _write_item(
        self, row: Any, args: tuple[Any, ...], result: TransitionResult
    ) -> tuple[str, tuple[Any, ...]]:
        """The statement and arguments that write a transition: ``write_item``, or, when
        it ends the batch (``row`` was open), ``write_item_end`` with the end marker."""
        if result.finished_at is None or row[4] is not None:
            return self._sql["write_item"], args
        marker = end_marker(row[0], result.version, result.finished_at)
        at = marker.ended_at
        ended = (marker.entry_id, marker.batch_id, marker.version, at, at)
        return self._sql["write_item_end"], (*args[:-2], *ended, *args[-2:])

    def _move(
        self, batch_id: str, transition: Transition, row: Any, it: Any
    ) -> tuple[tuple[Any, ...], TransitionResult]:
        """The arguments of ``write_item`` that apply ``transition`` to the item ``it``
        of the batch ``row``, and the answer once it has."""
        previous = _STATUSES[it[1]]
        target = transition.target
        counts, packed, stats, attempts = _step(
            row,
            bytes(row[12]),
            self._stats_memo,
            previous,
            transition,
            transition.at - it[4],
            it[5],
        )
        self._stats_memo = (packed, stats)
        lease = transition.lease_until
        finished_at, expires_at = _ends(counts, transition)
        version = row[6] + 1
        args = (
            transition.at,
            finished_at,
            expires_at,
            version,
            counts[Status.COMPLETED],
            counts[Status.FAILED],
            counts[Status.PROCESSING],
            counts[Status.PENDING],
            packed,
            row[13],
            row[6],
            _CODE[target],
            transition.error,
            transition.at,
            attempts,
            lease,
            None if lease is None else transition.at,
            version,
            it[3],
            self._channel,
            batch_id,
        )
        result = TransitionResult(
            Outcome.APPLIED,
            previous,
            ItemSnapshot(transition.item_id, it[0], target, transition.error, attempts, it[6]),
            _progress(row[7], counts),
            version,
            row[2],
            finished_at,
            expires_at,
            stats,
        )
        return args, result

    def set_paused(self, batch_id: str, paused: bool, at: float, expires_at_open: float) -> bool:
        q = self._sql
        with self._transaction(f"pause batch {batch_id!r}") as conn:
            row = conn.execute(q["lock_header"], (batch_id,)).fetchone()
            if row is None or row[5] <= at:
                raise BatchNotFound(batch_id)
            if bool(row[14]) is paused or (paused and row[4] is not None):
                return False
            conn.execute(q["set_paused"], (paused, at, expires_at_open, row[13]))
            conn.execute(q["notify"], (self._channel, batch_id))
        return True

    def report(
        self,
        batch_id: str,
        item_id: str,
        fraction: float,
        stage: str | None,
        at: float,
        expires_at_open: float,
    ) -> ItemSnapshot:
        q = self._sql
        with self._transaction(f"report on item {item_id!r} of batch {batch_id!r}") as conn:
            row, it = self._locked(conn, batch_id, item_id, at)
            item = _item(item_id, it)
            if item.status is not Status.PROCESSING:
                return item
            version = row[6] + 1
            conn.execute(q["report"], (fraction, stage, version, row[13], it[3]))
            conn.execute(q["report_batch"], (version, at, expires_at_open, row[13]))
            conn.execute(q["notify"], (self._channel, batch_id))
        return attrs.evolve(item, progress=fraction, stage=stage)

    def renew(
        self, batch_id: str, item_id: str, at: float, lease_until: float, expires_at_open: float
    ) -> TransitionResult:
        # A heartbeat changes no status, count or version: no notification. (What
        # apply_all keeps has its old expiry: dropped.)
        self._memo.pop(batch_id, None)
        what = f"renew a lease in batch {batch_id!r}"
        for _ in range(_TRIES):
            row, it = self._peek(what, batch_id, item_id, at)
            status = _STATUSES[it[1]]
            header = _header(row)
            if status is not Status.PROCESSING:
                return _result(Outcome.REJECTED, status, _item(item_id, it), header)
            args = (expires_at_open, row[13], row[6], lease_until, at, it[3])
            if self._query(what, self._sql["renew"], args):
                header = attrs.evolve(header, expires_at=expires_at_open)
                return _result(Outcome.APPLIED, status, _item(item_id, it), header)
        raise _contended(batch_id)

    def apply_many(
        self, batch_id: str, transition: Transition, item_ids: Sequence[str] | None = None
    ) -> BulkResult:
        target = transition.target
        sources = [_CODE[s] for s in transition.sources if s is not target]
        q = self._sql
        names = None if item_ids is None else list(dict.fromkeys(item_ids))
        with self._transaction(f"update batch {batch_id!r}") as conn:
            # The lock, then the items (read after it), in one round trip.
            head = conn.execute(q["lock_header"], (batch_id,))
            if names is None:
                chosen = conn.execute(q["in_status"], (batch_id, sources))
            else:
                chosen = conn.execute(q["named"], (batch_id, names))
            row = head.fetchone()
            rows = chosen.fetchall()
            if row is None or row[5] <= transition.at:
                raise BatchNotFound(batch_id)
            key = row[13]
            found: list[tuple[int, int]]
            if names is None:
                found = rows
            else:
                hits = {r[0]: (r[1], r[2]) for r in rows}
                for item_id in names:
                    if item_id not in hits:
                        raise ItemNotFound(batch_id, item_id)
                rejected = [
                    (item_id, _STATUSES[hits[item_id][1]])
                    for item_id in names
                    if hits[item_id][1] not in sources
                ]
                if rejected:
                    return BulkResult(0, tuple(rejected), _header(row).progress, row[6])
                found = [hits[item_id] for item_id in names]
            found.sort()  # by position: versions are counted in creation order
            counts = _counts(row)
            for _, code in found:
                counts[_STATUSES[code]] -= 1
                counts[target] += 1
            version = row[6]
            if found:
                finished_at, expires_at = _ends(counts, transition)
                conn.execute(
                    q["write_many"],
                    (
                        _CODE[target],
                        transition.error,
                        transition.at,
                        transition.reset_attempts,
                        [position for position, _ in found],
                        # One version each, in order, as if applied one by one.
                        list(range(version + 1, version + 1 + len(found))),
                        key,
                        transition.at,
                        finished_at,
                        expires_at,
                        version + len(found),
                        counts[Status.COMPLETED],
                        counts[Status.FAILED],
                        counts[Status.PROCESSING],
                        counts[Status.PENDING],
                        key,
                        self._channel,
                        batch_id,
                    ),
                )
                version += len(found)
                if finished_at is not None and row[4] is None:  # it ended the batch
                    marker = end_marker(batch_id, version, transition.at)
                    at = marker.ended_at
                    conn.execute(q["end"], (marker.entry_id, batch_id, version, at, at))
        return BulkResult(len(found), (), _progress(row[7], counts), version)

    def lost(self, now: float, limit: int) -> list[LostItem]:
        rows = self._query("list lost items", self._sql["lost"], (now, now, limit))
        return [LostItem(*r) for r in rows]

    def open_batches(self, now: float) -> list[str]:
        return [r[0] for r in self._query("list open batches", self._sql["open"], (now,))]

    def load(self, batch_id: str, *, items: bool = True) -> BatchRecord | None:
        what = f"read batch {batch_id!r}"
        if not items:
            header = self._query(what, self._sql["loaded"], (batch_id,))
            return _loaded(header[0]) if header else None
        head, found = self._read(
            what, [(self._sql["loaded"], (batch_id,)), (self._sql["items"], (batch_id,))]
        )
        return _loaded(head[0], _snapshots(found)) if head else None

    def load_items(self, batch_id: str, query: ItemQuery) -> BatchRecord | None:
        # Each read walks one index from where it starts: items_by_version for what
        # changed, items_failed for failed items, the primary key for the rest.
        where = [f"batch_key = ({self._sql['key_of']})"]
        args: list[Any] = [batch_id]
        if query.since is not None:
            where.append("version > 0 AND version > %s")  # the literal admits the index
            args.append(query.since)
        if query.status is not None:
            # A literal, so that the planner may use the partial index items_failed.
            where.append(f"status = {_CODE[query.status]}")
        statements: list[tuple[str, Sequence[Any]]] = [(self._sql["loaded"], (batch_id,))]
        if query.after is not None:
            # The item named is also looked for on its own, to tell a missing one apart.
            where.append(f"position > ({self._sql['position']})")
            args += [batch_id, query.after]
            statements.append((self._sql["position"], (batch_id, query.after)))
        limit = "" if query.limit is None else f" LIMIT {int(query.limit)}"
        statements.append(
            (
                f"SELECT {_ITEM_COLUMNS} FROM {self._sql['items_table']}"
                f" WHERE {' AND '.join(where)} ORDER BY position{limit}",
                args,
            )
        )
        head, *after, found = self._read(f"read batch {batch_id!r}", statements)
        if not head:
            return None
        if after and not after[0]:
            raise ItemNotFound(batch_id, query.after)
        return _loaded(head[0], _snapshots(found))

    def list_batches(
        self, owner: str | None, now: float, limit: int, after: str | None
    ) -> list[BatchRecord]:
        # One backward walk of batches_by_owner (or batches_by_time) from the cursor;
        # expired batches not yet purged are skipped on the way.
        q = self._sql
        where = ["b.expires_at > %s"]
        args: list[Any] = [now]
        if owner is not None:
            where.append("b.owner = %s")
            args.append(owner)
        if after is not None:
            hit = self._query("list batches", q["after"], (after,))
            if not hit or (owner is not None and hit[0][1] != owner):
                raise BatchNotFound(after)
            where.append("(b.created_at, b.batch_id) < (%s, %s)")
            args += [hit[0][0], after]
        rows = self._query(
            "list batches",
            f"{q['listed']} WHERE {' AND '.join(where)}"
            " ORDER BY b.created_at DESC, b.batch_id DESC LIMIT %s",
            (*args, limit),
        )
        return [_loaded(row) for row in rows]

    def delete(self, batch_id: str) -> bool:
        self._memo.pop(batch_id, None)
        with self._transaction(f"delete batch {batch_id!r}") as conn:
            # The batch's row first, as every transition locks it first: no deadlock.
            row = conn.execute(self._sql["delete"], (batch_id,)).fetchone()
            if row is None:
                return False
            conn.execute(self._sql["delete_items"], (row[0],))
            conn.execute(self._sql["drop_markers"], ([batch_id],))
            conn.execute(self._sql["delete_metadata"], (row[0],))
            conn.execute(self._sql["notify"], (self._channel, batch_id))
            return True

    def expired(self, now: float, limit: int) -> list[str]:
        rows = self._query("list expired batches", self._sql["expired"], (now, limit))
        return [r[0] for r in rows]

    def purge_expired(self, now: float) -> int:
        removed = 0
        q = self._sql
        while True:
            # Bounded chunks keep each transaction short, so workers updating other
            # batches never wait on a whole sweep.
            with self._transaction("purge expired batches") as conn:
                if removed == 0:
                    conn.execute(q["purge_keys"], (now,))
                rows = conn.execute(q["purge_lock"], (now, PURGE_CHUNK)).fetchall()
                if rows:
                    keys = [r[0] for r in rows]
                    conn.execute(q["purge_items"], (keys,))
                    conn.execute(q["purge_metadata"], (keys,))
                    conn.execute(q["purge_batches"], (keys,))
                    conn.execute(q["drop_markers"], ([r[1] for r in rows],))
                    conn.execute(q["notify_many"], (self._channel, [r[1] for r in rows]))
            removed += len(rows)
            if len(rows) < PURGE_CHUNK:
                return removed

    # -- the outbox ----------------------------------------------------------------------

    def outbox_claim(self, now: float, limit: int, lease_until: float) -> list[OutboxEntry]:
        with self._transaction("claim from the outbox") as conn:
            rows = conn.execute(self._sql["outbox_claim"], (lease_until, now, now, limit))
            found = rows.fetchall()
        return [OutboxEntry(*r[:7]) for r in sorted(found, key=lambda r: r[7])]

    def outbox_expand(self, entry_id: str, deliveries: Sequence[OutboxEntry], at: float) -> None:
        q = self._sql
        with self._transaction(f"expand outbox entry {entry_id!r}") as conn:
            conn.execute(q["outbox_done"], (entry_id,))
            for e in deliveries:
                conn.execute(
                    q["outbox_add"],
                    (e.entry_id, e.batch_id, e.version, e.ended_at, e.url, e.body, e.attempts, at),
                )

    def outbox_done(self, entry_id: str) -> None:
        self._query_write(f"settle outbox entry {entry_id!r}", "outbox_done", (entry_id,))

    def outbox_retry(self, entry_id: str, attempts: int, next_at: float) -> None:
        args = (attempts, next_at, entry_id)
        self._query_write(f"retry outbox entry {entry_id!r}", "outbox_retry", args)

    def outbox_unsubscribe(self, url: str) -> None:
        with self._transaction(f"unsubscribe {url!r}") as conn:
            conn.execute(self._sql["unsubscribe"], (url,))
            conn.execute(self._sql["unsubscribe_drop"], (url,))

    def outbox_unsubscribed(self) -> frozenset[str]:
        rows = self._query("read unsubscribed URLs", self._sql["unsubscribed"], ())
        return frozenset(r[0] for r in rows)

    def _query_write(self, what: str, name: str, args: Sequence[Any]) -> None:
        with self._transaction(what) as conn:
            conn.execute(self._sql[name], args)

    # -- change notifications ----------------------------------------------------------

    def listen(self, on_change: Callable[[str | None], None], stop: threading.Event) -> None:
        """Block until ``stop`` is set, calling ``on_change(batch_id)`` for every change
        any process makes to a batch (create, every applied transition, retry/cancel,
        delete/expiry).

        Calls ``on_change(None)`` once as soon as the subscription is in place (meaning:
        anything may have changed before now, re-read). Checks ``stop`` at least once a
        second. Uses a connection of its own (``LISTEN <prefix>changes``), outside the
        pool. A callback that raises is logged and listening goes on.

        Raises:
            StoreError: The notification connection could not be opened or dropped (the
                caller falls back to polling and calls ``listen`` again later).
        """
        conn = self._connect("listen for changes")
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
            self._deliver(on_change, None)
            while not stop.is_set():
                for note in conn.notifies(timeout=_LISTEN_POLL):
                    self._deliver(on_change, note.payload)
                    if stop.is_set():
                        break
        except psycopg.Error as exc:
            raise StoreError(
                f"the PostgreSQL notification connection dropped: {_one_line(exc)}"
            ) from exc
        finally:
            conn.close()

    @staticmethod
    def _deliver(on_change: Callable[[str | None], None], batch_id: str | None) -> None:
        try:
            on_change(batch_id)
        except Exception:
            log.exception("batchtrack: a change listener raised (batch %s)", batch_id)


def _check(
    batch_id: str, transitions: Sequence[Transition], row: Any, items: Mapping[str, Any]
) -> None:
    """Raise as apply would for a batch missing or expired at a transition's time
    (``row`` None or past), or an item it names that is not in ``items``."""
    for transition in transitions:
        if row is None or row[5] <= transition.at:
            raise BatchNotFound(batch_id)
        if items.get(transition.item_id) is None:
            raise ItemNotFound(batch_id, transition.item_id)


def _contended(batch_id: str) -> StoreError:
    return StoreError(
        f"batch {batch_id!r} changed {_TRIES} times while this change was being made; "
        "nothing was applied"
    )


def _after(row: Any, transition: Transition, result: TransitionResult, args: Any) -> Any:
    """The header ``row`` once ``transition`` applied (``args``: its write's)."""
    return (
        *row[:3],
        transition.at,
        result.finished_at,
        result.expires_at,
        result.version,
        row[7],
        *args[4:8],
        args[8],
        row[13],
        row[14],
    )


def _item(item_id: str, item: Any) -> ItemSnapshot:
    """An item from an ``item`` row."""
    return ItemSnapshot(item_id, item[0], _STATUSES[item[1]], item[2], item[5], item[6])


def _snapshots(rows: list[Any]) -> tuple[ItemSnapshot, ...]:
    statuses = _STATUSES
    return tuple(
        [
            ItemSnapshot(item_id, filename, statuses[status], error, attempts, source, p, g)
            for item_id, filename, status, error, attempts, source, p, g in rows
        ]
    )
