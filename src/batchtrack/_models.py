"""Immutable values: statuses, progress counts, snapshots and progress events."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from typing import Any

import attrs

__all__ = [
    "NO_METADATA",
    "BatchPage",
    "BatchSnapshot",
    "Item",
    "ItemSnapshot",
    "Metadata",
    "Progress",
    "ProgressEvent",
    "Status",
]


class Metadata(Mapping[str, str]):
    """A batch's metadata: a read-only mapping of strings to strings.

    Compares equal to a dict with the same pairs; hashable and picklable, so snapshots
    that carry it stay so.
    """

    __slots__ = ("_pairs",)
    _pairs: dict[str, str]

    def __init__(self, pairs: Mapping[str, str] | None = None) -> None:
        object.__setattr__(self, "_pairs", dict(pairs or {}))

    def __getitem__(self, key: str) -> str:
        return self._pairs[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def __hash__(self) -> int:
        return hash(frozenset(self._pairs.items()))

    def __repr__(self) -> str:
        return f"Metadata({self._pairs!r})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Metadata is read-only")

    def __reduce__(self) -> tuple[Any, ...]:
        return (Metadata, (self._pairs,))


NO_METADATA: Mapping[str, str] = Metadata()
"""The metadata of a batch created without any."""


class Status(str, enum.Enum):
    """The status of an item or of a whole batch.

    A ``str`` enum: ``Status.COMPLETED == "completed"`` and it serialises to JSON as its
    value.
    """

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "paused"
    """Batches only: paused (:meth:`~batchtrack.BatchTracker.pause`); never an item's."""

    def __str__(self) -> str:
        return self.value

    @property
    def is_final(self) -> bool:
        """True for ``completed``, ``failed`` and ``cancelled``, which change no more
        (until a :meth:`~batchtrack.BatchTracker.retry`)."""
        return self is Status.COMPLETED or self is Status.FAILED or self is Status.CANCELLED


@attrs.frozen
class Progress:
    """How many items of a batch are in each status.

    Always ``total == completed + failed + processing + pending + cancelled``;
    ``completed`` counts successes only.
    """

    total: int
    completed: int = 0
    failed: int = 0
    processing: int = 0
    pending: int = 0
    cancelled: int = 0

    @property
    def finished(self) -> int:
        """Items that are final: ``completed + failed + cancelled``."""
        return self.completed + self.failed + self.cancelled

    @property
    def status(self) -> Status:
        """The batch status these counts imply.

        ``pending`` while every item is pending; ``processing`` once any item has left
        pending and some item is not final; when every item is final: ``failed`` if
        every item failed, else ``cancelled`` if any item was cancelled, else
        ``completed``. (``paused`` is not a matter of counts: the tracker shows it.)
        """
        if self.pending == self.total:
            return Status.PENDING
        if self.pending or self.processing:
            return Status.PROCESSING
        if self.failed == self.total:
            return Status.FAILED
        if self.cancelled:
            return Status.CANCELLED
        return Status.COMPLETED

    def to_dict(self) -> dict[str, int]:
        """The ``progress`` object of the status body."""
        return {
            "total": self.total,
            "completed": self.completed,
            "failed": self.failed,
            "processing": self.processing,
            "pending": self.pending,
            "cancelled": self.cancelled,
        }


