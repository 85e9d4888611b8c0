"""The in-process store: fast, thread-safe, gone when the process ends."""

from __future__ import annotations

import bisect
import heapq
import itertools
import queue
import threading
from array import array
from collections.abc import Callable, Mapping, Sequence
from heapq import heappush
from typing import Any

import attrs

from .. import _eta
from .._models import (
    NO_METADATA,
    ItemSnapshot,
    Progress,
    Status,
    _item_snapshot,
    _ItemSnapshotFill,
    _progress,
    _ProgressFill,
)
from ..exceptions import BatchNotFound, ItemNotFound, StoreError
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
)

__all__ = ["MemoryStore"]

_PENDING = Status.PENDING
_PROCESSING = Status.PROCESSING
_COMPLETED = Status.COMPLETED
_FAILED = Status.FAILED
_CANCELLED = Status.CANCELLED
_new = object.__new__
_APPLIED = Outcome.APPLIED
_UNCHANGED = Outcome.UNCHANGED
_REJECTED = Outcome.REJECTED
_PAUSED = Outcome.PAUSED
# What _apply_parts answers: (outcome, previous status, item, progress, version,
# created_at, expires_at, stats).
_Answer = tuple[Outcome, Status, ItemSnapshot, Progress, int, float, float, Mapping[str, float]]


@attrs.define
class _Batch:
    """The mutable state of one batch; only touched under the store's lock."""

    batch_id: str
    owner: str | None
    created_at: float
    updated_at: float
    finished_at: float | None
    expires_at: float
    version: int
    progress: Progress
    items: list[ItemSnapshot]
    changed: list[float]  # when each item last changed
    leases: list[float | None]  # when each item's lease runs out
    beats: list[float]  # each item's last start or heartbeat
    index: dict[str, int]
    counts: dict[Status, int]
    stats: dict[str, float]
    # The position of the item each version changed: log[v - 1] moved at version v, so
    # the items changed since version v are log[v:] (O(changes) to find).
    log: array[int]
    # The positions of the items in each status, for status-filtered pages.
    members: dict[Status, set[int]]
    paused: bool = False
    metadata: Mapping[str, str] = NO_METADATA

    def record(self, items: tuple[ItemSnapshot, ...]) -> BatchRecord:
        return BatchRecord(
            self.batch_id,
            self.owner,
            self.created_at,
            self.updated_at,
            self.finished_at,
            self.expires_at,
            self.version,
            self.progress,
            self.stats,
            items,
            self.paused,
            self.metadata,
        )

    def move(self, position: int, transition: Transition) -> None:
        """Apply an allowed transition to one item and bring the header up to date."""
        self.shift(
            position,
            transition.target,
            transition.at,
            transition.error,
            transition.lease_until,
            transition.add_attempt,
            transition.reset_attempts,
            transition.stats,
            transition.expires_at_open,
            transition.expires_at_finished,
        )

    def shift(
        self,
        position: int,
        target: Status,
        at: float,
        error: str | None,
        lease_until: float | None,
        add_attempt: bool,
        reset_attempts: bool,
        stats: EventStats,
        expires_at_open: float,
        expires_at_finished: float,
    ) -> None:
        """:meth:`move` with the transition's fields as arguments: every store call that
        changes an item, written out in one piece (the tracker's single events use the
        copy written out in :meth:`MemoryStore._apply_parts`; keep the two alike)."""
        item = self.items[position]
        previous = item.status
        attempts = item.attempts
        if add_attempt:
            attempts += 1
        elif reset_attempts:
            attempts = 0
        self.items[position] = _item_snapshot(
            item.id, item.filename, target, error, attempts, item.source
        )
        self.leases[position] = lease_until
        if lease_until is not None:
            self.beats[position] = at
        counts = self.counts
        counts[previous] -= 1
        counts[target] += 1
        members = self.members
        members[previous].discard(position)
        members[target].add(position)
        self.log.append(position)
        # A new dict each time, never changed after: results share it without a copy.
        if type(stats) is tuple:  # the tracker's (origin, lease): summed in one piece
            added = _eta.added(
                self.stats, previous, target, at, stats[0], stats[1], at - self.changed[position]
            )
            if added is not None:
                self.stats = added
        else:
            contributions = stats.get(previous)  # type: ignore[union-attr]
            if contributions:
                added = dict(self.stats)
                add_stats(added, contributions, at - self.changed[position])
                self.stats = added
        self.changed[position] = at
        self.updated_at = at
        self.version += 1
        pending = counts[_PENDING]
        processing = counts[_PROCESSING]
        if pending or processing:
            self.finished_at = None
            self.expires_at = expires_at_open
        else:
            self.finished_at = at
            self.expires_at = expires_at_finished
        self.progress = _progress(
            self.progress.total,
            counts[_COMPLETED],
            counts[_FAILED],
            processing,
            pending,
            counts[_CANCELLED],
        )


