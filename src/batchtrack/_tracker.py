"""BatchTracker: every rule about batches, items, expiry and the ETA, in one place."""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Union

import attrs

from . import _eta
from ._closing import Closing
from ._models import BatchSnapshot, ItemSnapshot, Progress, ProgressEvent, Status, utc_datetime
from .exceptions import BatchNotFound, InvalidTransition, ValidationError
from .stores.base import BatchRecord, Outcome, Store, Transition
from .stores.memory import MemoryStore

__all__ = ["IDLE_TIMEOUT", "MAX_ERROR_LENGTH", "BatchTracker", "ItemSpec"]

log = logging.getLogger("batchtrack")

IDLE_TIMEOUT = 24 * 3600.0
"""An unfinished batch with no update for this many seconds is gone."""

MAX_ERROR_LENGTH = 1000
"""Longer error messages are cut to this many characters (ending in an ellipsis)."""

_MAX_NAME_LENGTH = 1024
_MAX_ID_LENGTH = 255

ItemSpec = Union[str, "tuple[str, str]"]
"""An item given to :meth:`BatchTracker.create_batch`: a filename, or ``(item_id, filename)``."""

_START = (Status.PROCESSING, frozenset({Status.PENDING}))
_COMPLETE = (Status.COMPLETED, frozenset({Status.PROCESSING}))
_FAIL = (Status.FAILED, frozenset({Status.PENDING, Status.PROCESSING}))


