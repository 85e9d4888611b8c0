"""BatchTracker: every rule about batches, items, expiry and the ETA, in one place."""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import attrs

from . import _eta, _keys, _report
from ._closing import Closing
from ._models import (
    NO_METADATA,
    BatchPage,
    BatchSnapshot,
    Item,
    ItemSnapshot,
    Metadata,
    Progress,
    ProgressEvent,
    Status,
    _item_snapshot,
    _ProgressEventFill,
    utc_datetime,
)
from ._sweeper import Sweeper
from .exceptions import (
    BatchNotFound,
    BatchPaused,
    BatchtrackError,
    InputsGone,
    InvalidTransition,
    ItemNotFound,
    StoreError,
    ValidationError,
)
from .stores.base import (
    BatchRecord,
    ItemQuery,
    LostItem,
    Outcome,
    Store,
    Transition,
    TransitionResult,
    event_answer,
    event_transition,
)
from .stores.memory import MemoryStore

__all__ = [
    "CANCELLED",
    "IDLE_TIMEOUT",
    "INPUT_NOT_KEPT",
    "MAX_ERROR_LENGTH",
    "METADATA_LIMITS",
    "BatchTracker",
    "ItemSpec",
]

log = logging.getLogger("batchtrack")

IDLE_TIMEOUT = 24 * 3600.0
"""An unfinished batch with no update for this many seconds is gone."""

MAX_ERROR_LENGTH = 1000
"""Longer error messages are cut to this many characters (ending in an ellipsis)."""

_MAX_NAME_LENGTH = 1024
_MAX_ID_LENGTH = 255

CANCELLED = "cancelled"
"""The error that items a cancel kept from starting had before ``cancelled`` was a status
of its own; such items stored by an older batchtrack stay failed with it."""

INPUT_NOT_KEPT = ""
"""The stored source of an item whose input could not be kept (bytes, a file object):
such an item is never run again from a guess; :meth:`BatchTracker.retry` refuses it."""

_RECLAIM_PAGE = 500
_LOST_PAGE = 1000  # lost items of every batch read to count one batch's
_NO_STATS: dict[Status, dict[str, tuple[float, int]]] = {}

ItemSpec = Union[str, "tuple[str, str]", Item]
"""An item given to :meth:`BatchTracker.create_batch`: a filename, ``(item_id, filename)``,
or an :class:`~batchtrack.Item` (whose ``source`` is kept)."""

_START = (Status.PROCESSING, frozenset({Status.PENDING}))
_COMPLETE = (Status.COMPLETED, frozenset({Status.PROCESSING}))
_FAIL = (Status.FAILED, frozenset({Status.PENDING, Status.PROCESSING}))
_CANCEL = (Status.CANCELLED, frozenset({Status.PENDING}))
_PROCESSING_ONLY = frozenset({Status.PROCESSING})
_RETRIED = (Status.FAILED, Status.CANCELLED)
_APPLIED = Outcome.APPLIED
_REJECTED = Outcome.REJECTED
_PAUSED = Outcome.PAUSED
_new_event = object.__new__