@attrs.define
class MemoryStore(Store):
    """Batches in a dict in this process, guarded by one lock.

    The default store of :class:`~batchtrack.BatchTracker`. Every method is atomic
    with respect to every other; nothing is shared with other processes.

    It can :meth:`listen`: every change is handed to each listener's queue (a cheap put
    in the writer's thread) and reported from the listener's own thread.
    """

    can_listen = True

    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    # One queue per running listen(), replaced (never changed) under the lock, so writers
    # read it without taking the lock.
    _listeners: tuple[queue.SimpleQueue[str | None], ...] = attrs.field(default=(), init=False)
    _batches: dict[str, _Batch] = attrs.field(factory=dict, init=False)
    # Every lease handed out: (lease_until, batch id, position). Entries whose item has
    # moved on or renewed are dropped when they come due, so listing lost items costs
    # what is due, not what is stored.
    _leases: list[tuple[float, str, int]] = attrs.field(factory=list, init=False)
    # Idempotency keys: (owner, key) -> (batch id, fingerprint, key_expires_at).
    _keys: dict[tuple[str | None, str], tuple[str, str, float]] = attrs.field(
        factory=dict, init=False
    )
    # The outbox: entry id -> [entry, due at, lease until or None]; and unsubscribed URLs.
    _outbox: dict[str, list[Any]] = attrs.field(factory=dict, init=False)
    _gone: set[str] = attrs.field(factory=set, init=False)
    # The end markers written per batch, so that they go with it (some may be settled).
    _ends: dict[str, list[str]] = attrs.field(factory=dict, init=False)
    # Batches in creation order, for list_batches: (created_at, batch id) sorted
    # ascending, one list per owner and one of every batch. Kept under the lock by
    # create, delete and purge; a page bisects to its start and walks back.
    _by_owner: dict[str | None, list[tuple[float, str]]] = attrs.field(factory=dict, init=False)
    _by_time: list[tuple[float, str]] = attrs.field(factory=list, init=False)

    def create(self, batch: BatchRecord, items: Sequence[ItemSnapshot]) -> None:
        self._create(batch, items, None)

    def create_keyed(
        self,
        batch: BatchRecord,
        items: Sequence[ItemSnapshot],
        key: str,
        fingerprint: str,
        key_expires_at: float,
    ) -> tuple[str, str] | None:
        return self._create(batch, items, (key, fingerprint, key_expires_at))

    def _create(
        self,
        batch: BatchRecord,
        items: Sequence[ItemSnapshot],
        keyed: tuple[str, str, float] | None,
    ) -> tuple[str, str] | None:
        counts = dict.fromkeys(Status, 0)
        counts[_PENDING] = len(items)
        state = _Batch(
            batch.batch_id,
            batch.owner,
            batch.created_at,
            batch.updated_at,
            batch.finished_at,
            batch.expires_at,
            batch.version,
            batch.progress,
            list(items),
            [batch.created_at] * len(items),
            [None] * len(items),
            [batch.created_at] * len(items),
            {item.id: i for i, item in enumerate(items)},
            counts,
            dict(batch.stats),
            array("q"),
            {status: set() for status in Status},
            metadata=batch.metadata,
        )
        for position, item in enumerate(items):
            state.members[item.status].add(position)
        now = batch.created_at
        with self._lock:
            if keyed is not None:
                held = self._keys.get((batch.owner, keyed[0]))
                if held is not None and held[2] > now:
                    other = self._batches.get(held[0])
                    if other is not None and other.expires_at > now:
                        return held[0], held[1]
            if batch.batch_id in self._batches:
                raise StoreError(f"batch {batch.batch_id!r} exists already")
            self._batches[batch.batch_id] = state
            entry = (batch.created_at, batch.batch_id)
            bisect.insort(self._by_time, entry)
            bisect.insort(self._by_owner.setdefault(batch.owner, []), entry)
            if keyed is not None:
                self._keys[(batch.owner, keyed[0])] = (batch.batch_id, keyed[1], keyed[2])
        self._changed(batch.batch_id)
        return None

    def _changed(self, batch_id: str) -> None:
        """Tell every listener that ``batch_id`` changed (after the change is visible)."""
        for listener in self._listeners:
            listener.put(batch_id)

    def listen(self, on_change: Callable[[str | None], None], stop: threading.Event) -> None:
        changes: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        with self._lock:
            self._listeners = (*self._listeners, changes)
        try:
            on_change(None)
            while not stop.is_set():
                try:
                    batch_id = changes.get(timeout=0.5)
                except queue.Empty:
                    continue
                on_change(batch_id)
        finally:
            with self._lock:
                self._listeners = tuple(q for q in self._listeners if q is not changes)

    def _find(self, batch_id: str, item_id: str, at: float) -> tuple[_Batch, int]:
        state = self._batches.get(batch_id)
        if state is None or state.expires_at <= at:
            raise BatchNotFound(batch_id)
        position = state.index.get(item_id)
        if position is None:
            raise ItemNotFound(batch_id, item_id)
        return state, position

    def apply(self, batch_id: str, transition: Transition) -> TransitionResult:
        with self._lock:
            state, position = self._find(batch_id, transition.item_id, transition.at)
            result = self._apply_at(state, position, transition)
        if result.outcome is _APPLIED and self._listeners:
            self._changed(batch_id)
        return result

    def apply_all(self, batch_id: str, transitions: Sequence[Transition]) -> list[TransitionResult]:
        # One lock for all of them; every item is found before anything changes.
        with self._lock:
            state = self._batches.get(batch_id)
            index = None if state is None else state.index
            found = []
            for transition in transitions:
                if state is None or state.expires_at <= transition.at:
                    raise BatchNotFound(batch_id)
                assert index is not None
                position = index.get(transition.item_id)
                if position is None:
                    raise ItemNotFound(batch_id, transition.item_id)
                found.append(position)
            assert state is not None or not transitions
            results = [
                self._apply_at(state, position, transition)  # type: ignore[arg-type]
                for position, transition in zip(found, transitions, strict=True)
            ]
        if self._listeners and any(r.outcome is _APPLIED for r in results):
            self._changed(batch_id)
        return results

    def _apply_at(self, state: _Batch, position: int, transition: Transition) -> TransitionResult:
        """:meth:`apply` of a found item, under the lock."""
        item = state.items[position]
        previous = item.status
        if previous is transition.target:
            outcome = Outcome.UNCHANGED
        elif (
            previous not in transition.sources
            or (
                transition.lost_before is not None
                and not _ran_out(state.leases[position], transition.lost_before)
            )
            or (transition.max_attempts is not None and item.attempts >= transition.max_attempts)
        ):
            outcome = Outcome.REJECTED
        elif transition.unless_paused and state.paused:
            outcome = Outcome.PAUSED
        else:
            outcome = Outcome.APPLIED
            was_open = state.finished_at is None
            state.move(position, transition)
            if was_open and state.finished_at is not None:
                self._ended(state)
            if transition.lease_until is not None:
                heapq.heappush(self._leases, (transition.lease_until, state.batch_id, position))
        return self._result(outcome, previous, state, position)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.apply is not MemoryStore.apply:  # what it applies must be what applies
            cls._apply_parts = Store._apply_parts  # type: ignore[method-assign]
            if cls.apply_all is MemoryStore.apply_all:
                cls.apply_all = Store.apply_all  # type: ignore[method-assign]
        if cls.apply is not MemoryStore.apply or cls.apply_all is not MemoryStore.apply_all:
            cls._apply_steps = None  # type: ignore[assignment]  # the tracker calls apply_all

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
        # The tracker's hot path, without the Transition and TransitionResult objects
        # (a subclass that changes apply() gets the generic way: __init_subclass__). The
        # tests run random sequences through both ways and compare everything.
        with self._lock:
            state = self._batches.get(batch_id)  # _find, written out
            if state is None or state.expires_at <= at:
                raise BatchNotFound(batch_id)
            position = state.index.get(item_id)
            if position is None:
                raise ItemNotFound(batch_id, item_id)
            item = state.items[position]
            previous = item.status
            if previous is target:
                outcome = _UNCHANGED
            elif previous not in sources:
                outcome = _REJECTED
            elif state.paused and lease_until is not None:  # a start
                outcome = _PAUSED
            elif type(stats) is not tuple:  # contributions, not the tracker's shorthand
                outcome = _APPLIED
                was_open = state.finished_at is None
                state.shift(
                    position,
                    target,
                    at,
                    error,
                    lease_until,
                    lease_until is not None,
                    False,
                    stats,
                    expires_at_open,
                    expires_at_finished,
                )
                if was_open and state.finished_at is not None:
                    self._ended(state)
                if lease_until is not None:
                    heappush(self._leases, (lease_until, batch_id, position))
            else:
                # state.shift(position, target, at, error, lease_until, lease_until is not
                # None, False, stats, ...) written out: the one hot path of every event.
                # tests/test_fast_path.py checks it against apply() event by event.
                outcome = _APPLIED
                was_open = state.finished_at is None
                attempts = item.attempts
                if lease_until is not None:
                    attempts += 1
                # _item_snapshot written out (see _models: a writable twin, then the class)
                snapshot: Any = _new(_ItemSnapshotFill)
                snapshot.id = item.id
                snapshot.filename = item.filename
                snapshot.status = target
                snapshot.error = error
                snapshot.attempts = attempts
                snapshot.source = item.source
                snapshot.progress = None
                snapshot.stage = None
                snapshot._json = None
                snapshot.__class__ = ItemSnapshot
                state.items[position] = snapshot
                state.leases[position] = lease_until
                if lease_until is not None:
                    state.beats[position] = at
                counts = state.counts
                counts[previous] -= 1
                counts[target] += 1
                members = state.members
                members[previous].discard(position)
                members[target].add(position)
                state.log.append(position)
                changed = state.changed
                added = _eta.added(
                    state.stats, previous, target, at, stats[0], stats[1], at - changed[position]
                )
                if added is not None:
                    state.stats = added
                changed[position] = at
                state.updated_at = at
                version = state.version = state.version + 1
                pending = counts[_PENDING]
                processing = counts[_PROCESSING]
                if pending or processing:
                    state.finished_at = None
                    expires = state.expires_at = expires_at_open
                else:
                    state.finished_at = at
                    expires = state.expires_at = expires_at_finished
                progress: Any = _new(_ProgressFill)  # _progress written out
                progress.total = state.progress.total
                progress.completed = counts[_COMPLETED]
                progress.failed = counts[_FAILED]
                progress.processing = processing
                progress.pending = pending
                progress.cancelled = counts[_CANCELLED]
                progress.__class__ = Progress
                state.progress = progress
                if was_open and not (pending or processing):
                    self._ended(state)
                if lease_until is not None:
                    heappush(self._leases, (lease_until, batch_id, position))
                answer = (
                    _APPLIED,
                    previous,
                    snapshot,
                    progress,
                    version,
                    state.created_at,
                    expires,
                    state.stats,
                )
            if outcome is not _APPLIED or type(stats) is not tuple:
                answer = (
                    outcome,
                    previous,
                    state.items[position],
                    state.progress,
                    state.version,
                    state.created_at,
                    state.expires_at,
                    state.stats,
                )
        if outcome is _APPLIED and self._listeners:
            self._changed(batch_id)
        return answer

    def _apply_steps(
        self,
        batch_id: str,
        steps: Sequence[tuple[str, Status, frozenset[Status], str | None, float | None]],
        at: float,
        expires_at_open: float,
        expires_at_finished: float,
        origin: float,
    ) -> list[_Answer]:
        """The tracker's several events in one call (what the orchestrator sends):
        :meth:`apply_all` of the transitions :meth:`_apply_parts` would make of each
        ``(item_id, target, sources, error, lease seconds or None)`` at ``at``, with the
        ETA sums of the tracker's ``(origin, lease)`` shorthand, answered as
        :meth:`_apply_parts` answers, one tuple per step. No Transition,
        TransitionResult or contributions are built; a subclass that changes apply()
        or apply_all() does not have this method (__init_subclass__), so the tracker
        takes apply_all() for it. tests/test_fast_path.py checks it against
        apply_all() group by group.

        Raises:
            BatchNotFound: The batch is missing or expired at ``at`` (nothing applied).
            ItemNotFound: A step names an item not in the batch (nothing applied).
        """
        answers: list[_Answer] = []
        applied = False
        with self._lock:
            state = self._batches.get(batch_id)
            if not steps:
                return []
            if state is None or state.expires_at <= at:
                raise BatchNotFound(batch_id)
            index = state.index
            found = []
            for step in steps:
                position = index.get(step[0])
                if position is None:
                    raise ItemNotFound(batch_id, step[0])
                found.append(position)
            items = state.items
            for position, (_, target, sources, error, lease) in zip(found, steps, strict=True):
                previous = items[position].status
                if previous is target:
                    outcome = _UNCHANGED
                elif previous not in sources:
                    outcome = _REJECTED
                elif state.paused and lease is not None:  # a start
                    outcome = _PAUSED
                else:
                    outcome = _APPLIED
                    applied = True
                    lease_until = None if lease is None else at + lease
                    was_open = state.finished_at is None
                    state.shift(
                        position,
                        target,
                        at,
                        error,
                        lease_until,
                        lease is not None,
                        False,
                        (origin, lease),
                        expires_at_open,
                        expires_at_finished,
                    )
                    if was_open and state.finished_at is not None:
                        self._ended(state)
                    if lease_until is not None:
                        heappush(self._leases, (lease_until, batch_id, position))
                answers.append(
                    (
                        outcome,
                        previous,
                        items[position],
                        state.progress,
                        state.version,
                        state.created_at,
                        state.expires_at,
                        state.stats,
                    )
                )
        if applied and self._listeners:
            self._changed(batch_id)
        return answers

    def _ended(self, state: _Batch) -> None:
        """Add the end marker of ``state``, which a transition just ended (under the lock)."""
        marker = end_marker(state.batch_id, state.version, state.updated_at)
        self._outbox[marker.entry_id] = [marker, marker.ended_at, None]
        self._ends.setdefault(state.batch_id, []).append(marker.entry_id)

    @staticmethod
    def _result(
        outcome: Outcome, previous: Status, state: _Batch, position: int
    ) -> TransitionResult:
        return TransitionResult(
            outcome,
            previous,
            state.items[position],
            state.progress,
            state.version,
            state.created_at,
            state.finished_at,
            state.expires_at,
            state.stats,
        )

    def set_paused(self, batch_id: str, paused: bool, at: float, expires_at_open: float) -> bool:
        with self._lock:
            state = self._batches.get(batch_id)
            if state is None or state.expires_at <= at:
                raise BatchNotFound(batch_id)
            if state.paused is paused or (paused and state.finished_at is not None):
                return False
            state.paused = paused
            state.version += 1
            state.log.append(-1)  # no item changed at this version
            state.updated_at = at
            if state.finished_at is None:
                state.expires_at = expires_at_open
        self._changed(batch_id)
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
        with self._lock:
            state, position = self._find(batch_id, item_id, at)
            item = state.items[position]
            if item.status is not _PROCESSING:
                return item
            item = state.items[position] = attrs.evolve(item, progress=fraction, stage=stage)
            state.version += 1
            state.log.append(position)
            state.updated_at = at
            state.expires_at = expires_at_open
        self._changed(batch_id)
        return item

    def renew(
        self, batch_id: str, item_id: str, at: float, lease_until: float, expires_at_open: float
    ) -> TransitionResult:
        with self._lock:
            state, position = self._find(batch_id, item_id, at)
            status = state.items[position].status
            if status is not _PROCESSING:
                return self._result(Outcome.REJECTED, status, state, position)
            state.leases[position] = lease_until
            state.beats[position] = at
            state.expires_at = expires_at_open
            heapq.heappush(self._leases, (lease_until, batch_id, position))
            return self._result(Outcome.APPLIED, status, state, position)

    def apply_many(
        self, batch_id: str, transition: Transition, item_ids: Sequence[str] | None = None
    ) -> BulkResult:
        with self._lock:
            state = self._batches.get(batch_id)
            if state is None or state.expires_at <= transition.at:
                raise BatchNotFound(batch_id)
            sources = transition.sources
            if item_ids is None:
                positions = [
                    n
                    for n, item in enumerate(state.items)
                    if item.status in sources and item.status is not transition.target
                ]
                rejected: tuple[tuple[str, Status], ...] = ()
            else:
                positions = []
                for item_id in item_ids:
                    position = state.index.get(item_id)
                    if position is None:
                        raise ItemNotFound(batch_id, item_id)
                    positions.append(position)
                rejected = tuple(
                    (state.items[n].id, state.items[n].status)
                    for n in positions
                    if state.items[n].status not in sources
                )
            if not rejected:
                was_open = state.finished_at is None
                for position in sorted(set(positions)):  # in creation order
                    state.move(position, transition)
                if was_open and state.finished_at is not None:
                    self._ended(state)
            applied = 0 if rejected else len(set(positions))
            result = BulkResult(applied, rejected, state.progress, state.version)
        if applied:
            self._changed(batch_id)
        return result

    def lost(self, now: float, limit: int) -> list[LostItem]:
        found: list[LostItem] = []
        with self._lock:
            leases = self._leases
            keep: list[tuple[float, str, int]] = []
            while leases and leases[0][0] <= now and len(found) < limit:
                entry = heapq.heappop(leases)
                lease_until, batch_id, position = entry
                state = self._batches.get(batch_id)
                if (
                    state is None
                    or state.leases[position] != lease_until
                    or state.items[position].status is not _PROCESSING
                ):
                    continue  # the item moved on or renewed since: a stale entry
                keep.append(entry)  # until the caller moves it, it stays listed
                if state.expires_at > now:
                    item = state.items[position]
                    found.append(
                        LostItem(
                            batch_id, item.id, item.attempts, state.beats[position], lease_until
                        )
                    )
            for entry in keep:
                heapq.heappush(leases, entry)
        return found

    def open_batches(self, now: float) -> list[str]:
        with self._lock:
            return [
                batch_id
                for batch_id, state in self._batches.items()
                if state.finished_at is None and state.expires_at > now
            ]

    def load(self, batch_id: str, *, items: bool = True) -> BatchRecord | None:
        with self._lock:
            state = self._batches.get(batch_id)
            if state is None:
                return None
            return state.record(tuple(state.items) if items else ())

    def load_items(self, batch_id: str, query: ItemQuery) -> BatchRecord | None:
        with self._lock:
            state = self._batches.get(batch_id)
            if state is None:
                return None
            return state.record(tuple(state.items[n] for n in _select(state, batch_id, query)))

    def list_batches(
        self, owner: str | None, now: float, limit: int, after: str | None
    ) -> list[BatchRecord]:
        with self._lock:
            index = self._by_time if owner is None else self._by_owner.get(owner, [])
            end = len(index)
            if after is not None:
                state = self._batches.get(after)
                if state is None or (owner is not None and state.owner != owner):
                    raise BatchNotFound(after)
                end = bisect.bisect_left(index, (state.created_at, after))
            found: list[BatchRecord] = []
            batches = self._batches
            for position in range(end - 1, -1, -1):
                state = batches[index[position][1]]
                if state.expires_at > now:
                    found.append(state.record(()))
                    if len(found) >= limit:
                        break
            return found

    def _unindex(self, state: _Batch) -> None:
        """Remove a batch from the creation-order lists (under the lock)."""
        entry = (state.created_at, state.batch_id)
        for index in (self._by_time, self._by_owner.get(state.owner)):
            if index is None:
                continue
            position = bisect.bisect_left(index, entry)
            if position < len(index) and index[position] == entry:
                del index[position]
        if not self._by_owner.get(state.owner, True):
            del self._by_owner[state.owner]

    def delete(self, batch_id: str) -> bool:
        with self._lock:
            state = self._batches.pop(batch_id, None)
            removed = state is not None
            if state is not None:
                self._unindex(state)
                self._drop_markers({batch_id})
        if removed:
            self._changed(batch_id)
        return removed

    def expired(self, now: float, limit: int) -> list[str]:
        with self._lock:
            found = [bid for bid, s in self._batches.items() if s.expires_at <= now]
        return found[:limit]

    def purge_expired(self, now: float) -> int:
        with self._lock:
            expired = [bid for bid, s in self._batches.items() if s.expires_at <= now]
            for name in [k for k, held in self._keys.items() if held[2] <= now]:
                del self._keys[name]
            for batch_id in expired:
                self._unindex(self._batches.pop(batch_id))
            if expired:
                self._drop_markers(set(expired))
                self._leases = [e for e in self._leases if e[1] in self._batches]
                heapq.heapify(self._leases)
        for batch_id in expired:
            self._changed(batch_id)
        return len(expired)

    def _drop_markers(self, batch_ids: set[str]) -> None:
        """Remove the end markers of these (removed) batches; under the lock."""
        for batch_id in batch_ids:
            for entry_id in self._ends.pop(batch_id, ()):
                self._outbox.pop(entry_id, None)

    # -- the outbox: a dict, scanned (it holds what is waiting, not what was delivered) --

    def outbox_claim(self, now: float, limit: int, lease_until: float) -> list[OutboxEntry]:
        with self._lock:
            due = sorted(
                (
                    held
                    for held in self._outbox.values()
                    if held[1] <= now and (held[2] is None or held[2] <= now)
                ),
                key=lambda held: held[1],
            )[:limit]
            claimed = []
            for held in due:
                held[2] = lease_until
                claimed.append(held[0])
            return claimed

    def outbox_expand(self, entry_id: str, deliveries: Sequence[OutboxEntry], at: float) -> None:
        with self._lock:
            self._outbox.pop(entry_id, None)
            for entry in deliveries:
                self._outbox.setdefault(entry.entry_id, [entry, at, None])

    def outbox_done(self, entry_id: str) -> None:
        with self._lock:
            self._outbox.pop(entry_id, None)

    def outbox_retry(self, entry_id: str, attempts: int, next_at: float) -> None:
        with self._lock:
            held = self._outbox.get(entry_id)
            if held is not None:
                held[:] = [attrs.evolve(held[0], attempts=attempts), next_at, None]

    def outbox_unsubscribe(self, url: str) -> None:
        with self._lock:
            self._gone.add(url)
            for entry_id in [k for k, (e, _, _) in self._outbox.items() if e.url == url]:
                del self._outbox[entry_id]

    def outbox_unsubscribed(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._gone)


