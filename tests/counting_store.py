"""A store that counts the reads made of it: for the tests and the benchmark of watchers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from batchtrack._models import ItemSnapshot
from batchtrack.stores.base import (
    BatchRecord,
    BulkResult,
    ItemQuery,
    LostItem,
    Store,
    Transition,
    TransitionResult,
)


class CountingStore(Store):
    """Every call goes to ``inner``; ``load``, ``load_items`` and ``changed_since`` are
    counted in :attr:`reads`.

    With ``listen=False`` the store says it cannot listen, whatever ``inner`` can: its
    watchers poll, as they do on a store without notifications.
    """

    def __init__(self, inner: Store, *, listen: bool = True) -> None:
        self.inner = inner
        self.can_listen = inner.can_listen and listen
        self.reads = 0
        self._lock = threading.Lock()

    def _count(self) -> None:
        with self._lock:
            self.reads += 1

    def take(self) -> int:
        """The reads counted since the last call."""
        with self._lock:
            reads, self.reads = self.reads, 0
        return reads

    # -- reads, counted ------------------------------------------------------------------

    def load(self, batch_id: str, *, items: bool = True) -> BatchRecord | None:
        self._count()
        return self.inner.load(batch_id, items=items)

    def load_items(self, batch_id: str, query: ItemQuery) -> BatchRecord | None:
        self._count()
        return self.inner.load_items(batch_id, query)

    def changed_since(self, batch_id: str, version: int) -> frozenset[str]:
        self._count()
        return self.inner.changed_since(batch_id, version)

    def list_batches(
        self, owner: str | None, now: float, limit: int, after: str | None
    ) -> list[BatchRecord]:
        self._count()
        return self.inner.list_batches(owner, now, limit, after)

    # -- the rest, passed on -------------------------------------------------------------

    def listen(self, on_change: Callable[[str | None], None], stop: threading.Event) -> None:
        self.inner.listen(on_change, stop)

    def create(self, batch: BatchRecord, items: Sequence[ItemSnapshot]) -> None:
        self.inner.create(batch, items)

    def apply(self, batch_id: str, transition: Transition) -> TransitionResult:
        return self.inner.apply(batch_id, transition)

    def renew(
        self, batch_id: str, item_id: str, at: float, lease_until: float, expires_at_open: float
    ) -> TransitionResult:
        return self.inner.renew(batch_id, item_id, at, lease_until, expires_at_open)

    def apply_many(
        self, batch_id: str, transition: Transition, item_ids: Sequence[str] | None = None
    ) -> BulkResult:
        return self.inner.apply_many(batch_id, transition, item_ids)

    def lost(self, now: float, limit: int) -> list[LostItem]:
        return self.inner.lost(now, limit)

    def open_batches(self, now: float) -> list[str]:
        return self.inner.open_batches(now)

    def delete(self, batch_id: str) -> bool:
        return self.inner.delete(batch_id)

    def purge_expired(self, now: float) -> int:
        return self.inner.purge_expired(now)

    def expired(self, now: float, limit: int) -> list[str]:
        return self.inner.expired(now, limit)

    def close(self) -> None:
        self.inner.close()