@attrs.frozen
class ItemSnapshot:
    """One item as it is at one moment.

    Attributes:
        id: The item id (a UUID4 string unless the caller chose it).
        filename: The name shown to users.
        status: Where the item is.
        error: The message shown to users for a failed item, otherwise None.
        attempts: How many times the item was started since it was created or last
            retried (0 before its first start).
        source: Where the item's input is (a path, a URL, a key in your storage), as
            given to :meth:`~batchtrack.BatchTracker.create_batch`; None when none was
            given. Never shown in the JSON body.
        progress: How far a processing item is, in [0, 1], as its processor last
            reported (:meth:`~batchtrack.BatchTracker.report`); None when it reported
            nothing since it started, and always None for an item not processing.
        stage: What the processing item is doing, as last reported with ``progress``;
            None when none was given.
    """

    id: str
    filename: str
    status: Status = Status.PENDING
    error: str | None = None
    attempts: int = 0
    source: str | None = None
    progress: float | None = None
    stage: str | None = None
    # The item's entry as JSON, made on first use (see batchtrack._json): a snapshot never
    # changes, and stores keep handing out the same snapshot until the item changes.
    _json: bytes | None = attrs.field(default=None, init=False, eq=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The item's entry in the ``images`` list.

        ``error`` only on failed items, ``attempts`` only when the item was started more
        than once, ``progress`` (and ``stage``, when given) only while a processing item
        has reported.
        """
        entry: dict[str, Any] = {
            "id": self.id,
            "filename": self.filename,
            "status": self.status.value,
        }
        if self.error is not None:
            entry["error"] = self.error
        if self.attempts > 1:
            entry["attempts"] = self.attempts
        if self.progress is not None and self.status is Status.PROCESSING:
            entry["progress"] = self.progress
            if self.stage is not None:
                entry["stage"] = self.stage
        return entry


def utc_datetime(timestamp: float) -> datetime:
    """A timezone-aware UTC datetime for seconds since the epoch."""
    return datetime.fromtimestamp(timestamp, tz=timezone.utc)


def iso_utc(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC with millisecond precision, ending in ``Z`` (None stays None)."""
    if moment is None:
        return None
    if moment.tzinfo is not timezone.utc:
        moment = moment.astimezone(timezone.utc)
    return moment.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


@attrs.frozen
class ItemQuery:
    """Which items of a batch :meth:`Store.load_items` reads: all that match every given
    condition, in creation order.

    Attributes:
        status: Only items with this status (None: any).
        after: Only items created after this item (an item id; None: from the first).
        since: Only items whose last change made the batch's version greater than this
            (None: changed or not). Items never changed since creation have version 0.
        limit: At most this many items (None: all that match).
    """

    status: Status | None = None
    after: str | None = None
    since: int | None = None
    limit: int | None = None


@attrs.frozen
class BatchSnapshot:
    """A whole batch as it was at one moment.

    Attributes:
        batch_id: The batch id (UUID4 string).
        status: The batch status derived from its items, or ``paused`` while the batch
            is paused and not finished.
        progress: Counts per status.
        items: Every item, in the order they were given.
        estimated_time_remaining: Whole seconds, None until the first item is final,
            0 once the batch is finished.
        created_at: When the batch was created (UTC).
        updated_at: When an item last changed (UTC).
        finished_at: When the last item became final (UTC), None until then.
        owner: Who owns the batch, None for nobody in particular.
        version: Grows by one with every change to the batch; equal versions mean equal
            items and counts.
        query: The conditions that chose ``items`` when
            :meth:`~batchtrack.BatchTracker.get` was given some (``status``, ``limit``,
            ``after``, ``since``); None when ``items`` holds every item.
        next_after: For a page (``limit``): the item id to pass as ``after`` for the next
            page, or None when this is the last.
        eta_range: ``(low, high)`` whole seconds that hold the true remaining time 8
            times out of 10, with ``low <= estimated_time_remaining <= high``; None
            exactly when :attr:`estimated_time_remaining` is, ``(0, 0)`` once finished.
        eta_unavailable: Why :attr:`estimated_time_remaining` is None while the batch is
            not finished, else None: ``"paused"`` (the batch is paused),
            ``"starting"`` (nothing has finished yet, so there is no pace to go by)
            or ``"waiting_for_lost_items"`` (every item left is lost: its lease ran
            out and it waits to be reclaimed). The JSON body
            carries it as ``"etaUnavailable"`` only when it is set.
        metadata: The string pairs given at creation (a read-only mapping, empty when
            none); the JSON body carries them as ``"metadata"`` only when there are some.
    """

    batch_id: str
    status: Status
    progress: Progress
    items: tuple[ItemSnapshot, ...]
    estimated_time_remaining: int | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    owner: str | None = None
    version: int = 0
    query: ItemQuery | None = None
    next_after: str | None = None
    eta_range: tuple[int, int] | None = None
    eta_unavailable: str | None = None
    metadata: Mapping[str, str] = NO_METADATA

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of ``GET /api/batch-status/{batchId}``.

        A snapshot of chosen items (:attr:`query`) also carries ``"version"``, and a page
        ``"nextAfter"``.
        """
        return self._body([item.to_dict() for item in self.items])

    def _body(self, images: list[Any]) -> dict[str, Any]:
        """:meth:`to_dict` with ``images`` as the images (batchtrack._json passes [])."""
        body: dict[str, Any] = {
            "batchId": self.batch_id,
            "status": self.status.value,
            "progress": self.progress.to_dict(),
            "images": images,
            "estimatedTimeRemaining": self.estimated_time_remaining,
            "estimatedTimeRemainingRange": None if self.eta_range is None else list(self.eta_range),
        }
        if self.eta_unavailable is not None:
            body["etaUnavailable"] = self.eta_unavailable
        body["createdAt"] = iso_utc(self.created_at)
        body["updatedAt"] = iso_utc(self.updated_at)
        body["finishedAt"] = iso_utc(self.finished_at)
        if self.metadata:
            body["metadata"] = dict(self.metadata)
        if self.query is not None:
            body["version"] = self.version
            if self.query.limit is not None:
                body["nextAfter"] = self.next_after
        return body


@attrs.frozen
class BatchPage:
    """One page of :meth:`~batchtrack.BatchTracker.list_batches`.

    Attributes:
        batches: The batches of the page, newest first (by creation), each without
            items (:attr:`BatchSnapshot.items` is empty; counts, status and ETA are
            those of the whole batch).
        next_after: The batch id to pass as ``after`` for the next page, or None when
            this is the last.
    """

    batches: tuple[BatchSnapshot, ...]
    next_after: str | None = None


class ProgressEvent:
    """What one item transition did, and where the batch stands right after it.

    Immutable and hashable, like the other values (assigning an attribute raises
    :class:`attrs.exceptions.FrozenInstanceError`); two events are equal when all their
    attributes are. The ETA of an event the tracker made is worked out the first time it
    is read, so that transitions nobody watches do not pay for it. Its attributes are
    the properties below.
    """

    __slots__ = ("_eta", "_values")
    # (batch_id, item, progress, changed, version): one slot, so that making an event
    # costs two assignments. _eta holds the tuple (ETA, range) once worked out, before
    # that the list [function, arguments] that works it out.
    _values: tuple[str, ItemSnapshot, Progress, bool, int]
    _eta: Any

    def __init__(
        self,
        batch_id: str,
        item: ItemSnapshot,
        progress: Progress,
        estimated_time_remaining: int | None,
        changed: bool = True,
        version: int = 0,
        eta_range: tuple[int, int] | None = None,
    ) -> None:
        _put_values(self, (batch_id, item, progress, changed, version))
        _put_eta(self, (estimated_time_remaining, eta_range))

    @classmethod
    def _later(
        cls,
        batch_id: str,
        item: ItemSnapshot,
        progress: Progress,
        changed: bool,
        version: int,
        estimate: Callable[..., tuple[int | None, tuple[int, int] | None]],
        arguments: tuple[Any, ...],
    ) -> ProgressEvent:
        """An event whose ETA ``estimate(*arguments)`` works out when first read."""
        event = cls.__new__(cls)
        _put_values(event, (batch_id, item, progress, changed, version))
        _put_eta(event, [estimate, arguments])  # a list: not worked out yet
        return event

    def _worked_out(self) -> tuple[int | None, tuple[int, int] | None]:
        eta = self._eta
        if type(eta) is list:
            estimate, arguments = eta
            eta = estimate(*arguments)
            _put_eta(self, eta)
        return eta  # type: ignore[no-any-return]

    @property
    def batch_id(self) -> str:
        """The batch."""
        return self._values[0]

    @property
    def item(self) -> ItemSnapshot:
        """The item as it is after the transition."""
        return self._values[1]

    @property
    def progress(self) -> Progress:
        """The batch's counts right after the transition."""
        return self._values[2]

    @property
    def changed(self) -> bool:
        """False when the call repeated a transition that had already happened (a no-op,
        counted nothing)."""
        return self._values[3]

    @property
    def version(self) -> int:
        """The batch version after the transition."""
        return self._values[4]

    @property
    def estimated_time_remaining(self) -> int | None:
        """The ETA right after the transition (see
        :attr:`BatchSnapshot.estimated_time_remaining`)."""
        return self._worked_out()[0]

    @property
    def eta_range(self) -> tuple[int, int] | None:
        """The 80% range of the ETA right after the transition (see
        :attr:`BatchSnapshot.eta_range`)."""
        return self._worked_out()[1]

    @property
    def status(self) -> Status:
        """The batch status right after the transition."""
        return self.progress.status

    def _fields(self) -> tuple[Any, ...]:
        batch_id, item, progress, changed, version = self._values
        eta, eta_range = self._worked_out()
        return (batch_id, item, progress, eta, changed, version, eta_range)

    def __setattr__(self, name: str, value: object) -> None:
        raise attrs.exceptions.FrozenInstanceError

    def __delattr__(self, name: str) -> None:
        raise attrs.exceptions.FrozenInstanceError

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ProgressEvent):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        names = (
            "batch_id",
            "item",
            "progress",
            "estimated_time_remaining",
            "changed",
            "version",
            "eta_range",
        )
        fields = ", ".join(f"{n}={v!r}" for n, v in zip(names, self._fields(), strict=True))
        return f"ProgressEvent({fields})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (ProgressEvent, self._fields())