def _select(state: _Batch, batch_id: str, query: ItemQuery) -> list[int]:
    """The positions of the items ``query`` selects, in order, at a cost of O(result)
    for pages and O(changes) for ``since`` (plus a sort of what matched)."""
    start = 0
    if query.after is not None:
        after = state.index.get(query.after)
        if after is None:
            raise ItemNotFound(batch_id, query.after)
        start = after + 1
    limit = len(state.items) if query.limit is None else query.limit
    status = query.status
    items = state.items
    if query.since is not None:
        first = query.since - (state.version - len(state.log))  # log[0] is that version + 1
        changed = sorted(set(state.log[max(first, 0) :]))
        chosen = (
            n for n in changed if n >= start and (status is None or items[n].status is status)
        )
        return list(itertools.islice(chosen, limit))
    if status is None:
        return list(range(start, min(start + limit, len(items))))
    members = state.members[status]
    if len(members) * 8 >= len(items):
        # A common status: walking the items in order finds a page after ~8 looks each.
        found = []
        for n in range(start, len(items)):
            if items[n].status is status:
                found.append(n)
                if len(found) >= limit:
                    break
        return found
    # A rare one: only its members are looked at.
    return heapq.nsmallest(limit, (n for n in members if n >= start))


def _ran_out(lease_until: float | None, moment: float) -> bool:
    return lease_until is not None and lease_until <= moment
