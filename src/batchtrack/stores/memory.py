"""The in-process store: fast, thread-safe, gone when the process ends."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import attrs

from .._models import ItemSnapshot, Progress, Status
from ..exceptions import BatchNotFound, ItemNotFound, StoreError
from .base import BatchRecord, Outcome, Store, Transition, TransitionResult, add_stats

__all__ = ["MemoryStore"]

_PENDING = Status.PENDING
_PROCESSING = Status.PROCESSING
_NO_STATS: Mapping[str, float] = MappingProxyType({})


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
    index: dict[str, int]
    counts: dict[Status, int]
    stats: dict[str, float]

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
            dict(self.stats),
            items,
        )


@attrs.define
class MemoryStore(Store):
    """Batches in a dict in this process, guarded by one lock.

    The default store of :class:`~batchtrack.BatchTracker`. Every method is atomic
    with respect to every other; nothing is shared with other processes.
    """

    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _batches: dict[str, _Batch] = attrs.field(factory=dict, init=False)

    def create(self, batch: BatchRecord, items: Sequence[ItemSnapshot]) -> None:
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
            {item.id: i for i, item in enumerate(items)},
            counts,
            dict(batch.stats),
        )
        with self._lock:
            if batch.batch_id in self._batches:
                raise StoreError(f"batch {batch.batch_id!r} exists already")
            self._batches[batch.batch_id] = state

    def apply(self, batch_id: str, transition: Transition) -> TransitionResult:
        with self._lock:
            state = self._batches.get(batch_id)
            if state is None or state.expires_at <= transition.at:
                raise BatchNotFound(batch_id)
            position = state.index.get(transition.item_id)
            if position is None:
                raise ItemNotFound(batch_id, transition.item_id)
            item = state.items[position]
            previous = item.status
            if previous is not transition.target and previous in transition.sources:
                outcome = Outcome.APPLIED
                target = transition.target
                item = state.items[position] = ItemSnapshot(
                    item.id, item.filename, target, transition.error
                )
                counts = state.counts
                counts[previous] -= 1
                counts[target] += 1
                contributions = transition.stats.get(previous)
                if contributions:
                    add_stats(state.stats, contributions, transition.at - state.changed[position])
                state.changed[position] = transition.at
                state.updated_at = transition.at
                state.version += 1
                if counts[_PENDING] or counts[_PROCESSING]:
                    state.expires_at = transition.expires_at_open
                else:
                    state.finished_at = transition.at
                    state.expires_at = transition.expires_at_finished
                state.progress = Progress(
                    state.progress.total,
                    counts[Status.COMPLETED],
                    counts[Status.FAILED],
                    counts[_PROCESSING],
                    counts[_PENDING],
                )
            elif previous is transition.target:
                outcome = Outcome.UNCHANGED
            else:
                outcome = Outcome.REJECTED
            return TransitionResult(
                outcome,
                previous,
                item,
                state.progress,
                state.version,
                state.created_at,
                state.finished_at,
                state.expires_at,
                dict(state.stats) if state.stats else _NO_STATS,
            )

    def load(self, batch_id: str, *, items: bool = True) -> BatchRecord | None:
        with self._lock:
            state = self._batches.get(batch_id)
            if state is None:
                return None
            return state.record(tuple(state.items) if items else ())

    def delete(self, batch_id: str) -> bool:
        with self._lock:
            return self._batches.pop(batch_id, None) is not None

    def purge_expired(self, now: float) -> int:
        with self._lock:
            expired = [bid for bid, s in self._batches.items() if s.expires_at <= now]
            for batch_id in expired:
                del self._batches[batch_id]
        return len(expired)