# The slots' own setters: they skip the __setattr__ that keeps events frozen.
_put_values = ProgressEvent.__dict__["_values"].__set__
_put_eta = ProgressEvent.__dict__["_eta"].__set__


@attrs.frozen
class Item:
    """A unit of work for the :class:`~batchtrack.Orchestrator`.

    Attributes:
        filename: The name users see (for a path given to ``submit``: its base name).
        source: What the processor works on: a path, bytes, a URL, a key in your storage;
            None means the filename itself.
        id: The item id; generated (UUID4) when None.
        batch_id: Set by the orchestrator before the processor sees the item.
    """

    filename: str
    source: Any = None
    id: str | None = None
    batch_id: str | None = None


# Private fast constructors for the stores' hot paths. attrs' frozen __init__ sets each
# field through a guarded setattr; these make the same instances (same class, same
# slots, so equal, hashable, picklable and shown alike) without it. Arguments are
# trusted: the callers pass values already checked.
#
# How: an instance of a writable twin (a subclass adding no slot, with object's own
# __setattr__) gets its slots by plain attribute stores (about 5 ns each, against ~50 ns
# for a call of a slot's __set__), then becomes the frozen class itself by __class__
# assignment, which Python allows between a class and a subclass of the same layout.
# The memory store's event path writes this out (no call per value object).
_new = object.__new__