def _check_text(value: object, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a string, not {type(value).__name__}")
    if not value.strip():
        raise ValidationError(f"{what} must not be empty")
    if len(value) > limit:
        raise ValidationError(f"{what} is longer than {limit} characters")
    if "\x00" in value or "\r" in value or "\n" in value:
        raise ValidationError(f"{what} must not contain NUL or line breaks: {value!r}")
    _check_utf8(value, what)
    return value


def _check_utf8(value: str, what: str) -> None:
    # A lone surrogate (a file name that was not valid UTF-8, decoded with surrogate
    # escapes) cannot be stored as text by SQLite or Redis.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"{what} is not valid Unicode text: {value!r}") from None


def _check_positive(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"{what} must be a number of seconds, not {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValidationError(f"{what} must be a positive finite number of seconds, not {value!r}")
    return float(value)


def _check_attempts(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(f"max_attempts must be a whole number >= 1, not {value!r}")
    return value


def _check_source(value: object, what: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise ValidationError(
            f"{what} must be a path or a string naming the input (it is stored), "
            f"not {type(value).__name__}"
        )
    if "\x00" in value:
        raise ValidationError(f"{what} must not contain NUL")
    _check_utf8(value, what)
    return value


METADATA_LIMITS = (16, 64, 512)
"""A batch's metadata: at most this many pairs, keys of 1 to this many characters,
values of up to this many."""


def check_metadata(metadata: object) -> Mapping[str, str]:
    """``metadata`` as a batch keeps it (a read-only mapping; empty for None).

    Raises:
        ValidationError: Not a mapping of strings to strings, more than 16 pairs, a key
            empty or longer than 64 characters, a value longer than 512, or text that
            holds NUL or is not valid Unicode. The message names the rule.
    """
    if metadata is None:
        return NO_METADATA
    if not isinstance(metadata, Mapping):
        raise ValidationError(
            f"metadata must be a mapping of strings to strings, not {type(metadata).__name__}"
        )
    pairs, key_limit, value_limit = METADATA_LIMITS
    if len(metadata) > pairs:
        raise ValidationError(f"metadata holds at most {pairs} pairs, not {len(metadata)}")
    checked: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise ValidationError(f"metadata keys must be strings, not {type(key).__name__}")
        if not 1 <= len(key) <= key_limit:
            raise ValidationError(
                f"metadata keys must be 1 to {key_limit} characters long: {key[:80]!r}"
            )
        if not isinstance(value, str):
            raise ValidationError(
                f"metadata value of {key!r} must be a string, not {type(value).__name__}"
            )
        if len(value) > value_limit:
            raise ValidationError(
                f"metadata value of {key!r} is longer than {value_limit} characters"
            )
        for text, what in ((key, f"metadata key {key!r}"), (value, f"metadata value of {key!r}")):
            if "\x00" in text:
                raise ValidationError(f"{what} must not contain NUL")
            _check_utf8(text, f"metadata {key!r}")
        checked[key] = value
    return Metadata(checked) if checked else NO_METADATA


def _check_batch_status(status: object) -> Status | None:
    if status is None or isinstance(status, Status):
        return status
    try:
        return Status(status)
    except ValueError:
        names = ", ".join(s.value for s in Status)
        raise ValidationError(f"status must be one of {names}, not {status!r}") from None


def _check_owner(owner: object) -> str | None:
    if owner is None:
        return None
    return _check_text(owner, "owner", _MAX_ID_LENGTH)


def _check_id(value: object, what: str) -> str:
    # Lookups by id reject wrong types loudly; an unknown string is just "not found".
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a string, not {type(value).__name__}")
    return value


_MAX_LIMIT = 1_000_000


def _query(status: object, limit: object, after: object, since: object) -> ItemQuery | None:
    """The item conditions of :meth:`BatchTracker.get`, checked; None when none is given."""
    if status is None and limit is None and after is None and since is None:
        return None
    if status is not None and not isinstance(status, Status):
        try:
            status = Status(status)
        except ValueError:
            choices = ", ".join(s.value for s in Status if s is not Status.PAUSED)
            raise ValidationError(f"status must be one of {choices}, not {status!r}") from None
    if status is Status.PAUSED:
        raise ValidationError("status: items are never paused (only batches are)")
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= _MAX_LIMIT
    ):
        raise ValidationError(f"limit must be a whole number from 1 to {_MAX_LIMIT}, not {limit!r}")
    if after is not None:
        after = _check_id(after, "after")
    if since is not None and (isinstance(since, bool) or not isinstance(since, int) or since < 0):
        raise ValidationError(f"since must be a batch version (a whole number >= 0), not {since!r}")
    return ItemQuery(status, after, since, limit)


def _event(batch_id: str, result: TransitionResult, now: float, *, changed: bool) -> ProgressEvent:
    """The event of a store's answer: the item, the counts and the ETA right after it
    (worked out when first read)."""
    progress = result.progress
    return ProgressEvent._later(
        batch_id,
        result.item,
        progress,
        changed,
        result.version,
        _eta.estimate,
        (progress, result.created_at, result.stats, now),
    )


def _default_store(store: Store | None) -> Store:
    return MemoryStore() if store is None else store


@attrs.define
class BatchTracker(Closing):
    """Tracks batches of items and their progress; safe to share between threads.

    Args:
        store: Where batches live. None: a new :class:`~batchtrack.MemoryStore`.
        ttl: Seconds a finished batch stays visible after it finished.
        clock: Where every time comes from (seconds since the epoch, like
            :func:`time.time`); tests pass a fake one.
        lease: Seconds a started item stays leased to its worker without a
            :meth:`heartbeat`; after that it is lost and :meth:`reclaim` takes it back.
        max_attempts: How many starts an item gets (since it was created or last
            retried) before a lost item is failed instead of put back to pending.

    Raises:
        ValidationError: ``ttl`` or ``lease`` is not a positive number, ``max_attempts``
            not a whole number >= 1, or ``clock`` not callable.
    """

    store: Store = attrs.field(default=None, converter=_default_store)
    ttl: float = attrs.field(default=3600.0, kw_only=True)
    clock: Callable[[], float] = attrs.field(default=time.time, kw_only=True)
    lease: float = attrs.field(default=300.0, kw_only=True)
    max_attempts: int = attrs.field(default=3, kw_only=True)
    _origins: dict[str, float] = attrs.field(factory=dict, init=False, repr=False)
    _removal_hooks: list[Callable[[str, tuple[str, ...]], object]] = attrs.field(
        factory=list, init=False, repr=False
    )
    _sweeper: Sweeper = attrs.field(
        factory=lambda: Sweeper("batchtrack-sweeper"), init=False, repr=False
    )

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.store, Store):
            raise ValidationError(
                f"store must be a batchtrack.stores.base.Store, not {type(self.store).__name__}"
            )
        self.ttl = _check_positive(self.ttl, "ttl")
        self.lease = _check_positive(self.lease, "lease")
        self.max_attempts = _check_attempts(self.max_attempts)
        if not callable(self.clock):
            raise ValidationError("clock must be callable, like time.time")

    # -- creating and reading -------------------------------------------------------

    def create_batch(
        self,
        items: Iterable[ItemSpec],
        *,
        owner: str | None = None,
        key: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> BatchSnapshot:
        """Create a batch whose items are all pending.

        Args:
            items: Filenames, ``(item_id, filename)`` pairs, or :class:`~batchtrack.Item`
                values (their ``source``, a path or a string, is stored with the item and
                comes back as :attr:`ItemSnapshot.source`); ids are generated (UUID4)
                where not given.
            owner: Who may see the batch (see :meth:`get`); None for nobody in particular.
            key: An idempotency key (up to 255 printable ASCII characters): the same key
                and owner within 24 hours return the batch created first instead of a
                new one, while it lives; None: always a new batch.
            metadata: Up to 16 pairs of strings kept with the batch and shown with it
                (:attr:`BatchSnapshot.metadata`, ``"metadata"`` in its JSON): keys of 1 to
                64 characters, values of up to 512. A key that names a batch already
                returns that batch with the metadata it was created with: metadata is
                not part of what a key compares.

        Returns:
            The new batch (or the one ``key`` named already).

        Raises:
            ValidationError: No items, an empty or malformed filename or id, a source that
                is not a path or string, the same item id twice, a malformed key, or a
                key that names a batch of other items (filenames and sources, in order),
                or metadata that breaks a rule above (the message names it).
        """
        return self._create_batch(items, owner, key, metadata)[0]

    def _create_batch(
        self,
        items: Iterable[ItemSpec],
        owner: str | None,
        key: str | None,
        metadata: Mapping[str, str] | None = None,
    ) -> tuple[BatchSnapshot, bool]:
        """:meth:`create_batch`, answered with whether the batch is new (runners send
        nothing for a batch a key named already)."""
        owner = _check_owner(owner)
        kept = check_metadata(metadata)
        if key is not None:
            key = _keys.check_key(key)
        if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
            raise ValidationError("items must be an iterable of filenames or (id, filename) pairs")
        snapshots: list[ItemSnapshot] = []
        seen: set[str] = set()
        for position, spec in enumerate(items):
            source = None
            if isinstance(spec, Item):
                item_id = (
                    str(uuid.uuid4())
                    if spec.id is None
                    else _check_text(spec.id, f"item {position} id", _MAX_ID_LENGTH)
                )
                filename = _check_text(spec.filename, f"item {position} filename", _MAX_NAME_LENGTH)
                source = _check_source(spec.source, f"item {position} source")
            elif isinstance(spec, tuple):
                if len(spec) != 2:
                    raise ValidationError(
                        f"item {position}: expected (item_id, filename), got {len(spec)} values"
                    )
                item_id = _check_text(spec[0], f"item {position} id", _MAX_ID_LENGTH)
                filename = _check_text(spec[1], f"item {position} filename", _MAX_NAME_LENGTH)
            else:
                item_id = str(uuid.uuid4())
                filename = _check_text(spec, f"item {position} filename", _MAX_NAME_LENGTH)
            if item_id in seen:
                raise ValidationError(f"item id {item_id!r} appears more than once")
            seen.add(item_id)
            # ItemSnapshot(item_id, filename, source=source), of values checked above
            snapshots.append(_item_snapshot(item_id, filename, Status.PENDING, None, 0, source))
        if not snapshots:
            raise ValidationError("a batch needs at least one item")

        now = self.clock()
        batch_id = str(uuid.uuid4())
        record = BatchRecord(
            batch_id=batch_id,
            owner=owner,
            created_at=now,
            updated_at=now,
            finished_at=None,
            expires_at=now + IDLE_TIMEOUT,
            version=0,
            progress=Progress(total=len(snapshots), pending=len(snapshots)),
            metadata=kept,
        )
        if key is None:
            self.store.create(record, snapshots)
            return self._snapshot(attrs.evolve(record, items=tuple(snapshots)), now), True
        digest = _keys.fingerprint(snapshots)
        for _ in range(3):
            held = self.store.create_keyed(record, snapshots, key, digest, now + _keys.KEY_TTL)
            if held is None:
                return self._snapshot(attrs.evolve(record, items=tuple(snapshots)), now), True
            if held[1] != digest:
                raise _keys.conflict(key)
            try:
                return self.get(held[0]), False
            except BatchNotFound:
                continue  # it went between the two calls: the key is free again
        raise StoreError(f"idempotency key {key!r}: its batch keeps disappearing")

    def report(
        self, batch_id: str, item_id: str, fraction: float, *, stage: str | None = None
    ) -> ItemSnapshot:
        """Record how far a processing item is: one store write per call.

        While the item is processing its JSON carries ``"progress"`` (and ``"stage"``,
        when given); both vanish when it ends or is retried. Processors call
        :func:`batchtrack.report_progress`, which coalesces calls, rather than this.

        Args:
            batch_id: The batch.
            item_id: The item, which must be processing.
            fraction: How much of the item is done, in [0, 1].
            stage: What it is doing, in up to 100 characters; None for nothing said.

        Returns:
            The item as it is now.

        Raises:
            ValidationError: ``fraction`` is not in [0, 1], or a bad ``stage``.
            InvalidTransition: The item is not processing.
            BatchNotFound: Unknown or expired batch.
            ItemNotFound: The batch has no such item.
        """
        batch_id = _check_id(batch_id, "batch_id")
        item_id = _check_id(item_id, "item_id")
        value, label = _report.check_report(fraction, stage)
        now = self.clock()
        item = self.store.report(batch_id, item_id, value, label, now, now + IDLE_TIMEOUT)
        if item.status is not Status.PROCESSING:
            # Only a processing item reports: as if asked to be processing again.
            raise InvalidTransition(batch_id, item_id, item.status.value, "processing")
        return item

    def get(
        self,
        batch_id: str,
        *,
        owner: str | None = None,
        items: bool = True,
        status: Status | str | None = None,
        limit: int | None = None,
        after: str | None = None,
        since: int | None = None,
    ) -> BatchSnapshot:
        """The batch as it is now, with all of its items or the ones asked for.

        Counts, status, ETA and version are always those of the whole batch; the item
        conditions only choose which items come back, in creation order. Each read costs
        in proportion to the items it returns (``since``: to the items changed), not to
        the batch.

        Args:
            batch_id: The batch.
            owner: The caller's identity. A batch created with another owner is reported
                as not found; None means a trusted caller (no check).
            items: False to leave ``items`` empty and read only counts, status and ETA,
                which costs the same for any batch size.
            status: Only items with this status (a :class:`Status` or its value).
            limit: At most this many items; :attr:`BatchSnapshot.next_after` then names
                the item to pass as ``after`` for the next page (None on the last).
            after: Only items created after this item (an item id of the batch).
            since: Only items changed after this batch version (a
                :attr:`BatchSnapshot.version` read earlier): what changed since that read.

        Raises:
            BatchNotFound: Unknown, expired or deleted, or owned by someone else.
            ItemNotFound: ``after`` names no item of the batch.
            ValidationError: A condition of the wrong type or out of range, or conditions
                with ``items=False``.
        """
        query = _query(status, limit, after, since)
        now = self.clock()
        if query is None:
            return self._snapshot(self._visible(batch_id, owner, items=items, now=now), now)
        if not items:
            raise ValidationError("items=False reads no items: drop status, limit, after, since")
        if query.limit is not None:
            # One more than asked tells whether another page follows.
            query = attrs.evolve(query, limit=query.limit + 1)
        try:
            record = self._visible(batch_id, owner, items=query, now=now)
        except ItemNotFound:
            self._visible(batch_id, owner, items=False, now=now)  # not yours: not found
            raise
        next_after = None
        if query.limit is not None and len(record.items) >= query.limit:
            kept = record.items[: query.limit - 1]
            record = attrs.evolve(record, items=kept)
            next_after = kept[-1].id
            query = attrs.evolve(query, limit=query.limit - 1)
        return attrs.evolve(self._snapshot(record, now), query=query, next_after=next_after)

    def list_batches(
        self,
        *,
        owner: str | None = None,
        status: Status | str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> BatchPage:
        """A page of batches, newest first (by creation), without their items.

        Pages follow one another without gaps or repeats, also while batches are
        created between them (those are newer than the first page: a new first page
        shows them). Expired batches never appear. A page costs what it returns (and,
        with ``status``, what it skips of the owner's batches to fill it), not the
        size of the store.

        Args:
            owner: Only this owner's batches; None: every batch, whoever owns it (for
                operators, never for an untrusted caller).
            status: Only batches with this status (a :class:`Status` or its value, as
                :attr:`BatchSnapshot.status` shows it: ``paused`` for a paused batch).
            limit: At most this many batches, 1 to 1000.
            after: The :attr:`BatchPage.next_after` of the previous page; None for the
                first page.

        Returns:
            The page: :attr:`BatchPage.batches` and :attr:`BatchPage.next_after`.

        Raises:
            ValidationError: A bad owner, status, limit or ``after``; ``after`` naming
                no listed batch (unknown, another owner's, or removed since it was
                read; start again from the first page).
        """
        owner = _check_owner(owner)
        wanted = _check_batch_status(status)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise ValidationError(f"limit must be a whole number from 1 to 1000, not {limit!r}")
        if after is not None and (not isinstance(after, str) or not after):
            raise ValidationError(f"after must be a batch id from an earlier page, not {after!r}")
        now = self.clock()
        found: list[BatchSnapshot] = []
        # One more than asked tells whether another page follows; a status filter reads
        # the owner's batches a chunk at a time until the page is full.
        chunk = limit + 1 if wanted is None else max(limit + 1, 100)
        cursor = after
        while True:
            try:
                records = self.store.list_batches(owner, now, chunk, cursor)
            except BatchNotFound:
                if cursor != after:
                    break  # the last batch read went meanwhile: end this page here
                raise ValidationError(
                    f"after={after!r} names no batch of this list (unknown, or removed"
                    " since): start again from the first page"
                ) from None
            lost = self._lost_by_batch(records, now)
            for record in records:
                snap = self._snapshot(record, now, lost.get(record.batch_id, (0, 0)))
                if wanted is None or snap.status is wanted:
                    found.append(snap)
                    if len(found) > limit:
                        break
            if len(found) > limit or len(records) < chunk:
                break
            cursor = records[-1].batch_id
        next_after = None
        if len(found) > limit:
            del found[limit:]
            next_after = found[-1].batch_id
        return BatchPage(tuple(found), next_after)

    def delete(self, batch_id: str) -> bool:
        """Remove a batch now; True if a visible batch was removed, else False.

        Removal hooks (:meth:`add_removal_hook`) run for it.
        """
        batch_id = _check_id(batch_id, "batch_id")
        record = self.store.load(batch_id, items=bool(self._removal_hooks))
        self._origins.pop(batch_id, None)
        if record is None:
            return False
        removed = self.store.delete(batch_id)
        if removed:
            self._removed(record)
        return removed and record.expires_at > self.clock()

    def cleanup(self) -> int:
        """Remove every expired batch from the store; return how many were removed.

        Removal hooks (:meth:`add_removal_hook`) run for each of them.
        """
        now = self.clock()
        removed = 0
        while self._removal_hooks:
            # Hooks need each batch's items, so these go one by one before the sweep.
            page = self.store.expired(now, _RECLAIM_PAGE)
            before = removed
            for batch_id in page:
                record = self.store.load(batch_id)
                if record is None or record.expires_at > now or not self.store.delete(batch_id):
                    continue
                removed += 1
                self._removed(record)
            if len(page) < _RECLAIM_PAGE or removed == before:
                break
        removed += self.store.purge_expired(now)
        if removed:
            self._origins.clear()
        return removed

    def add_removal_hook(self, hook: Callable[[str, tuple[str, ...]], object]) -> None:
        """Call ``hook(batch_id, item_ids)`` after a batch is deleted or its expiry removed.

        For whatever lives as long as a batch: result files, thumbnails, rows of your
        own. ``ImagePipeline.remove_results`` is one. Hooks run in the thread that called
        :meth:`delete` or :meth:`cleanup` (the sweeper's, usually); one that raises is
        logged and the others still run. Batches removed by another process's tracker
        run that tracker's hooks, so register the same hooks wherever cleanup runs.

        Raises:
            ValidationError: ``hook`` is not callable.
        """
        if not callable(hook):
            raise ValidationError("hook must be callable with (batch_id, item_ids)")
        self._removal_hooks.append(hook)

    def _removed(self, record: BatchRecord) -> None:
        item_ids = tuple(item.id for item in record.items)
        for hook in list(self._removal_hooks):
            try:
                hook(record.batch_id, item_ids)
            except Exception:
                log.exception("batchtrack: a removal hook failed for batch %s", record.batch_id)

    # -- transitions ----------------------------------------------------------------

    def start_item(
        self, batch_id: str, item_id: str, *, lease: float | None = None
    ) -> ProgressEvent:
        """Mark a pending item as processing, leased to the caller for ``lease`` seconds.

        Starting an item that is already processing is a no-op (it neither counts a
        start nor renews the lease: call :meth:`heartbeat` for that). Each start that
        happens counts one of the item's :attr:`~batchtrack.ItemSnapshot.attempts`.

        Args:
            batch_id: The batch.
            item_id: The item.
            lease: Seconds until the item is lost without a :meth:`heartbeat`; None for
                the tracker's :attr:`lease`.

        Raises:
            ValidationError: ``lease`` is not a positive number.
            BatchNotFound: Unknown or expired batch.
            ItemNotFound: The batch has no such item.
            BatchPaused: The batch is paused (:meth:`pause`); the item stays pending.
            InvalidTransition: The item is already final (completed, failed, cancelled).
        """
        seconds = self.lease if lease is None else _check_positive(lease, "lease")
        return self._transition(batch_id, item_id, _START, None, seconds)

    def heartbeat(
        self, batch_id: str, item_id: str, *, lease: float | None = None
    ) -> ProgressEvent:
        """Renew a processing item's lease: it is not lost for ``lease`` more seconds.

        Workers call this every so often (a third of the lease is a good period) while
        they work on an item. Nothing users see changes: the event has
        ``changed=False`` and the batch keeps its version.

        Raises:
            ValidationError: ``lease`` is not a positive number.
            BatchNotFound: Unknown or expired batch.
            ItemNotFound: The batch has no such item.
            InvalidTransition: The item is not processing (it finished, was reclaimed
                or never started): the worker should stop working on it.
        """
        seconds = self.lease if lease is None else _check_positive(lease, "lease")
        _check_id(batch_id, "batch_id")
        _check_id(item_id, "item_id")
        now = self.clock()
        result = self.store.renew(batch_id, item_id, now, now + seconds, now + IDLE_TIMEOUT)
        if result.outcome is Outcome.REJECTED:
            raise InvalidTransition(batch_id, item_id, result.previous.value, "processing")
        return _event(batch_id, result, now, changed=False)

    def complete_item(self, batch_id: str, item_id: str) -> ProgressEvent:
        """Mark a processing item as completed.

        Completing a completed item is a no-op.

        Raises:
            BatchNotFound: Unknown or expired batch.
            ItemNotFound: The batch has no such item.
            InvalidTransition: The item is pending (start it first) or failed.
        """
        return self._transition(batch_id, item_id, _COMPLETE, None)

    def fail_item(self, batch_id: str, item_id: str, error: str) -> ProgressEvent:
        """Mark a pending or processing item as failed, with the message users see.

        Failing a failed item is a no-op and keeps the first error. Messages longer than
        :data:`MAX_ERROR_LENGTH` characters are cut.

        Raises:
            ValidationError: ``error`` is not a non-empty string.
            BatchNotFound: Unknown or expired batch.
            ItemNotFound: The batch has no such item.
            InvalidTransition: The item is completed.
        """
        if not isinstance(error, str):
            raise ValidationError(f"error must be a string, not {type(error).__name__}")
        if not error.strip():
            raise ValidationError("error must not be empty: say what went wrong")
        if len(error) > MAX_ERROR_LENGTH:
            error = error[: MAX_ERROR_LENGTH - 1] + "…"
        return self._transition(batch_id, item_id, _FAIL, error)

    def _transition(
        self,
        batch_id: str,
        item_id: str,
        rule: tuple[Status, frozenset[Status]],
        error: str | None,
        lease: float | None = None,
    ) -> ProgressEvent:
        if type(batch_id) is not str or type(item_id) is not str:
            _check_id(batch_id, "batch_id")
            _check_id(item_id, "item_id")
        target, sources = rule
        now = self.clock()
        origin = self._origins.get(batch_id)
        if origin is None:
            origin = self._origin(batch_id)
        outcome, previous, item, progress, version, created, expires, stats = (
            self.store._apply_parts(
                batch_id,
                item_id,
                target,
                sources,
                now,
                error,
                now + IDLE_TIMEOUT,
                now + self.ttl,
                (origin, lease),  # the store adds _eta.stats_for(target, now, origin, lease)
                None if lease is None else now + lease,
            )
        )
        if outcome is not _APPLIED:
            if outcome is _REJECTED:
                raise InvalidTransition(batch_id, item_id, previous.value, target.value)
            if outcome is _PAUSED:
                raise BatchPaused(batch_id, item_id)
            if expires <= now:
                # Unchanged: a repeat on a finished batch changes nothing, so the store
                # had no reason to look at its expiry; an expired batch must still look
                # absent.
                raise BatchNotFound(batch_id)
        # ProgressEvent._later, written out (see _models._item_snapshot for the twin): the
        # ETA is worked out when first read.
        event: Any = _new_event(_ProgressEventFill)
        event._values = (batch_id, item, progress, outcome is _APPLIED, version)
        event._eta = [_eta.estimate, (progress, created, stats, now)]
        event.__class__ = ProgressEvent
        return event  # type: ignore[no-any-return]

    def _apply_events(
        self,
        batch_id: str,
        steps: Sequence[tuple[str, tuple[Status, frozenset[Status]], str | None, float | None]],
    ) -> list[ProgressEvent | BatchtrackError]:
        """Several starts, completions and failures of one batch's items in one store
        call (:meth:`Store.apply_all <batchtrack.stores.base.Store.apply_all>`): what the
        orchestrator sends when an item finishes and the next one starts.

        Each step is ``(item_id, rule, error, lease)``: ``rule`` one of the start,
        complete and fail rules, ``error`` the failure's message, ``lease`` the seconds
        of a start's lease (None for the others). Each is judged as
        :meth:`start_item`, :meth:`complete_item` or :meth:`fail_item` would judge it
        right after the ones before; its answer is its event, or the error that method
        would have raised for it (:class:`~batchtrack.InvalidTransition`,
        :class:`~batchtrack.BatchPaused`, :class:`~batchtrack.BatchNotFound`).

        Raises:
            BatchNotFound: Unknown or expired batch (nothing applied).
            ItemNotFound: A step names an item not in the batch (nothing applied).
            StoreError: The store failed.
        """
        now = self.clock()
        origin = self._origins.get(batch_id)
        if origin is None:
            origin = self._origin(batch_id)
        open_at, finished_at = now + IDLE_TIMEOUT, now + self.ttl
        parts = []
        for item_id, (target, sources), error, lease in steps:
            if error is not None and len(error) > MAX_ERROR_LENGTH:
                error = error[: MAX_ERROR_LENGTH - 1] + "…"
            parts.append((item_id, target, sources, error, lease))
        # The memory store answers these without a Transition, a TransitionResult or the
        # contributions per step (as _apply_parts does for one); any other store, or a
        # memory store whose apply() or apply_all() a subclass changed, gets apply_all().
        # Looked up on the class: a wrapper that hands unknown attributes to the store it
        # wraps (metrics.InstrumentedStore) must see its apply_all() called.
        fast = getattr(type(self.store), "_apply_steps", None)
        if fast is not None:
            answered = fast(self.store, batch_id, parts, now, open_at, finished_at, origin)
        else:
            answered = [
                event_answer(r)
                for r in self.store.apply_all(
                    batch_id,
                    [
                        event_transition(
                            item_id,
                            target,
                            sources,
                            now,
                            error,
                            open_at,
                            finished_at,
                            _eta.stats_for(target, now, origin, lease),
                            now + lease if lease is not None else None,
                        )
                        for item_id, target, sources, error, lease in parts
                    ],
                )
            ]
        answers: list[ProgressEvent | BatchtrackError] = []
        for (item_id, target, _, _, _), answer in zip(parts, answered, strict=True):
            outcome, previous, item, progress, version, created, expires, stats = answer
            if outcome is _REJECTED:
                answers.append(InvalidTransition(batch_id, item_id, previous.value, target.value))
            elif outcome is _PAUSED:
                answers.append(BatchPaused(batch_id, item_id))
            elif outcome is not _APPLIED and expires <= now:  # unchanged, on an expired batch
                answers.append(BatchNotFound(batch_id))
            else:  # as in _transition
                event: Any = _new_event(_ProgressEventFill)
                event._values = (batch_id, item, progress, outcome is _APPLIED, version)
                event._eta = [_eta.estimate, (progress, created, stats, now)]
                event.__class__ = ProgressEvent
                answers.append(event)
        return answers

    # -- lost work, retry and cancel ---------------------------------------------------

    def reclaim(self) -> int:
        """Take back every lost item: one whose lease ran out without a heartbeat.

        An item started fewer than :attr:`max_attempts` times (since it was created or
        last retried) goes back to ``pending``, for a runner to start again; otherwise it
        fails with the error ``"worker lost: no heartbeat for N s"``. Safe to run in any
        number of threads, processes and hosts at once: each lost item moves once. The
        sweeper (:meth:`start_sweeper`) runs this too.

        Returns:
            How many items were moved (to pending or failed).
        """
        return len(self.reclaim_items())

    def reclaim_items(self) -> list[tuple[str, str, Status]]:
        """:meth:`reclaim`, returning ``(batch_id, item_id, new status)`` per moved item.

        For runners that resume the batches whose items went back to pending.
        """
        moved: list[tuple[str, str, Status]] = []
        while True:
            now = self.clock()
            page = self.store.lost(now, _RECLAIM_PAGE)
            before = len(moved)
            for lost in page:
                status = self._reclaim_one(lost, now)
                if status is not None:
                    moved.append((lost.batch_id, lost.item_id, status))
            if len(page) < _RECLAIM_PAGE or len(moved) == before:
                return moved

    def _reclaim_one(self, lost: LostItem, now: float) -> Status | None:
        def move(target: Status, error: str | None, max_attempts: int | None) -> bool:
            result = self.store.apply(
                lost.batch_id,
                Transition(
                    lost.item_id,
                    target,
                    _PROCESSING_ONLY,
                    now,
                    error,
                    now + IDLE_TIMEOUT,
                    now + self.ttl,
                    added,  # nothing about durations
                    lost_before=now,
                    max_attempts=max_attempts,
                ),
            )
            return result.outcome is Outcome.APPLIED

        silent = max(0, round(now - lost.beat_at))
        try:
            added = _eta.reclaimed(now, self._origin(lost.batch_id))
            if move(Status.PENDING, None, self.max_attempts):
                return Status.PENDING
            if move(Status.FAILED, f"worker lost: no heartbeat for {silent} s", None):
                return Status.FAILED
        except LookupError:  # the batch expired or was deleted meanwhile
            pass
        return None

    def retry(
        self,
        batch_id: str,
        item_ids: Iterable[str] | None = None,
        *,
        owner: str | None = None,
    ) -> int:
        """Put failed and cancelled items back to ``pending``, their error cleared, for
        another try.

        The batch is open again (``finished_at`` None, status derived as usual, expiry by
        the idle rule) and its retried items start with 0 attempts; a runner's
        ``resume`` runs them.

        Args:
            batch_id: The batch.
            item_ids: The items to retry (each failed or cancelled); None for every failed
                and cancelled item of the batch.
            owner: The caller's identity, checked as by :meth:`get`.

        Returns:
            How many items went back to pending (0 when none had failed or been
            cancelled).

        Raises:
            ValidationError: ``item_ids`` is not a non-empty collection of ids.
            BatchNotFound: Unknown, expired or someone else's batch.
            ItemNotFound: A named item is not in the batch (nothing changed).
            InvalidTransition: A named item has neither failed nor been cancelled
                (nothing changed).
            InputsGone: An item to retry had an input that was not kept (bytes or a
                file object given to an :class:`~batchtrack.Orchestrator`): nothing could
                run it again without guessing (nothing changed).
        """
        names = None
        if item_ids is not None:
            if isinstance(item_ids, (str, bytes)) or not isinstance(item_ids, Iterable):
                raise ValidationError("item_ids must be a collection of item ids, or None")
            names = list(dict.fromkeys(_check_id(i, "item id") for i in item_ids))
            if not names:
                raise ValidationError("item_ids is empty; pass None to retry every failed item")
        self._check_inputs_kept(batch_id, owner, names)
        return self._bulk(
            batch_id, owner, Status.PENDING, frozenset(_RETRIED), None, names, reset=True
        )

    def _check_inputs_kept(self, batch_id: str, owner: str | None, names: list[str] | None) -> None:
        """Raise :class:`~batchtrack.exceptions.InputsGone` when a failed or cancelled
        item to retry (a named one, or any when ``names`` is None) has an input that was
        not kept.

        Sources never change, so reading them before the retry is as good as during it.
        """
        now = self.clock()
        wanted = None if names is None else set(names)
        gone = tuple(
            item.id
            for status in _RETRIED
            for item in self._visible(batch_id, owner, items=ItemQuery(status), now=now).items
            if item.source == INPUT_NOT_KEPT and (wanted is None or item.id in wanted)
        )
        if gone:
            raise InputsGone(batch_id, gone)

    def cancel(self, batch_id: str, *, owner: str | None = None) -> int:
        """Move every pending item of the batch to ``cancelled``.

        Processing items finish as they will; once every item is final the batch's
        status is ``cancelled`` (unless none was pending). Starting a cancelled item raises
        :class:`~batchtrack.InvalidTransition`, so a worker that meets one skips it.

        Args:
            batch_id: The batch.
            owner: The caller's identity, checked as by :meth:`get`.

        Returns:
            How many items were cancelled (0 for a finished batch).

        Raises:
            BatchNotFound: Unknown, expired or someone else's batch.
        """
        target, sources = _CANCEL
        return self._bulk(batch_id, owner, target, sources, None, None)

    def _cancel_item(self, batch_id: str, item_id: str) -> ProgressEvent:
        """Cancel one pending item (for a runner that drops what it had queued, one event
        per item). Cancelling a cancelled item is a no-op.

        Raises:
            BatchNotFound: Unknown or expired batch.
            ItemNotFound: The batch has no such item.
            InvalidTransition: The item is not pending.
        """
        return self._transition(batch_id, item_id, _CANCEL, None)

    def pause(self, batch_id: str, *, owner: str | None = None) -> bool:
        """Pause a batch: items not started stay ``pending``, running items finish.

        While paused, :meth:`start_item` raises :class:`~batchtrack.BatchPaused`, so
        every runner skips the batch's items; the batch's status is ``paused`` and its
        ETA None (``eta_unavailable`` ``"paused"``) until :meth:`unpause`.

        Args:
            batch_id: The batch.
            owner: The caller's identity, checked as by :meth:`get`.

        Returns:
            True if the batch was paused by this call; False when it is finished or
            already paused.

        Raises:
            BatchNotFound: Unknown, expired or someone else's batch.
        """
        return self._set_paused(batch_id, owner, True)

    def unpause(self, batch_id: str, *, owner: str | None = None) -> bool:
        """Let a paused batch's items start again.

        Its pending items wait for a runner: call the runner's ``resume`` (the HTTP
        unpause does). A batch that finished while paused (cancelled meanwhile) is
        unpaused too, so that a :meth:`retry` of it is not paused.

        Returns:
            True if the batch was paused until this call; False otherwise.

        Raises:
            BatchNotFound: Unknown, expired or someone else's batch.
        """
        return self._set_paused(batch_id, owner, False)

    def _set_paused(self, batch_id: str, owner: str | None, paused: bool) -> bool:
        now = self.clock()
        self._visible(batch_id, owner, items=False, now=now)
        return self.store.set_paused(batch_id, paused, now, now + IDLE_TIMEOUT)

    def _bulk(
        self,
        batch_id: str,
        owner: str | None,
        target: Status,
        sources: frozenset[Status],
        error: str | None,
        names: list[str] | None,
        *,
        reset: bool = False,
    ) -> int:
        now = self.clock()
        self._visible(batch_id, owner, items=False, now=now)
        transition = Transition(
            "",
            target,
            sources,
            now,
            error,
            now + IDLE_TIMEOUT,
            now + self.ttl,
            _NO_STATS,
            reset_attempts=reset,
        )
        result = self.store.apply_many(batch_id, transition, names)
        if result.rejected:
            item_id, status = result.rejected[0]
            raise InvalidTransition(batch_id, item_id, status.value, target.value)
        return result.applied

    def open_batches(self) -> list[str]:
        """The ids of every batch that is neither finished nor expired.

        For a runner that starts up and resumes what an earlier process left; it reads
        every batch header in the store, so call it rarely.
        """
        return self.store.open_batches(self.clock())

    # -- expiry -----------------------------------------------------------------------

    def start_sweeper(self, interval: float = 600.0) -> None:
        """Run :meth:`reclaim` and :meth:`cleanup` every ``interval`` seconds in a daemon
        thread.

        Raises:
            ValidationError: ``interval`` is not a positive number.
            RuntimeError: A sweeper is already running.
        """
        interval = _check_positive(interval, "interval")
        self._sweeper.start(
            interval, [("reclaimed lost items", self.reclaim), ("removed", self.cleanup)]
        )

    def stop_sweeper(self) -> None:
        """Stop the sweeper thread and wait for it; does nothing when none runs."""
        self._sweeper.stop()

    def close(self) -> None:
        """Stop the sweeper (the end of a ``with BatchTracker(...)`` block does this).

        The store stays open: it may be shared; close it yourself when done.
        """
        self.stop_sweeper()

    # -- helpers ----------------------------------------------------------------------

    def _visible(
        self, batch_id: str, owner: str | None, *, items: bool | ItemQuery, now: float
    ) -> BatchRecord:
        batch_id = _check_id(batch_id, "batch_id")
        if owner is not None:
            owner = _check_id(owner, "owner")
        if isinstance(items, ItemQuery):
            record = self.store.load_items(batch_id, items)
        else:
            record = self.store.load(batch_id, items=items)
        if record is None or record.expires_at <= now:
            raise BatchNotFound(batch_id)
        if owner is not None and record.owner != owner:
            raise BatchNotFound(batch_id)
        return record

    def _origin(self, batch_id: str) -> float:
        """The batch's creation time, which never changes, cached per process."""
        origin = self._origins.get(batch_id)
        if origin is None:
            record = self.store.load(batch_id, items=False)
            if record is None:
                raise BatchNotFound(batch_id)
            if len(self._origins) >= 4096:
                self._origins.clear()
            origin = self._origins[batch_id] = record.created_at
        return origin

    def _state(
        self, batch_id: str, owner: str | None
    ) -> tuple[int, int | None, tuple[int, int] | None]:
        """The batch's version, ETA and ETA range, as :meth:`get` would show them: what a
        status body's ETag is made of, without the snapshot around it.

        Raises:
            BatchNotFound: As for :meth:`get`.
        """
        now = self.clock()
        record = self._visible(batch_id, owner, items=False, now=now)
        eta, eta_range, _ = self._estimate(record, now)
        return record.version, eta, eta_range

    def _watched(
        self, batch_id: str, owner: str | None, since: int | None
    ) -> tuple[BatchSnapshot, float]:
        """What :meth:`get` answers with ``since`` (all items when None), and the moment
        the batch expires by :attr:`clock` unless it changes again: what a watcher needs
        to know when to look again even if nothing is reported.

        Raises:
            BatchNotFound: As for :meth:`get`.
        """
        now = self.clock()
        if since is None:
            record = self._visible(batch_id, owner, items=True, now=now)
            return self._snapshot(record, now), record.expires_at
        query = ItemQuery(since=since)
        record = self._visible(batch_id, owner, items=query, now=now)
        return attrs.evolve(self._snapshot(record, now), query=query), record.expires_at

    def _lost_in(self, record: BatchRecord, now: float) -> tuple[int, int]:
        """How many of the batch's processing items are lost now (their lease ran out,
        not yet reclaimed), and how many are *quiet*: lost, or with so little of their
        lease left that no worker renewed it lately (see :func:`_eta.quiet_within`).
        Lower bounds when more than a page of items of every batch is. Costs what the
        store's lease index holds that runs out that soon (nothing, while every worker
        renews its leases), not the batch."""
        return self._lost_by_batch([record], now).get(record.batch_id, (0, 0))

    def _lost_by_batch(self, records: list[BatchRecord], now: float) -> dict[str, tuple[int, int]]:
        """The lost and quiet items of each of ``records`` (as :meth:`_lost_in`), from one
        read of the store's leases for a whole page of batches instead of one per batch;
        empty when no batch of the page could show them."""
        shown = [r for r in records if r.progress.processing and r.progress.finished]
        if not shown:
            return {}
        within = max(_eta.quiet_within(r.stats, r.progress.processing) for r in shown)
        counts: dict[str, tuple[int, int]] = {}
        for found in self.store.lost(now + within, _LOST_PAGE):
            lost, quiet = counts.get(found.batch_id, (0, 0))
            counts[found.batch_id] = (lost + (found.lease_until <= now), quiet + 1)
        return counts

    def _estimate(
        self, record: BatchRecord, now: float, counted: tuple[int, int] | None = None
    ) -> tuple[int | None, tuple[int, int] | None, str | None]:
        """The batch's ETA, its range and why there is none (see
        :attr:`BatchSnapshot.eta_unavailable`), lost items taken into account (``counted``:
        how many lost and quiet, read already; None: read here)."""
        progress = record.progress
        if record.paused and (progress.pending or progress.processing):
            return None, None, _eta.PAUSED
        lost = quiet = 0
        if progress.processing and (progress.completed or progress.failed):
            # Only then can lost items change what is shown (before anything finished
            # the reason is "starting" whatever else holds).
            lost, quiet = self._lost_in(record, now) if counted is None else counted
        reported = (0, 0.0)
        if progress.processing and len(record.items) == progress.total:
            # Only a read of every item sees every report; a partial read (a page, a
            # since-read, a header) would see some, so it leaves them all out.
            fractions = [i.progress for i in record.items if i.progress is not None]
            reported = (len(fractions), math.fsum(fractions))
        return _eta.estimate_why(
            progress, record.created_at, record.stats, now, lost, reported, quiet
        )

    def _snapshot(
        self, record: BatchRecord, now: float, lost: tuple[int, int] | None = None
    ) -> BatchSnapshot:
        progress = record.progress
        eta, eta_range, why = self._estimate(record, now, lost)
        status = progress.status
        if record.paused and not status.is_final:
            status = Status.PAUSED
        return BatchSnapshot(
            batch_id=record.batch_id,
            status=status,
            progress=progress,
            items=record.items,
            estimated_time_remaining=eta,
            eta_range=eta_range,
            eta_unavailable=why,
            created_at=utc_datetime(record.created_at),
            updated_at=utc_datetime(record.updated_at),
            finished_at=None if record.finished_at is None else utc_datetime(record.finished_at),
            owner=record.owner,
            version=record.version,
            metadata=record.metadata,
        )