def _check_text(value: object, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a string, not {type(value).__name__}")
    if not value.strip():
        raise ValidationError(f"{what} must not be empty")
    if len(value) > limit:
        raise ValidationError(f"{what} is longer than {limit} characters")
    if any(ch in value for ch in "\x00\r\n"):
        raise ValidationError(f"{what} must not contain NUL or line breaks: {value!r}")
    return value


def _check_positive(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"{what} must be a number of seconds, not {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValidationError(f"{what} must be a positive finite number of seconds, not {value!r}")
    return float(value)


def _check_owner(owner: object) -> str | None:
    if owner is None:
        return None
    return _check_text(owner, "owner", _MAX_ID_LENGTH)


def _check_id(value: object, what: str) -> str:
    # Lookups by id reject wrong types loudly; an unknown string is just "not found".
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a string, not {type(value).__name__}")
    return value


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

    Raises:
        ValidationError: ``ttl`` is not a positive number or ``clock`` not callable.
    """

    store: Store = attrs.field(default=None, converter=_default_store)
    ttl: float = attrs.field(default=3600.0, kw_only=True)
    clock: Callable[[], float] = attrs.field(default=time.time, kw_only=True)
    _origins: dict[str, float] = attrs.field(factory=dict, init=False, repr=False)
    _sweeper: threading.Thread | None = attrs.field(default=None, init=False, repr=False)
    _sweeper_stop: threading.Event = attrs.field(factory=threading.Event, init=False, repr=False)
    _sweeper_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.store, Store):
            raise ValidationError(
                f"store must be a batchtrack.stores.base.Store, not {type(self.store).__name__}"
            )
        self.ttl = _check_positive(self.ttl, "ttl")
        if not callable(self.clock):
            raise ValidationError("clock must be callable, like time.time")

    # -- creating and reading -------------------------------------------------------

    def create_batch(self, items: Iterable[ItemSpec], *, owner: str | None = None) -> BatchSnapshot:
        """Create a batch whose items are all pending.

        Args:
            items: Filenames, or ``(item_id, filename)`` pairs; ids are generated (UUID4)
                where not given.
            owner: Who may see the batch (see :meth:`get`); None for nobody in particular.

        Returns:
            The new batch.

        Raises:
            ValidationError: No items, an empty or malformed filename or id, or the same
                item id twice.
        """
        owner = _check_owner(owner)
        if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
            raise ValidationError("items must be an iterable of filenames or (id, filename) pairs")
        snapshots: list[ItemSnapshot] = []
        seen: set[str] = set()
        for position, spec in enumerate(items):
            if isinstance(spec, tuple):
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
            snapshots.append(ItemSnapshot(item_id, filename))
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
        )
        self.store.create(record, snapshots)
        return self._snapshot(attrs.evolve(record, items=tuple(snapshots)), now)

    def get(self, batch_id: str, *, owner: str | None = None, items: bool = True) -> BatchSnapshot:
        """The batch as it is now.

        Args:
            batch_id: The batch.
            owner: The caller's identity. A batch created with another owner is reported
                as not found; None means a trusted caller (no check).
            items: False to leave ``items`` empty and read only counts, status and ETA,
                which costs the same for any batch size.

        Raises:
            BatchNotFound: Unknown, expired or deleted, or owned by someone else.
        """
        now = self.clock()
        return self._snapshot(self._visible(batch_id, owner, items=items, now=now), now)

    def delete(self, batch_id: str) -> bool:
        """Remove a batch now; True if a visible batch was removed, else False."""
        batch_id = _check_id(batch_id, "batch_id")
        record = self.store.load(batch_id, items=False)
        self._origins.pop(batch_id, None)
        if record is None:
            return False
        removed = self.store.delete(batch_id)
        return removed and record.expires_at > self.clock()

    def cleanup(self) -> int:
        """Remove every expired batch from the store; return how many were removed."""
        removed = self.store.purge_expired(self.clock())
        if removed:
            self._origins.clear()
        return removed

    # -- transitions ----------------------------------------------------------------

    def start_item(self, batch_id: str, item_id: str) -> ProgressEvent:
        """Mark a pending item as processing.

        Starting an item that is already processing is a no-op.

        Raises:
            BatchNotFound: Unknown or expired batch.
            ItemNotFound: The batch has no such item.
            InvalidTransition: The item is already final.
        """
        return self._transition(batch_id, item_id, _START, None)

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
    ) -> ProgressEvent:
        if type(batch_id) is not str or type(item_id) is not str:
            _check_id(batch_id, "batch_id")
            _check_id(item_id, "item_id")
        target, sources = rule
        now = self.clock()
        origin = self._origin(batch_id)
        result = self.store.apply(
            batch_id,
            Transition(
                item_id,
                target,
                sources,
                now,
                error,
                now + IDLE_TIMEOUT,
                now + self.ttl,
                _eta.stats_for(target, now, origin),
            ),
        )
        outcome = result.outcome
        if outcome is Outcome.REJECTED:
            raise InvalidTransition(batch_id, item_id, result.previous.value, target.value)
        if outcome is Outcome.UNCHANGED and result.expires_at <= now:
            # A repeat on a finished batch changes nothing, so the store had no reason
            # to look at its expiry; an expired batch must still look absent.
            raise BatchNotFound(batch_id)
        progress = result.progress
        return ProgressEvent(
            batch_id,
            result.item,
            progress,
            _eta.estimate(progress, result.created_at, result.stats, now),
            outcome is Outcome.APPLIED,
            result.version,
        )

    # -- expiry -----------------------------------------------------------------------

    def start_sweeper(self, interval: float = 600.0) -> None:
        """Run :meth:`cleanup` every ``interval`` seconds in a daemon thread.

        Raises:
            ValidationError: ``interval`` is not a positive number.
            RuntimeError: A sweeper is already running.
        """
        interval = _check_positive(interval, "interval")
        with self._sweeper_lock:
            if self._sweeper is not None:
                raise RuntimeError("the sweeper is already running; stop_sweeper() first")
            self._sweeper_stop.clear()
            thread = threading.Thread(
                target=self._sweep, args=(interval,), name="batchtrack-sweeper", daemon=True
            )
            self._sweeper = thread
            thread.start()

    def stop_sweeper(self) -> None:
        """Stop the sweeper thread and wait for it; does nothing when none runs."""
        with self._sweeper_lock:
            thread, self._sweeper = self._sweeper, None
            self._sweeper_stop.set()
        if thread is not None:
            thread.join()

    def _sweep(self, interval: float) -> None:
        while not self._sweeper_stop.wait(interval):
            try:
                removed = self.cleanup()
            except Exception:  # the sweeper must outlive a passing store failure
                log.exception("batchtrack sweeper: cleanup failed; trying again later")
            else:
                if removed:
                    log.debug("batchtrack sweeper removed %d expired batches", removed)

    def close(self) -> None:
        """Stop the sweeper (the end of a ``with BatchTracker(...)`` block does this).

        The store stays open: it may be shared; close it yourself when done.
        """
        self.stop_sweeper()

    # -- helpers ----------------------------------------------------------------------

    def _visible(self, batch_id: str, owner: str | None, *, items: bool, now: float) -> BatchRecord:
        batch_id = _check_id(batch_id, "batch_id")
        if owner is not None:
            owner = _check_id(owner, "owner")
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

    def _snapshot(self, record: BatchRecord, now: float) -> BatchSnapshot:
        progress = record.progress
        return BatchSnapshot(
            batch_id=record.batch_id,
            status=progress.status,
            progress=progress,
            items=record.items,
            estimated_time_remaining=_eta.estimate(progress, record.created_at, record.stats, now),
            created_at=utc_datetime(record.created_at),
            updated_at=utc_datetime(record.updated_at),
            finished_at=None if record.finished_at is None else utc_datetime(record.finished_at),
            owner=record.owner,
            version=record.version,
        )