class _ItemSnapshotFill(ItemSnapshot):
    """An :class:`ItemSnapshot` being filled in: writable until it becomes one."""

    __slots__ = ()
    __setattr__ = object.__setattr__
    __delattr__ = object.__delattr__


class _ProgressFill(Progress):
    """A :class:`Progress` being filled in: writable until it becomes one."""

    __slots__ = ()
    __setattr__ = object.__setattr__
    __delattr__ = object.__delattr__


class _ProgressEventFill(ProgressEvent):
    """A :class:`ProgressEvent` being filled in: writable until it becomes one."""

    __slots__ = ()
    __setattr__ = object.__setattr__  # type: ignore[assignment]
    __delattr__ = object.__delattr__


def _item_snapshot(
    id: str,
    filename: str,
    status: Status,
    error: str | None,
    attempts: int,
    source: str | None,
) -> ItemSnapshot:
    """``ItemSnapshot(id, filename, status, error, attempts, source)`` without attrs'
    guarded __init__ (no progress or stage)."""
    item: Any = _new(_ItemSnapshotFill)
    item.id = id
    item.filename = filename
    item.status = status
    item.error = error
    item.attempts = attempts
    item.source = source
    item.progress = None
    item.stage = None
    item._json = None
    item.__class__ = ItemSnapshot
    return item  # type: ignore[no-any-return]


def _progress(
    total: int, completed: int, failed: int, processing: int, pending: int, cancelled: int
) -> Progress:
    """``Progress(total, completed, failed, processing, pending, cancelled)`` without
    attrs' guarded __init__."""
    progress: Any = _new(_ProgressFill)
    progress.total = total
    progress.completed = completed
    progress.failed = failed
    progress.processing = processing
    progress.pending = pending
    progress.cancelled = cancelled
    progress.__class__ = Progress
    return progress  # type: ignore[no-any-return]
