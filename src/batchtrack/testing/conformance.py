"""The store conformance suite: run it against any :class:`~batchtrack.stores.base.Store`.

Two parts, both driven through a real :class:`~batchtrack.BatchTracker` or the store
boundary itself:

- :class:`TrackerMachine`, a Hypothesis state machine that creates batches, applies valid
  and invalid transitions, moves a fake clock, deletes and cleans up, and after every step
  checks the tracker against a simple model of the contract;
- :class:`StoreConformance`, plain pytest checks of the store boundary (atomic apply,
  expiry, header-only reads, purging, threads racing on one batch) plus the state machine.

Use it from your own tests by subclassing :class:`StoreConformance` and providing a
``store_factory`` fixture that returns a callable making a fresh, empty store on every
call (the state machine makes one per example; a shared one fails as flaky)::

    import itertools

    import pytest
    from batchtrack.testing.conformance import StoreConformance

    class TestMyStore(StoreConformance):
        @pytest.fixture
        def store_factory(self, tmp_path):
            numbers = itertools.count()
            return lambda: MyStore(tmp_path / f"my-{next(numbers)}.db")
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

try:
    import pytest
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st
    from hypothesis.stateful import (
        Bundle,
        RuleBasedStateMachine,
        invariant,
        rule,
        run_state_machine_as_test,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    from .._extras import missing

    raise ImportError(
        missing("batchtrack.testing.conformance", "Hypothesis and pytest", "test")
    ) from exc

import attrs

from .._models import Item, ItemSnapshot, Progress, Status
from .._tracker import IDLE_TIMEOUT, BatchTracker
from ..exceptions import (
    BatchNotFound,
    BatchPaused,
    InvalidTransition,
    ItemNotFound,
    StoreError,
    ValidationError,
)
from ..stores.base import BatchRecord, OutboxEntry, Outcome, Store, Transition
from ._clock import FakeClock
from .strategies import item_lists

__all__ = ["StoreConformance", "TrackerMachine"]

TTL = 3600.0
LEASE = 30.0
MAX_ATTEMPTS = 2
_RETRIED = (Status.FAILED, Status.CANCELLED)
_ITEM_STATUSES: list[Status] = [s for s in Status if s is not Status.PAUSED]
_RULES = {
    "start": (Status.PROCESSING, frozenset({Status.PENDING})),
    "complete": (Status.COMPLETED, frozenset({Status.PROCESSING})),
    "fail": (Status.FAILED, frozenset({Status.PENDING, Status.PROCESSING})),
}


@attrs.define
class _ModelBatch:
    """What the contract says a batch is, kept the simplest way: a list of items."""

    batch_id: str
    owner: str | None
    created_at: float
    items: list[ItemSnapshot]
    updated_at: float
    finished_at: float | None = None
    version: int = 0
    leases: dict[int, tuple[float, float]] = attrs.Factory(dict)  # index: (until, beat)
    touched_at: float = 0.0  # the last transition or heartbeat
    changed: dict[int, int] = attrs.Factory(dict)  # index: the version its change made
    paused: bool = False

    def expires_at(self) -> float:
        if self.finished_at is not None:
            return self.finished_at + TTL
        return max(self.updated_at, self.touched_at) + IDLE_TIMEOUT

    def moved(self, index: int, item: ItemSnapshot, now: float) -> None:
        """Record one applied transition of item ``index``."""
        self.items[index] = item
        self.leases.pop(index, None)
        if item.status is Status.PROCESSING:
            self.leases[index] = (now + LEASE, now)
        self.updated_at = self.touched_at = now
        self.version += 1
        self.changed[index] = self.version
        if all(i.status.is_final for i in self.items):
            self.finished_at = now
        else:
            self.finished_at = None

    def progress(self) -> Progress:
        count = {s: sum(1 for i in self.items if i.status is s) for s in Status}
        return Progress(
            len(self.items),
            count[Status.COMPLETED],
            count[Status.FAILED],
            count[Status.PROCESSING],
            count[Status.PENDING],
            count[Status.CANCELLED],
        )

    def status(self) -> Status:
        """The batch status a read shows: ``paused`` while paused and not finished."""
        status = self.progress().status
        return Status.PAUSED if self.paused and not status.is_final else status


class TrackerMachine(RuleBasedStateMachine):
    """Drives a BatchTracker on a store and checks it against a model after every step.

    Set :attr:`store_factory` on a subclass (or use :meth:`StoreConformance
    .test_state_machine`).
    """

    store_factory: ClassVar[Callable[[], Store]]

    batches = Bundle("batches")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.store = type(self).store_factory()
        self.tracker = BatchTracker(
            self.store, ttl=TTL, clock=self.clock, lease=LEASE, max_attempts=MAX_ATTEMPTS
        )
        self.model: dict[str, _ModelBatch] = {}

    def teardown(self) -> None:
        self.store.close()

    def _live(self, batch_id: str) -> _ModelBatch | None:
        batch = self.model.get(batch_id)
        if batch is None or batch.expires_at() <= self.clock():
            return None
        return batch

    @rule(
        target=batches,
        items=item_lists(max_size=6),
        owner=st.sampled_from([None, "alice", "bob"]),
    )
    def create(self, items: list[Any], owner: str | None) -> str:
        snap = self.tracker.create_batch(items, owner=owner)
        now = self.clock()
        self.model[snap.batch_id] = _ModelBatch(
            snap.batch_id, owner, now, list(snap.items), updated_at=now, touched_at=now
        )
        for item, spec in zip(snap.items, items, strict=True):
            if isinstance(spec, Item):
                assert (item.filename, item.source) == (spec.filename, spec.source)
                assert spec.id is None or item.id == spec.id
            elif isinstance(spec, tuple):
                assert (item.id, item.filename, item.source) == (*spec, None)
            else:
                assert (item.filename, item.source) == (spec, None)
            assert (item.status, item.error, item.attempts) == (Status.PENDING, None, 0)
        return snap.batch_id

    @rule(batch_id=batches, data=st.data(), error=st.sampled_from(["not an image", "boom"]))
    def transition(self, batch_id: str, data: st.DataObject, error: str) -> None:
        batch = self._live(batch_id)
        # Any item, or one past the end (missing); then, half the time, an action the
        # item's status allows, so that items really travel through their lifecycle.
        index = data.draw(st.integers(0, len(batch.items) if batch else 0), label="index")
        actions = sorted(_RULES)
        if batch and index < len(batch.items) and data.draw(st.booleans(), label="allowed"):
            status = batch.items[index].status
            actions = [a for a in actions if status in _RULES[a][1]] or actions
        action = data.draw(st.sampled_from(actions), label="action")
        self._check_transition(batch_id, action, index, error)

    @rule(batch_id=batches, data=st.data())
    def work(self, batch_id: str, data: st.DataObject) -> None:
        """Move one open item one step on, as a worker would."""
        batch = self._live(batch_id)
        open_items = (
            [i for i, it in enumerate(batch.items) if not it.status.is_final] if batch else []
        )
        if batch is None or not open_items:
            return
        index = data.draw(st.sampled_from(open_items), label="open item")
        if batch.items[index].status is Status.PENDING:
            action = "start"
        else:
            action = data.draw(st.sampled_from(["complete", "complete", "fail"]), label="action")
        self._check_transition(batch_id, action, index, "processing failed")

    def _check_transition(self, batch_id: str, action: str, index: int, error: str) -> None:
        target, sources = _RULES[action]
        batch = self._live(batch_id)
        if batch is None:
            with pytest.raises(BatchNotFound):
                self._call(action, batch_id, "any-item", error)
            return
        if index >= len(batch.items):
            with pytest.raises(ItemNotFound):
                self._call(action, batch_id, f"missing-{index}", error)
            return
        item = batch.items[index]
        if item.status is target:
            event = self._call(action, batch_id, item.id, error)
            assert not event.changed
        elif item.status not in sources:
            with pytest.raises(InvalidTransition):
                self._call(action, batch_id, item.id, error)
            return
        elif target is Status.PROCESSING and batch.paused:
            with pytest.raises(BatchPaused):
                self._call(action, batch_id, item.id, error)
            return
        else:
            event = self._call(action, batch_id, item.id, error)
            assert event.changed
            attempts = item.attempts + (target is Status.PROCESSING)
            batch.moved(
                index,
                attrs.evolve(
                    item,
                    status=target,
                    error=error if target is Status.FAILED else None,
                    attempts=attempts,
                ),
                self.clock(),
            )
        assert event.item == batch.items[index]
        assert event.progress == batch.progress()
        assert event.version == batch.version
        self._check_eta(batch, event.estimated_time_remaining)

    def _call(self, action: str, batch_id: str, item_id: str, error: str) -> Any:
        if action == "start":
            return self.tracker.start_item(batch_id, item_id)
        if action == "complete":
            return self.tracker.complete_item(batch_id, item_id)
        return self.tracker.fail_item(batch_id, item_id, error)

    @staticmethod
    def _check_eta(
        batch: _ModelBatch, eta: int | None, now: float | None = None, why: object = None
    ) -> None:
        """The ETA as the contract says; for a read (``now`` given) also why it is None:
        "paused" while paused, "starting" before anything finished,
        "waiting_for_lost_items" while every item left is processing with its lease run
        out (events know only the counts). Cancelled items are final: a batch of
        cancelled items has 0 left."""
        progress = batch.progress()
        all_lost = (
            now is not None
            and progress.processing > 0
            and progress.pending == 0
            and all(until <= now for until, _ in batch.leases.values())
        )
        if progress.pending + progress.processing == 0:
            assert eta == 0
            assert why is None
        elif now is not None and batch.paused:
            assert eta is None
            assert why == "paused"
        elif progress.completed + progress.failed == 0:
            assert eta is None
            assert now is None or why == "starting"
        elif all_lost:
            assert eta is None
            assert why == "waiting_for_lost_items"
        else:
            assert isinstance(eta, int)
            assert eta >= 0
            assert why is None

    @rule(batch_id=batches, data=st.data())
    def heartbeat(self, batch_id: str, data: st.DataObject) -> None:
        """Renew an item's lease: only a processing item has one to renew."""
        batch = self._live(batch_id)
        if batch is None:
            with pytest.raises(BatchNotFound):
                self.tracker.heartbeat(batch_id, "any-item")
            return
        index = data.draw(st.integers(0, len(batch.items) - 1), label="index")
        item = batch.items[index]
        if item.status is not Status.PROCESSING:
            with pytest.raises(InvalidTransition):
                self.tracker.heartbeat(batch_id, item.id)
            return
        event = self.tracker.heartbeat(batch_id, item.id)
        now = self.clock()
        batch.leases[index] = (now + LEASE, now)
        batch.touched_at = now
        assert not event.changed
        assert event.item == item
        assert event.version == batch.version
        assert event.progress == batch.progress()

    @rule()
    def reclaim(self) -> None:
        """Lost items go back to pending, or fail after MAX_ATTEMPTS starts; each once."""
        now = self.clock()
        expected = 0
        for batch_id, batch in self.model.items():
            if self._live(batch_id) is None:
                continue
            for index, (until, beat) in sorted(batch.leases.items()):
                if until > now:
                    continue
                item = batch.items[index]
                if item.attempts < MAX_ATTEMPTS:
                    moved = attrs.evolve(item, status=Status.PENDING, error=None)
                else:
                    error = f"worker lost: no heartbeat for {max(0, round(now - beat))} s"
                    moved = attrs.evolve(item, status=Status.FAILED, error=error)
                batch.moved(index, moved, now)
                expected += 1
        assert self.tracker.reclaim() == expected
        assert self.tracker.reclaim() == 0

    @rule(
        batch_id=batches,
        data=st.data(),
        owner=st.sampled_from([None, None, "alice", "bob"]),
    )
    def retry(self, batch_id: str, data: st.DataObject, owner: str | None) -> None:
        """Failed and cancelled items go back to pending with no error and no attempts."""
        batch = self._live(batch_id)
        if batch is None or (owner is not None and owner != batch.owner):
            with pytest.raises(BatchNotFound):
                self.tracker.retry(batch_id, owner=owner)
            return
        names = None
        if data.draw(st.booleans(), label="named"):
            indexes = data.draw(
                st.lists(st.integers(0, len(batch.items) - 1), min_size=1, max_size=3),
                label="indexes",
            )
            names = [batch.items[i].id for i in indexes]
            if any(batch.items[i].status not in _RETRIED for i in indexes):
                with pytest.raises(InvalidTransition):
                    self.tracker.retry(batch_id, names, owner=owner)
                return
            chosen = sorted(set(indexes))
        else:
            chosen = [i for i, it in enumerate(batch.items) if it.status in _RETRIED]
        assert self.tracker.retry(batch_id, names, owner=owner) == len(chosen)
        for index in chosen:
            item = batch.items[index]
            batch.moved(
                index,
                attrs.evolve(item, status=Status.PENDING, error=None, attempts=0),
                self.clock(),
            )

    @rule(batch_id=batches, owner=st.sampled_from([None, None, "alice", "bob"]))
    def cancel(self, batch_id: str, owner: str | None) -> None:
        """Every pending item is cancelled; the rest is untouched."""
        batch = self._live(batch_id)
        if batch is None or (owner is not None and owner != batch.owner):
            with pytest.raises(BatchNotFound):
                self.tracker.cancel(batch_id, owner=owner)
            return
        chosen = [i for i, it in enumerate(batch.items) if it.status is Status.PENDING]
        assert self.tracker.cancel(batch_id, owner=owner) == len(chosen)
        for index in chosen:
            item = batch.items[index]
            batch.moved(index, attrs.evolve(item, status=Status.CANCELLED), self.clock())

    @rule(
        batch_id=batches,
        paused=st.booleans(),
        owner=st.sampled_from([None, None, "alice", "bob"]),
    )
    def pause(self, batch_id: str, paused: bool, owner: str | None) -> None:
        """Pausing an open batch that is not paused, or unpausing a paused one, changes
        its flag and version (nothing else of the items); else nothing changes."""
        act = self.tracker.pause if paused else self.tracker.unpause
        batch = self._live(batch_id)
        if batch is None or (owner is not None and owner != batch.owner):
            with pytest.raises(BatchNotFound):
                act(batch_id, owner=owner)
            return
        changes = batch.paused is not paused and not (paused and batch.finished_at is not None)
        assert act(batch_id, owner=owner) is changes
        if changes:
            now = self.clock()
            batch.paused = paused
            batch.version += 1
            batch.updated_at = now
            if batch.finished_at is None:
                batch.touched_at = now

    # Small steps mostly, so that batches live long enough to be worked on.
    @rule(
        seconds=st.sampled_from(
            [0.25] * 4 + [1.0] * 4 + [3.0, LEASE / 2, LEASE, 59.5, TTL, IDLE_TIMEOUT]
        )
    )
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(batch_id=batches, owner=st.sampled_from([None, "alice", "bob"]))
    def get(self, batch_id: str, owner: str | None) -> None:
        batch = self._live(batch_id)
        if batch is None or (owner is not None and owner != batch.owner):
            with pytest.raises(BatchNotFound):
                self.tracker.get(batch_id, owner=owner)
            return
        snap = self.tracker.get(batch_id, owner=owner)
        assert snap.items == tuple(batch.items)
        assert snap.progress == batch.progress()
        assert snap.status is batch.status()
        assert snap.owner == batch.owner
        assert snap.version == batch.version
        assert snap.created_at.timestamp() == pytest.approx(batch.created_at)
        assert snap.updated_at.timestamp() == pytest.approx(batch.updated_at)
        if batch.finished_at is None:
            assert snap.finished_at is None
        else:
            assert snap.finished_at is not None
            assert snap.finished_at.timestamp() == pytest.approx(batch.finished_at)
        self._check_eta(batch, snap.estimated_time_remaining, self.clock(), snap.eta_unavailable)

    @rule(batch_id=batches, data=st.data())
    def read_some(self, batch_id: str, data: st.DataObject) -> None:
        """``get`` with item conditions returns exactly the model's matching items in
        order, the whole batch's header, and pages that chain to the end."""
        batch = self._live(batch_id)
        if batch is None:
            return
        status = data.draw(st.none() | st.sampled_from(_ITEM_STATUSES), label="status")
        since = data.draw(st.none() | st.integers(0, batch.version + 1), label="since")
        limit = data.draw(st.none() | st.integers(1, 4), label="limit")
        start = data.draw(st.none() | st.integers(0, len(batch.items) - 1), label="after")
        after = None if start is None else batch.items[start].id
        expected = [
            item
            for n, item in enumerate(batch.items)
            if (start is None or n > start)
            and (status is None or item.status is status)
            and (since is None or batch.changed.get(n, 0) > since)
        ]
        if status is None and since is None and limit is None and after is None:
            return
        pages: list[ItemSnapshot] = []
        while True:
            snap = self.tracker.get(batch_id, status=status, limit=limit, after=after, since=since)
            assert snap.progress == batch.progress()
            assert snap.version == batch.version
            assert snap.to_dict()["version"] == batch.version
            pages += snap.items
            if limit is None:
                assert snap.next_after is None
                assert "nextAfter" not in snap.to_dict()
                break
            assert len(snap.items) <= limit
            if snap.next_after is None:
                break
            assert len(snap.items) == limit
            assert snap.next_after == snap.items[-1].id
            after = snap.next_after
        assert pages == expected

    @rule(
        owner=st.sampled_from([None, "alice", "bob"]),
        status=st.none() | st.sampled_from(list(Status)),
        limit=st.integers(1, 4),
    )
    def list_pages(self, owner: str | None, status: Status | None, limit: int) -> None:
        """Every page of ``list_batches``, walked with ``next_after``, shows exactly the
        model's live batches of ``owner`` (all for None) in ``status``, newest first
        (ties by id, descending), with their counts."""
        now = self.clock()
        expected = sorted(
            (
                b
                for b in self.model.values()
                if b.expires_at() > now
                and (owner is None or b.owner == owner)
                and (status is None or b.status() is status)
            ),
            key=lambda b: (b.created_at, b.batch_id),
            reverse=True,
        )
        seen: list[Any] = []
        after = None
        while True:
            page = self.tracker.list_batches(owner=owner, status=status, limit=limit, after=after)
            assert len(page.batches) <= limit
            seen += page.batches
            if page.next_after is None:
                break
            assert len(page.batches) == limit
            assert page.next_after == page.batches[-1].batch_id
            after = page.next_after
        assert [s.batch_id for s in seen] == [b.batch_id for b in expected]
        for snap, batch in zip(seen, expected, strict=True):
            assert snap.items == ()
            assert snap.progress == batch.progress()
            assert snap.status is batch.status()

    @rule(batch_id=batches)
    def delete(self, batch_id: str) -> None:
        visible = self._live(batch_id) is not None
        assert self.tracker.delete(batch_id) is visible
        self.model.pop(batch_id, None)

    @rule()
    def cleanup(self) -> None:
        now = self.clock()
        expired = [bid for bid, b in self.model.items() if b.expires_at() <= now]
        assert self.tracker.cleanup() == len(expired)
        for batch_id in expired:
            del self.model[batch_id]

    @invariant()
    def counts_partition_the_total(self) -> None:
        for batch_id in self.model:
            if self._live(batch_id) is None:
                continue
            head = self.tracker.get(batch_id, items=False)
            p = head.progress
            assert p.total == p.completed + p.failed + p.processing + p.pending + p.cancelled
            assert p == self.model[batch_id].progress()


def _record(
    batch_id: str, items: int, *, now: float = 1000.0, owner: str | None = None
) -> BatchRecord:
    return BatchRecord(
        batch_id=batch_id,
        owner=owner,
        created_at=now,
        updated_at=now,
        finished_at=None,
        expires_at=now + IDLE_TIMEOUT,
        version=0,
        progress=Progress(total=items, pending=items),
    )


def _items(n: int) -> list[ItemSnapshot]:
    return [ItemSnapshot(f"item-{i}", f"{i}.jpg") for i in range(n)]


def _transition(
    item_id: str,
    action: str,
    at: float,
    *,
    error: str | None = None,
    stats: dict[Status, dict[str, tuple[float, int]]] | None = None,
) -> Transition:
    target, sources = _RULES[action]
    return Transition(item_id, target, sources, at, error, at + IDLE_TIMEOUT, at + TTL, stats or {})


class StoreConformance:
    """Pytest checks every store must pass. Subclass it and provide ``store_factory``.

    The fixture ``store_factory`` must return a zero-argument callable that makes a fresh,
    empty store; the suite closes every store it makes.
    """

    @pytest.fixture
    def store(self, store_factory: Callable[[], Store]) -> Any:
        store = store_factory()
        yield store
        store.close()

    def test_state_machine(self, store_factory: Callable[[], Store]) -> None:
        """Any sequence of tracker calls matches the model of the contract."""
        machine = type("Machine", (TrackerMachine,), {"store_factory": staticmethod(store_factory)})
        run_state_machine_as_test(
            machine,
            settings=settings(
                settings.default,
                stateful_step_count=50,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
            ),
        )

    def test_load_of_unknown_batch_is_none(self, store: Store) -> None:
        """load() returns None for an id that was never created."""
        assert store.load(str(uuid.uuid4())) is None

    def test_create_then_load_round_trips(self, store: Store) -> None:
        """Everything given to create() comes back from load(), items in order."""
        record = attrs.evolve(_record("b1", 3, owner="alice"), stats={"x": 1.5})
        store.create(record, _items(3))
        loaded = store.load("b1")
        assert loaded is not None
        assert attrs.evolve(loaded, items=(), stats=dict(loaded.stats)) == record
        assert list(loaded.items) == _items(3)

    def test_create_of_existing_id_raises_store_error(self, store: Store) -> None:
        """Creating a batch id twice raises StoreError and keeps the first batch."""
        store.create(_record("b1", 1), _items(1))
        with pytest.raises(StoreError):
            store.create(_record("b1", 2), _items(2))
        loaded = store.load("b1")
        assert loaded is not None
        assert loaded.progress.total == 1

    def test_header_only_load_has_counts_and_no_items(self, store: Store) -> None:
        """load(items=False) returns the header with an empty item tuple."""
        store.create(_record("b1", 4), _items(4))
        head = store.load("b1", items=False)
        assert head is not None
        assert head.items == ()
        assert head.progress.pending == 4

    def test_applied_transition_updates_everything_at_once(self, store: Store) -> None:
        """An applied transition moves one count, adds stats, bumps version and time."""
        store.create(_record("b1", 2), _items(2))
        stats = {Status.PENDING: {"a": (2.0, 0)}, Status.PROCESSING: {"a": (99.0, 0)}}
        result = store.apply("b1", _transition("item-0", "start", 1001.0, stats=stats))
        assert result.outcome is Outcome.APPLIED
        assert result.previous is Status.PENDING
        assert result.item == ItemSnapshot("item-0", "0.jpg", Status.PROCESSING)
        assert result.progress == Progress(total=2, processing=1, pending=1)
        assert result.version == 1
        assert result.expires_at == 1001.0 + IDLE_TIMEOUT
        assert dict(result.stats) == {"a": 2.0}
        # 1.5 s after it started: adds 3 * 1.5 ** 2 to "a" and 1.5 to "b".
        stats = {Status.PROCESSING: {"a": (3.0, 2), "b": (1.0, 1)}}
        store.apply("b1", _transition("item-0", "fail", 1002.5, error="boom", stats=stats))
        loaded = store.load("b1")
        assert loaded is not None
        assert loaded.items[0] == ItemSnapshot("item-0", "0.jpg", Status.FAILED, "boom")
        assert loaded.updated_at == 1002.5
        assert loaded.version == 2
        assert dict(loaded.stats) == {"a": 2.0 + 3.0 * 1.5**2, "b": 1.5}
        assert loaded.finished_at is None

    def test_unchanged_and_rejected_change_nothing(self, store: Store) -> None:
        """A repeat and a disallowed transition leave the batch exactly as it was."""
        store.create(_record("b1", 1), _items(1))
        store.apply("b1", _transition("item-0", "start", 1001.0))
        before = store.load("b1")
        bump = {s: {"a": (1.0, 0)} for s in _ITEM_STATUSES}
        again = store.apply("b1", _transition("item-0", "start", 1005.0, stats=bump))
        assert again.outcome is Outcome.UNCHANGED
        assert again.previous is Status.PROCESSING
        store.apply("b1", _transition("item-0", "complete", 1006.0))
        done = store.load("b1")
        rejected = store.apply("b1", _transition("item-0", "fail", 1007.0, error="x", stats=bump))
        assert rejected.outcome is Outcome.REJECTED
        assert rejected.previous is Status.COMPLETED
        assert store.load("b1") == done
        assert before is not None
        assert before.version == 1

    def test_finishing_sets_finished_at_and_finished_expiry(self, store: Store) -> None:
        """The transition that makes the last item final sets finished_at and expires_at."""
        store.create(_record("b1", 1), _items(1))
        store.apply("b1", _transition("item-0", "start", 1001.0))
        result = store.apply("b1", _transition("item-0", "complete", 1002.0))
        assert result.finished_at == 1002.0
        assert result.expires_at == 1002.0 + TTL

    def test_apply_on_missing_or_expired_batch_is_not_found(self, store: Store) -> None:
        """apply() raises BatchNotFound for unknown batches and once expires_at is reached."""
        with pytest.raises(BatchNotFound):
            store.apply("nope", _transition("item-0", "start", 1001.0))
        store.create(_record("b1", 1), _items(1))
        with pytest.raises(BatchNotFound):
            store.apply("b1", _transition("item-0", "start", 1000.0 + IDLE_TIMEOUT))
        with pytest.raises(ItemNotFound):
            store.apply("b1", _transition("nope", "start", 1001.0))

    def test_purge_removes_only_expired(self, store: Store) -> None:
        """purge_expired(now) removes batches with expires_at <= now and counts them."""
        store.create(_record("old", 1, now=0.0), _items(1))
        store.create(_record("new", 1, now=5000.0), _items(1))
        assert store.purge_expired(IDLE_TIMEOUT) == 1
        assert store.load("old") is None
        assert store.load("new") is not None
        assert store.purge_expired(IDLE_TIMEOUT) == 0

    def test_delete_reports_whether_there_was_a_batch(self, store: Store) -> None:
        """delete() is True once, then False, and the batch is gone."""
        store.create(_record("b1", 2), _items(2))
        assert store.delete("b1") is True
        assert store.delete("b1") is False
        assert store.load("b1") is None

    def test_threads_racing_on_one_batch_apply_each_transition_once(self, store: Store) -> None:
        """8 threads applying the same transitions concurrently: each applies exactly once."""
        n = 200
        store.create(_record("b1", n), _items(n))
        applied: list[int] = []
        one = {s: {"n": (1.0, 0)} for s in _ITEM_STATUSES}
        barrier = threading.Barrier(8)
        lock = threading.Lock()

        def worker() -> None:
            barrier.wait()
            mine = 0
            for i in range(n):
                for action in ("start", "complete"):
                    result = store.apply("b1", _transition(f"item-{i}", action, 1001.0, stats=one))
                    mine += result.outcome is Outcome.APPLIED
            with lock:
                applied.append(mine)

        _race(store, worker, 8, applied, n)

    def test_apply_all_reclaims_lost_items_as_apply_would(self, store: Store) -> None:
        """A reclaim (``lost_before``) in apply_all() moves back exactly the items whose
        lease ran out, as the same apply() calls would."""
        results = {}
        for batch_id in ("together", "one-by-one"):
            store.create(_record(batch_id, 3), _items(3))
            for n, lease in ((0, 1010.0), (1, 1100.0), (2, 1010.0)):
                start = _transition(f"item-{n}", "start", 1001.0)
                start.lease_until = lease
                store.apply(batch_id, start)
        at = 1020.0
        back = (Status.PENDING, frozenset({Status.PROCESSING}))
        transitions = [
            Transition("item-0", *back, at, None, at + IDLE_TIMEOUT, at + TTL, lost_before=at),
            Transition("item-1", *back, at, None, at + IDLE_TIMEOUT, at + TTL, lost_before=at),
            Transition(
                "item-2", *_RULES["fail"], at, "lost", at + IDLE_TIMEOUT, at + TTL, lost_before=at
            ),
        ]
        results["together"] = store.apply_all("together", transitions)
        results["one-by-one"] = [store.apply("one-by-one", t) for t in transitions]
        for together, alone in zip(results["together"], results["one-by-one"], strict=True):
            assert (together.outcome, together.previous) == (alone.outcome, alone.previous)
            assert together.item == alone.item
            assert (together.progress, together.version) == (alone.progress, alone.version)
            assert together.finished_at == alone.finished_at
        assert [r.outcome for r in results["together"]] == [
            Outcome.APPLIED,
            Outcome.REJECTED,  # its lease holds
            Outcome.APPLIED,
        ]

    def test_apply_all_judges_each_transition_as_apply_would(self, store: Store) -> None:
        """apply_all() answers and changes exactly what the same apply() calls in a row
        would: a rejected or repeated transition in the middle stops none of the others."""
        one = {s: {"n": (1.0, 0), "e": (2.0, 1)} for s in _ITEM_STATUSES}
        steps = [
            ("item-0", "complete", 1002.0),
            ("item-1", "start", 1002.0),
            ("item-2", "complete", 1002.0),  # pending: rejected
            ("item-1", "start", 1002.0),  # a repeat: unchanged
            ("item-2", "fail", 1002.0),
            ("item-1", "complete", 1002.5),
        ]
        results = {}
        for batch_id in ("together", "one-by-one"):
            store.create(_record(batch_id, 3), _items(3))
            store.apply(batch_id, _transition("item-0", "start", 1001.0, stats=one))
        transitions = [
            _transition(item, action, at, error="x" if action == "fail" else None, stats=one)
            for item, action, at in steps
        ]
        results["together"] = store.apply_all("together", transitions)
        results["one-by-one"] = [store.apply("one-by-one", t) for t in transitions]
        for together, alone in zip(results["together"], results["one-by-one"], strict=True):
            assert together.outcome is alone.outcome
            assert together.previous is alone.previous
            assert together.item == alone.item
            assert together.progress == alone.progress
            assert together.version == alone.version
            assert together.finished_at == alone.finished_at
            assert together.expires_at == alone.expires_at
            assert dict(together.stats) == dict(alone.stats)
        outcomes = [r.outcome for r in results["together"]]
        assert outcomes == [
            Outcome.APPLIED,
            Outcome.APPLIED,
            Outcome.REJECTED,
            Outcome.UNCHANGED,
            Outcome.APPLIED,
            Outcome.APPLIED,
        ]
        assert [r.version for r in results["together"]] == [2, 3, 3, 3, 4, 5]
        assert results["together"][-1].finished_at == 1002.5
        kept, alone_kept = store.load("together"), store.load("one-by-one")
        assert kept is not None
        assert alone_kept is not None
        assert attrs.evolve(kept, batch_id="", stats={}) == attrs.evolve(
            alone_kept, batch_id="", stats={}
        )
        assert dict(kept.stats) == dict(alone_kept.stats)
        assert store.apply_all("together", []) == []

    def test_apply_all_with_an_unknown_batch_or_item_changes_nothing(self, store: Store) -> None:
        """apply_all() raises BatchNotFound or ItemNotFound for the whole call, before any
        transition applies (a store that keeps the default, apply() per transition,
        applies the ones before an unknown item)."""
        with pytest.raises(BatchNotFound):
            store.apply_all("nope", [_transition("item-0", "start", 1001.0)])
        store.create(_record("b1", 2), _items(2))
        before = store.load("b1")
        with pytest.raises(ItemNotFound):
            store.apply_all(
                "b1",
                [_transition("item-0", "start", 1001.0), _transition("nope", "start", 1001.0)],
            )
        with pytest.raises(BatchNotFound):
            store.apply_all("b1", [_transition("item-1", "start", 1000.0 + IDLE_TIMEOUT)])
        if type(store).apply_all is not Store.apply_all:
            assert store.load("b1") == before

    def test_apply_all_refuses_starts_while_paused(self, store: Store) -> None:
        """In a paused batch apply_all() refuses a start (PAUSED) and still applies the
        completion sent with it."""
        store.create(_record("b1", 2), _items(2))
        start = attrs.evolve(
            _transition("item-0", "start", 1001.0),
            lease_until=1001.0 + LEASE,
            add_attempt=True,
            unless_paused=True,
        )
        store.apply("b1", start)
        try:
            store.set_paused("b1", True, 1001.5, 1001.5 + IDLE_TIMEOUT)
        except NotImplementedError:
            pytest.skip("the store cannot pause batches")
        results = store.apply_all(
            "b1",
            [
                _transition("item-0", "complete", 1002.0),
                attrs.evolve(start, item_id="item-1", at=1002.0),
            ],
        )
        assert [r.outcome for r in results] == [Outcome.APPLIED, Outcome.PAUSED]
        loaded = store.load("b1")
        assert loaded is not None
        assert loaded.progress == Progress(total=2, completed=1, pending=1)

    def test_threads_racing_with_apply_all_apply_each_transition_once(self, store: Store) -> None:
        """4 threads sending every item's start and completion in apply_all() calls of a
        few items each: each transition applies exactly once."""
        n = 60
        store.create(_record("b1", n), _items(n))
        one = {s: {"n": (1.0, 0)} for s in _ITEM_STATUSES}
        applied: list[int] = []
        barrier = threading.Barrier(4)
        lock = threading.Lock()

        def worker() -> None:
            barrier.wait()
            mine = 0
            for first in range(0, n, 3):
                transitions = [
                    _transition(f"item-{i}", action, 1001.0, stats=one)
                    for i in range(first, min(first + 3, n))
                    for action in ("start", "complete")
                ]
                results = store.apply_all("b1", transitions)
                mine += sum(r.outcome is Outcome.APPLIED for r in results)
            with lock:
                applied.append(mine)

        _race(store, worker, 4, applied, n)

    def test_tracker_hides_other_owners_batches(self, store: Store) -> None:
        """Through a tracker, another owner's batch is not found, like an unknown one."""
        tracker = BatchTracker(store, clock=FakeClock())
        snap = tracker.create_batch(["a.jpg"], owner="alice")
        assert tracker.get(snap.batch_id, owner="alice").owner == "alice"
        with pytest.raises(BatchNotFound):
            tracker.get(snap.batch_id, owner="bob")

    def test_tracker_repeats_count_once(self, store: Store) -> None:
        """Repeated transitions through a tracker change nothing the second time."""
        tracker = BatchTracker(store, clock=FakeClock())
        snap = tracker.create_batch([("a", "a.jpg")])
        assert tracker.start_item(snap.batch_id, "a").changed
        assert not tracker.start_item(snap.batch_id, "a").changed
        assert tracker.complete_item(snap.batch_id, "a").changed
        again = tracker.complete_item(snap.batch_id, "a")
        assert not again.changed
        assert again.progress == Progress(total=1, completed=1)
        assert tracker.get(snap.batch_id).version == 2

    def test_tracker_expiry_is_exact(self, store: Store) -> None:
        """A finished batch is visible until ttl after finishing and gone from then on."""
        clock = FakeClock()
        tracker = BatchTracker(store, ttl=TTL, clock=clock)
        snap = tracker.create_batch([("a", "a.jpg")])
        tracker.start_item(snap.batch_id, "a")
        tracker.complete_item(snap.batch_id, "a")
        clock.advance(TTL - 0.5)
        assert tracker.get(snap.batch_id).status is Status.COMPLETED
        clock.advance(0.5)
        with pytest.raises(BatchNotFound):
            tracker.get(snap.batch_id)
        assert tracker.cleanup() == 1
        assert store.load(snap.batch_id) is None

    # -- leases, reclaim, retry and cancel ------------------------------------------------

    def test_reclaim_returns_a_lost_item_to_pending_then_fails_it(self, store: Store) -> None:
        """A lost item goes back to pending until its starts reach max_attempts, then fails."""
        clock = FakeClock()
        tracker = BatchTracker(store, clock=clock, lease=10.0, max_attempts=2)
        snap = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")])
        batch_id = snap.batch_id
        tracker.start_item(batch_id, "a")
        clock.advance(9.5)
        assert tracker.reclaim() == 0
        clock.advance(0.5)
        assert tracker.reclaim() == 1
        item = tracker.get(batch_id).items[0]
        assert (item.status, item.attempts, item.error) == (Status.PENDING, 1, None)
        tracker.start_item(batch_id, "a")
        clock.advance(4.0)
        tracker.heartbeat(batch_id, "a")
        clock.advance(9.0)
        assert tracker.reclaim() == 0  # the heartbeat renewed the lease
        clock.advance(1.0)
        assert tracker.reclaim() == 1
        item = tracker.get(batch_id).items[0]
        assert item.status is Status.FAILED
        assert item.attempts == 2
        assert item.error == "worker lost: no heartbeat for 10 s"
        assert item.to_dict()["attempts"] == 2
        assert tracker.get(batch_id).progress == Progress(total=2, failed=1, pending=1)

    def test_lost_item_completed_before_reclaim_stays_completed(self, store: Store) -> None:
        """Completing a lost item before reclaim still applies; reclaim then moves nothing."""
        clock = FakeClock()
        tracker = BatchTracker(store, clock=clock, lease=5.0)
        batch_id = tracker.create_batch([("a", "a.jpg")]).batch_id
        tracker.start_item(batch_id, "a")
        clock.advance(60)
        assert tracker.get(batch_id).progress.processing == 1
        assert tracker.complete_item(batch_id, "a").changed
        assert tracker.reclaim() == 0
        assert tracker.get(batch_id).status is Status.COMPLETED

    def test_heartbeat_of_an_item_not_processing_is_invalid(self, store: Store) -> None:
        """heartbeat raises InvalidTransition for pending and final items, and not-found."""
        tracker = BatchTracker(store, clock=FakeClock())
        batch_id = tracker.create_batch([("a", "a.jpg")]).batch_id
        with pytest.raises(InvalidTransition):
            tracker.heartbeat(batch_id, "a")
        with pytest.raises(ItemNotFound):
            tracker.heartbeat(batch_id, "zzz")
        with pytest.raises(BatchNotFound):
            tracker.heartbeat(str(uuid.uuid4()), "a")
        tracker.start_item(batch_id, "a")
        event = tracker.heartbeat(batch_id, "a")
        assert not event.changed
        assert event.version == 1
        tracker.complete_item(batch_id, "a")
        with pytest.raises(InvalidTransition):
            tracker.heartbeat(batch_id, "a")

    def test_threads_reclaiming_at_once_move_each_lost_item_once(self, store: Store) -> None:
        """8 trackers sharing the store, reclaiming at once, move each lost item once."""
        clock = FakeClock()
        n = 60
        trackers = [BatchTracker(store, clock=clock, lease=5.0, max_attempts=3) for _ in range(8)]
        setup = trackers[0]
        batch_ids = [
            setup.create_batch([(f"i{k}", "x.jpg") for k in range(n)]).batch_id for _ in range(2)
        ]
        for batch_id in batch_ids:
            for k in range(n):
                setup.start_item(batch_id, f"i{k}")
        clock.advance(6)
        barrier = threading.Barrier(len(trackers))
        moved: list[int] = []
        lock = threading.Lock()

        def worker(tracker: BatchTracker) -> None:
            barrier.wait()
            count = tracker.reclaim()
            with lock:
                moved.append(count)

        threads = [threading.Thread(target=worker, args=(t,)) for t in trackers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(moved) == 2 * n
        for batch_id in batch_ids:
            snap = setup.get(batch_id)
            assert snap.progress == Progress(total=n, pending=n)
            assert snap.version == 2 * n
            assert all(i.attempts == 1 for i in snap.items)

    def test_lost_lists_only_items_whose_lease_ran_out(self, store: Store) -> None:
        """Store.lost lists expired leases of processing items, oldest first, up to limit."""
        clock = FakeClock()
        tracker = BatchTracker(store, clock=clock, lease=10.0)
        batch_id = tracker.create_batch([(f"i{k}", "x.jpg") for k in range(5)]).batch_id
        for k in range(4):
            tracker.start_item(batch_id, f"i{k}")
            clock.advance(1)
        tracker.complete_item(batch_id, "i0")
        tracker.heartbeat(batch_id, "i1")
        clock.advance(8)  # now +12: i2 (started at +2) ran out, i3 (+3) has 1 s left
        now = clock()
        lost = store.lost(now, 10)
        assert [(x.batch_id, x.item_id) for x in lost] == [(batch_id, "i2")]
        clock.advance(1)
        lost = store.lost(clock(), 1)
        assert [x.item_id for x in lost] == ["i2"]
        assert lost[0].attempts == 1
        assert lost[0].beat_at == pytest.approx(now - 10)

    def test_cancel_moves_pending_items_to_cancelled_and_leaves_the_rest(
        self, store: Store
    ) -> None:
        """cancel() moves only pending items to cancelled (no error) and returns how many."""
        tracker = BatchTracker(store, clock=FakeClock())
        batch_id = tracker.create_batch([("a", "a"), ("b", "b"), ("c", "c")]).batch_id
        tracker.start_item(batch_id, "a")
        assert tracker.cancel(batch_id) == 2
        snap = tracker.get(batch_id)
        assert [(i.status, i.error) for i in snap.items] == [
            (Status.PROCESSING, None),
            (Status.CANCELLED, None),
            (Status.CANCELLED, None),
        ]
        assert snap.progress == Progress(total=3, processing=1, cancelled=2)
        assert snap.version == 3
        with pytest.raises(InvalidTransition):
            tracker.start_item(batch_id, "b")
        tracker.complete_item(batch_id, "a")
        assert tracker.cancel(batch_id) == 0
        snap = tracker.get(batch_id)
        assert snap.status is Status.CANCELLED
        assert snap.progress == Progress(total=3, completed=1, cancelled=2)
        assert snap.estimated_time_remaining == 0
        assert tracker.get(batch_id, status=Status.CANCELLED).items == snap.items[1:]

    def test_retry_takes_cancelled_items_back(self, store: Store) -> None:
        """retry() without ids takes failed and cancelled items back to pending; named
        ids may name cancelled items."""
        tracker = BatchTracker(store, clock=FakeClock())
        batch_id = tracker.create_batch([("a", "a"), ("b", "b"), ("c", "c")]).batch_id
        tracker.fail_item(batch_id, "a", "boom")
        tracker.cancel(batch_id)
        assert tracker.get(batch_id).status is Status.CANCELLED
        assert tracker.retry(batch_id, ["b"]) == 1
        assert tracker.retry(batch_id) == 2
        snap = tracker.get(batch_id)
        assert snap.progress == Progress(total=3, pending=3)
        assert snap.finished_at is None

    def test_pause_keeps_pending_items_from_starting(self, store: Store) -> None:
        """A paused batch refuses starts with BatchPaused, lets running items finish,
        shows "paused", and starts items again once unpaused."""
        tracker = BatchTracker(store, clock=FakeClock())
        batch_id = tracker.create_batch([("a", "a"), ("b", "b"), ("c", "c")]).batch_id
        tracker.start_item(batch_id, "a")
        assert tracker.pause(batch_id) is True
        assert tracker.pause(batch_id) is False
        with pytest.raises(BatchPaused):
            tracker.start_item(batch_id, "b")
        assert tracker.start_item(batch_id, "a").changed is False  # a repeat stays a no-op
        tracker.complete_item(batch_id, "a")
        snap = tracker.get(batch_id)
        assert snap.status is Status.PAUSED
        assert snap.progress == Progress(total=3, completed=1, pending=2)
        assert (snap.estimated_time_remaining, snap.eta_unavailable) == (None, "paused")
        assert snap.to_dict()["etaUnavailable"] == "paused"
        assert snap.version == 3  # start, pause, complete
        assert tracker.unpause(batch_id) is True
        assert tracker.unpause(batch_id) is False
        assert tracker.start_item(batch_id, "b").changed
        snap = tracker.get(batch_id)
        assert snap.status is Status.PROCESSING
        assert snap.eta_unavailable is None
        assert snap.version == 5

    def test_pause_of_a_finished_batch_changes_nothing(self, store: Store) -> None:
        """pause() of a finished batch answers False; unpause() clears a pause the batch
        finished under (cancelled meanwhile), so that a retry is not paused."""
        tracker = BatchTracker(store, clock=FakeClock())
        batch_id = tracker.create_batch([("a", "a"), ("b", "b")]).batch_id
        assert tracker.pause(batch_id)
        assert tracker.cancel(batch_id) == 2
        snap = tracker.get(batch_id)
        assert snap.status is Status.CANCELLED
        assert tracker.pause(batch_id) is False
        assert tracker.unpause(batch_id) is True
        tracker.retry(batch_id)
        assert tracker.start_item(batch_id, "a").changed
        with pytest.raises(BatchNotFound):
            tracker.pause("no-such-batch")

    def test_retry_reopens_a_finished_batch(self, store: Store) -> None:
        """retry() moves failed items to pending, clears errors and attempts, reopens."""
        clock = FakeClock()
        tracker = BatchTracker(store, clock=clock)
        batch_id = tracker.create_batch([("a", "a"), ("b", "b"), ("c", "c")]).batch_id
        for item_id in "abc":
            tracker.start_item(batch_id, item_id)
        tracker.complete_item(batch_id, "a")
        tracker.fail_item(batch_id, "b", "boom")
        tracker.fail_item(batch_id, "c", "boom")
        assert tracker.get(batch_id).finished_at is not None
        clock.advance(10)
        assert tracker.retry(batch_id, ["b"]) == 1
        snap = tracker.get(batch_id)
        assert snap.finished_at is None
        assert snap.status is Status.PROCESSING
        assert snap.items[1] == ItemSnapshot("b", "b", Status.PENDING, None, 0)
        assert snap.items[2].error == "boom"
        with pytest.raises(InvalidTransition):
            tracker.retry(batch_id, ["b", "c"])  # b is pending now: nothing changes
        assert tracker.get(batch_id).items[2].status is Status.FAILED
        with pytest.raises(ItemNotFound):
            tracker.retry(batch_id, ["nope"])
        assert tracker.retry(batch_id) == 1
        assert tracker.retry(batch_id) == 0
        assert tracker.get(batch_id).progress == Progress(total=3, completed=1, pending=2)

    def test_sources_round_trip_and_open_batches_are_listed(self, store: Store) -> None:
        """Item sources come back from reads; open_batches lists unfinished batches."""
        tracker = BatchTracker(store, clock=FakeClock())
        one = tracker.create_batch([Item("a.jpg", source="/up/1"), Item("b.jpg")])
        two = tracker.create_batch([Item("c.jpg", source="s3://b/k", id="c")])
        assert [i.source for i in tracker.get(one.batch_id).items] == ["/up/1", None]
        assert tracker.get(two.batch_id).items[0].source == "s3://b/k"
        assert sorted(tracker.open_batches()) == sorted([one.batch_id, two.batch_id])
        tracker.start_item(two.batch_id, "c")
        tracker.complete_item(two.batch_id, "c")
        assert tracker.open_batches() == [one.batch_id]

    # -- removal hooks -------------------------------------------------------------------

    def test_expired_lists_only_expired_batches(self, store: Store) -> None:
        """expired(now, limit) names batches whose expiry has come, at most limit of them."""
        store.create(_record("old1", 1, now=0.0), _items(1))
        store.create(_record("old2", 1, now=1.0), _items(1))
        store.create(_record("new", 1, now=5000.0), _items(1))
        assert sorted(store.expired(IDLE_TIMEOUT + 1.0, 10)) == ["old1", "old2"]
        assert len(store.expired(IDLE_TIMEOUT + 1.0, 1)) == 1
        assert store.expired(IDLE_TIMEOUT - 1.0, 10) == []

    def test_removal_hooks_see_every_removed_batch_with_its_items(self, store: Store) -> None:
        """delete() and cleanup() call each hook once per removed batch, with its item ids;
        a hook that raises does not stop the others."""
        clock = FakeClock()
        tracker = BatchTracker(store, ttl=TTL, clock=clock)
        calls: list[tuple[str, tuple[str, ...]]] = []

        def broken(batch_id: str, item_ids: tuple[str, ...]) -> None:
            raise OSError("disk gone")

        tracker.add_removal_hook(broken)
        tracker.add_removal_hook(lambda b, i: calls.append((b, i)))
        gone = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")]).batch_id
        done = tracker.create_batch([("c", "c.jpg")]).batch_id
        kept = tracker.create_batch([("d", "d.jpg")]).batch_id
        assert tracker.delete(gone)
        tracker.start_item(done, "c")
        tracker.complete_item(done, "c")
        clock.advance(TTL)
        tracker.start_item(kept, "d")  # still open: it stays
        assert tracker.cleanup() == 1
        assert calls == [(gone, ("a", "b")), (done, ("c",))]
        assert tracker.get(kept).progress.processing == 1

    def test_a_batch_of_100000_items_reads_by_pages_and_changes(self, store: Store) -> None:
        """A 100,000-item batch is created in one call, paged to its end, and a since-read
        returns exactly what changed, in creation order."""
        tracker = BatchTracker(store, ttl=TTL, clock=FakeClock())
        n = 100_000
        snap = tracker.create_batch([(f"{k:06d}", f"{k}.jpg") for k in range(n)])
        assert snap.progress.total == n
        changed = [f"{k:06d}" for k in (99_999, 17, 50_000)]
        for item_id in changed:
            tracker.start_item(snap.batch_id, item_id)
            tracker.fail_item(snap.batch_id, item_id, "boom")
        head = tracker.get(snap.batch_id, items=False)
        assert (head.progress.failed, head.progress.pending, head.version) == (3, n - 3, 6)
        since = tracker.get(snap.batch_id, since=2)
        assert [i.id for i in since.items] == ["000017", "050000"]
        page = tracker.get(snap.batch_id, limit=1000, after="049999")
        assert [i.id for i in page.items] == [f"{k:06d}" for k in range(50_000, 51_000)]
        assert page.items[0].status is Status.FAILED
        assert page.next_after == "050999"
        last = tracker.get(snap.batch_id, limit=1000, after="098999")
        assert (len(last.items), last.next_after) == (1000, None)
        failed = tracker.get(snap.batch_id, status=Status.FAILED, limit=2)
        assert ([i.id for i in failed.items], failed.next_after) == (["000017", "050000"], "050000")
        pending = tracker.get(snap.batch_id, status="pending", limit=3, after="000016")
        assert [i.id for i in pending.items] == ["000018", "000019", "000020"]
        assert len(tracker.get(snap.batch_id).items) == n

    # -- idempotency keys ----------------------------------------------------------------

    def test_key_returns_the_batch_it_named(self, store: Store) -> None:
        """The same key and items return the first batch, and nothing new is created."""
        tracker = BatchTracker(store, clock=FakeClock())
        first = tracker.create_batch([Item("a.jpg", source="/up/a"), "b.jpg"], key="k-1")
        tracker.start_item(first.batch_id, first.items[0].id)
        again = tracker.create_batch([Item("a.jpg", source="/up/a"), "b.jpg"], key="k-1")
        assert again.batch_id == first.batch_id
        assert [i.id for i in again.items] == [i.id for i in first.items]
        assert again.progress.processing == 1
        assert store.expired(float("inf"), 10) == [first.batch_id]

    def test_key_with_other_items_is_refused(self, store: Store) -> None:
        """The same key with other filenames, sources or order raises ValidationError
        naming the key."""
        tracker = BatchTracker(store, clock=FakeClock())
        tracker.create_batch([Item("a.jpg", source="/up/a"), "b.jpg"], key="k-1")
        others: list[list[str | Item]] = [
            ["a.jpg", "b.jpg"],
            [Item("a.jpg", source="/up/a")],
            ["b.jpg", Item("a.jpg", source="/up/a")],
        ]
        for other in others:
            with pytest.raises(ValidationError, match=r"'k-1'.*other items"):
                tracker.create_batch(other, key="k-1")
        assert len(store.expired(float("inf"), 10)) == 1

    def test_key_belongs_to_its_owner(self, store: Store) -> None:
        """One key under two owners (or none) names three batches."""
        tracker = BatchTracker(store, clock=FakeClock())
        ids = {tracker.create_batch(["a.jpg"], owner=o, key="k").batch_id for o in ("x", "y")}
        ids.add(tracker.create_batch(["a.jpg"], key="k").batch_id)
        assert len(ids) == 3
        assert tracker.create_batch(["a.jpg"], owner="x", key="k").batch_id in ids

    def test_key_of_a_deleted_or_expired_batch_makes_a_new_one(self, store: Store) -> None:
        """After its batch was deleted or expired, the key creates a new batch (with any
        items)."""
        clock = FakeClock()
        tracker = BatchTracker(store, ttl=TTL, clock=clock)
        first = tracker.create_batch(["a.jpg"], key="k")
        assert tracker.delete(first.batch_id)
        second = tracker.create_batch(["b.jpg"], key="k")
        assert second.batch_id != first.batch_id
        tracker.start_item(second.batch_id, second.items[0].id)
        tracker.complete_item(second.batch_id, second.items[0].id)
        clock.advance(TTL)
        third = tracker.create_batch(["b.jpg"], key="k")
        assert third.batch_id not in (first.batch_id, second.batch_id)

    def test_key_lasts_a_day(self, store: Store) -> None:
        """A key names its batch for 24 hours only, even while the batch lives on."""
        clock = FakeClock()
        tracker = BatchTracker(store, ttl=TTL, clock=clock)
        first = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")], key="k")
        clock.advance(IDLE_TIMEOUT - 10)
        tracker.start_item(first.batch_id, "a")  # keeps the batch open
        assert tracker.create_batch(["a.jpg", "b.jpg"], key="k").batch_id == first.batch_id
        clock.advance(10)
        second = tracker.create_batch(["c.jpg"], key="k")
        assert second.batch_id != first.batch_id
        assert tracker.get(first.batch_id).progress.processing == 1

    def test_threads_racing_with_one_key_make_one_batch(self, store: Store) -> None:
        """Eight threads creating with one key all get the same batch; one is stored."""
        tracker = BatchTracker(store, clock=FakeClock())
        barrier = threading.Barrier(8)
        found: list[str] = []

        def create() -> None:
            barrier.wait()
            found.append(tracker.create_batch(["a.jpg", "b.jpg"], key="race").batch_id)

        threads = [threading.Thread(target=create) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(found) == 8
        assert len(set(found)) == 1
        assert store.expired(float("inf"), 100) == found[:1]

    def test_malformed_keys_are_refused(self, store: Store) -> None:
        """An empty, too long, non-ASCII or non-string key raises ValidationError and
        creates nothing."""
        tracker = BatchTracker(store, clock=FakeClock())
        for bad in ("", "x" * 256, "caf\u00e9", "a\nb", "tab\there", 42):
            with pytest.raises(ValidationError, match="idempotency key"):
                tracker.create_batch(["a.jpg"], key=bad)  # type: ignore[arg-type]
        assert tracker.create_batch(["a.jpg"], key="~ !" + "x" * 252).progress.total == 1
        assert len(store.expired(float("inf"), 10)) == 1

    # -- progress inside an item ---------------------------------------------------------

    def test_report_shows_while_processing_and_vanishes_when_the_item_ends(
        self, store: Store
    ) -> None:
        """A report sets progress and stage of a processing item, counts one version a
        since-read sees, and is gone once the item completes."""
        tracker = BatchTracker(store, clock=FakeClock())
        batch_id = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")]).batch_id
        tracker.start_item(batch_id, "a")
        item = tracker.report(batch_id, "a", 0.42, stage="resizing")
        assert (item.progress, item.stage) == (0.42, "resizing")
        snap = tracker.get(batch_id)
        assert snap.version == 2
        assert (snap.items[0].progress, snap.items[0].stage) == (0.42, "resizing")
        assert snap.items[0].to_dict()["progress"] == 0.42
        assert [i.id for i in tracker.get(batch_id, since=1).items] == ["a"]
        tracker.report(batch_id, "a", 1 / 3)
        again = tracker.get(batch_id).items[0]
        assert (again.progress, again.stage) == (1 / 3, None)
        tracker.complete_item(batch_id, "a")
        done = tracker.get(batch_id).items[0]
        assert (done.progress, done.stage) == (None, None)
        assert "progress" not in done.to_dict()

    def test_report_vanishes_when_the_item_is_retried(self, store: Store) -> None:
        """An item that failed after reporting and was retried starts again without
        progress."""
        tracker = BatchTracker(store, clock=FakeClock())
        batch_id = tracker.create_batch([("a", "a.jpg")]).batch_id
        tracker.start_item(batch_id, "a")
        tracker.report(batch_id, "a", 0.9, stage="saving")
        tracker.fail_item(batch_id, "a", "boom")
        tracker.retry(batch_id)
        tracker.start_item(batch_id, "a")
        item = tracker.get(batch_id).items[0]
        assert (item.status, item.progress, item.stage) == (Status.PROCESSING, None, None)

    def test_report_on_an_item_not_processing_is_an_invalid_transition(self, store: Store) -> None:
        """Reporting on a pending or finished item raises InvalidTransition and changes
        nothing."""
        tracker = BatchTracker(store, clock=FakeClock())
        batch_id = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")]).batch_id
        with pytest.raises(InvalidTransition):
            tracker.report(batch_id, "a", 0.5)
        tracker.start_item(batch_id, "b")
        tracker.complete_item(batch_id, "b")
        with pytest.raises(InvalidTransition):
            tracker.report(batch_id, "b", 0.5)
        with pytest.raises(ItemNotFound):
            tracker.report(batch_id, "zz", 0.5)
        assert tracker.get(batch_id).version == 2

    def test_bad_reports_are_refused(self, store: Store) -> None:
        """A fraction outside [0, 1] (or not a number) or a stage over 100 characters
        raises ValidationError."""
        tracker = BatchTracker(store, clock=FakeClock())
        batch_id = tracker.create_batch([("a", "a.jpg")]).batch_id
        tracker.start_item(batch_id, "a")
        for fraction in (-0.01, 1.01, float("nan"), True, "0.5", None):
            with pytest.raises(ValidationError, match="fraction"):
                tracker.report(batch_id, "a", fraction)  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="stage"):
            tracker.report(batch_id, "a", 0.5, stage="x" * 101)
        assert tracker.report(batch_id, "a", 1, stage="x" * 100).progress == 1.0
        assert tracker.report(batch_id, "a", 0).progress == 0.0

    # -- the webhook outbox --------------------------------------------------------------

    @staticmethod
    def _outbox(store: Store) -> None:
        """Skip a store written before batchtrack had an outbox."""
        try:
            store.outbox_unsubscribed()
        except NotImplementedError:
            pytest.skip(f"{type(store).__name__} has no outbox")

    def test_apply_all_that_ends_a_batch_leaves_one_marker(self, store: Store) -> None:
        """A batch ended inside apply_all() gets its end marker, with the version of the
        transition that ended it, as apply() would leave it."""
        self._outbox(store)
        store.create(_record("b1", 2), _items(2))
        store.apply("b1", _transition("item-0", "start", 1001.0))
        results = store.apply_all(
            "b1",
            [
                _transition("item-0", "complete", 1002.0),
                _transition("item-1", "fail", 1002.0, error="x"),
                _transition("item-1", "fail", 1002.0, error="x"),  # a repeat: no marker
            ],
        )
        assert [r.version for r in results] == [2, 3, 3]
        [marker] = store.outbox_claim(1002.0, 10, 1060.0)
        assert (marker.batch_id, marker.version, marker.ended_at) == ("b1", 3, 1002.0)

    def test_a_batch_end_leaves_one_marker_in_the_outbox(self, store: Store) -> None:
        """Completing, cancelling or failing a batch's last open item adds one end marker
        (its version and end time); a batch retried and ended again adds another."""
        self._outbox(store)
        clock = FakeClock()
        tracker = BatchTracker(store, clock=clock)
        batch_id = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")]).batch_id
        tracker.start_item(batch_id, "a")
        tracker.complete_item(batch_id, "a")
        assert store.outbox_claim(clock() + 1, 10, clock() + 60) == []
        clock.advance(1)
        tracker.fail_item(batch_id, "b", "boom")
        [marker] = store.outbox_claim(clock(), 10, clock() + 60)
        assert (marker.batch_id, marker.version, marker.ended_at) == (batch_id, 3, clock())
        assert (marker.url, marker.body, marker.attempts) == (None, None, 0)
        store.outbox_done(marker.entry_id)
        tracker.retry(batch_id)
        clock.advance(1)
        cancelled = tracker.create_batch([("c", "c.jpg")]).batch_id
        tracker.cancel(cancelled)
        tracker.start_item(batch_id, "b")
        tracker.complete_item(batch_id, "b")
        ended = store.outbox_claim(clock(), 10, clock() + 60)
        assert sorted((m.batch_id, m.version) for m in ended) == sorted(
            [(batch_id, 6), (cancelled, 1)]
        )
        assert len({m.entry_id for m in ended}) == 2

    def test_an_outbox_lease_holds_an_entry_until_it_runs_out(self, store: Store) -> None:
        """A claimed entry is not claimed again while its lease lasts, and is once it runs
        out (at least once); a retried one waits for its next time."""
        self._outbox(store)
        clock = FakeClock()
        tracker = BatchTracker(store, clock=clock)
        batch_id = tracker.create_batch([("a", "a.jpg")]).batch_id
        tracker.cancel(batch_id)
        now = clock()
        [marker] = store.outbox_claim(now, 10, now + 30)
        assert store.outbox_claim(now + 29, 10, now + 90) == []
        [again] = store.outbox_claim(now + 30, 10, now + 90)
        assert again.entry_id == marker.entry_id
        store.outbox_retry(marker.entry_id, 1, now + 200)
        assert store.outbox_claim(now + 199, 10, now + 300) == []
        [third] = store.outbox_claim(now + 200, 10, now + 300)
        assert third.attempts == 1

    def test_threads_claiming_the_outbox_never_share_an_entry(self, store: Store) -> None:
        """Eight threads claiming at once get each due entry exactly once between them."""
        self._outbox(store)
        clock = FakeClock()
        tracker = BatchTracker(store, clock=clock)
        ids = [tracker.create_batch([("a", "a.jpg")]).batch_id for _ in range(12)]
        for batch_id in ids:
            tracker.cancel(batch_id)
        barrier = threading.Barrier(8)
        claimed: list[str] = []

        def claim() -> None:
            barrier.wait()
            for _ in range(4):
                claimed.extend(e.batch_id for e in store.outbox_claim(clock(), 2, clock() + 60))

        threads = [threading.Thread(target=claim) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(claimed) == sorted(ids)

    def test_outbox_deliveries_settle_and_a_gone_url_is_remembered(self, store: Store) -> None:
        """A marker expands into deliveries (one kept if it exists), which retry, settle,
        and go when their URL unsubscribes; the URL stays listed."""
        self._outbox(store)
        clock = FakeClock()
        tracker = BatchTracker(store, clock=clock)
        batch_id = tracker.create_batch([("a", "a.jpg")]).batch_id
        tracker.cancel(batch_id)
        now = clock()
        [marker] = store.outbox_claim(now, 10, now + 60)
        deliveries = [
            OutboxEntry(f"msg-{n}", batch_id, 1, now, f"http://h/{n}", f'{{"n": {n}}}')
            for n in range(3)
        ]
        store.outbox_expand(marker.entry_id, deliveries, now)
        store.outbox_expand(marker.entry_id, [attrs.evolve(deliveries[0], body="x")], now)
        found = {e.entry_id: e for e in store.outbox_claim(now, 10, now + 60)}
        assert found == {e.entry_id: e for e in deliveries}
        store.outbox_done("msg-0")
        store.outbox_retry("msg-1", 1, now + 5)
        store.outbox_retry("msg-2", 1, now + 5)
        store.outbox_unsubscribe("http://h/2")
        store.outbox_unsubscribe("http://h/2")
        [left] = store.outbox_claim(now + 5, 10, now + 60)
        assert (left.entry_id, left.attempts, left.body) == ("msg-1", 1, '{"n": 1}')
        assert store.outbox_unsubscribed() == frozenset({"http://h/2"})

    def test_end_markers_go_with_their_batch_and_deliveries_stay(self, store: Store) -> None:
        """Deleting or purging a batch removes its end marker, not its deliveries."""
        self._outbox(store)
        clock = FakeClock()
        tracker = BatchTracker(store, ttl=TTL, clock=clock)
        ids = [tracker.create_batch([("a", "a.jpg")]).batch_id for _ in range(3)]
        for batch_id in ids:
            tracker.cancel(batch_id)
        now = clock()
        [delivered] = [m for m in store.outbox_claim(now, 10, now) if m.batch_id == ids[2]]
        store.outbox_expand(
            delivered.entry_id,
            [OutboxEntry("msg-kept", ids[2], 1, now, "http://h/", "{}")],
            now,
        )
        assert tracker.delete(ids[0])
        clock.advance(TTL + 1)
        assert store.purge_expired(clock()) == 2
        [kept] = store.outbox_claim(clock(), 10, clock() + 60)
        assert kept.entry_id == "msg-kept"

    # -- metadata and lists ------------------------------------------------------------

    def test_metadata_comes_back_with_every_read_and_outlives_transitions(
        self, store: Store
    ) -> None:
        """Metadata given at creation comes back from get (whole, header, page) and from
        list_batches after transitions; a batch without any has an empty mapping."""
        tracker = BatchTracker(store, clock=FakeClock())
        meta = {"order": "A-17", "ünï": "ç" * 512, "k" * 64: ""}
        batch_id = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")], metadata=meta).batch_id
        tracker.start_item(batch_id, "a")
        tracker.complete_item(batch_id, "a")
        assert tracker.get(batch_id).metadata == meta
        assert tracker.get(batch_id, items=False).metadata == meta
        assert tracker.get(batch_id, limit=1).metadata == meta
        assert tracker.get(batch_id).to_dict()["metadata"] == meta
        assert tracker.list_batches().batches[0].metadata == meta
        plain = tracker.create_batch(["c.jpg"])
        assert tracker.get(plain.batch_id).metadata == {}
        assert "metadata" not in tracker.get(plain.batch_id).to_dict()

    def test_list_is_newest_first_and_pages_meet_while_batches_are_created(
        self, store: Store
    ) -> None:
        """Pages of list_batches are newest first (ties by id, descending) and, walked
        with next_after while new batches are created between pages, show every batch
        that existed at the first page exactly once."""
        clock = FakeClock()
        tracker = BatchTracker(store, clock=clock)
        made = []
        for n in range(7):
            made.append(tracker.create_batch([f"{n}.jpg"], owner="u").batch_id)
            if n % 3 != 1:  # some batches share their creation moment
                clock.advance(1)
        first = tracker.list_batches(owner="u", limit=3)
        seen = [s.batch_id for s in first.batches]
        after = first.next_after
        while after is not None:
            clock.advance(1)
            tracker.create_batch(["new.jpg"], owner="u")  # newer: never on a later page
            page = tracker.list_batches(owner="u", limit=3, after=after)
            assert len(page.batches) <= 3
            seen += [s.batch_id for s in page.batches]
            after = page.next_after
        assert len(seen) == len(set(seen)) == 7
        snaps = {s.batch_id: s for s in tracker.list_batches(owner="u", limit=1000).batches}
        assert set(seen) == set(made)
        order = sorted(made, key=lambda b: (snaps[b].created_at, b), reverse=True)
        assert seen == order
        assert all(snaps[b].items == () for b in seen)
        exact = tracker.list_batches(owner="u", limit=len(snaps))
        assert exact.next_after is None
        assert len(exact.batches) == len(snaps)

    def test_list_shows_each_owner_only_their_batches(self, store: Store) -> None:
        """An owner's list holds their batches only; owner=None lists every batch; an
        after of another owner's batch is refused."""
        clock = FakeClock()
        tracker = BatchTracker(store, clock=clock)
        mine = [tracker.create_batch(["a.jpg"], owner="me").batch_id for _ in range(2)]
        clock.advance(1)
        theirs = tracker.create_batch(["a.jpg"], owner="them").batch_id
        nobody = tracker.create_batch(["a.jpg"]).batch_id
        assert {s.batch_id for s in tracker.list_batches(owner="me").batches} == set(mine)
        assert [s.batch_id for s in tracker.list_batches(owner="them").batches] == [theirs]
        assert tracker.list_batches(owner="nobody-at-all").batches == ()
        everyone = {s.batch_id for s in tracker.list_batches().batches}
        assert everyone == {*mine, theirs, nobody}
        with pytest.raises(ValidationError, match="after"):
            tracker.list_batches(owner="me", after=theirs)

    def test_list_filters_by_batch_status(self, store: Store) -> None:
        """status= keeps only batches in that status (paused included), paging through
        the rest; a status that is none raises ValidationError."""
        clock = FakeClock()
        tracker = BatchTracker(store, clock=clock)
        done = []
        for n in range(5):
            b = tracker.create_batch([("a", "a.jpg")], owner="u").batch_id
            clock.advance(1)
            if n % 2 == 0:
                tracker.start_item(b, "a")
                tracker.complete_item(b, "a")
                done.append(b)
        paused = tracker.create_batch(["p.jpg"], owner="u").batch_id
        tracker.pause(paused)
        page = tracker.list_batches(owner="u", status="completed", limit=2)
        rest = tracker.list_batches(owner="u", status=Status.COMPLETED, after=page.next_after)
        found = [s.batch_id for s in (*page.batches, *rest.batches)]
        assert found == done[::-1]
        assert rest.next_after is None
        assert [s.batch_id for s in tracker.list_batches(status="paused").batches] == [paused]
        assert len(tracker.list_batches(owner="u", status="pending").batches) == 2
        assert tracker.list_batches(owner="u", status="failed").batches == ()
        with pytest.raises(ValidationError, match="status must be one of"):
            tracker.list_batches(status="done")
        for limit in (0, 1001, True, 2.5, "10"):
            with pytest.raises(ValidationError, match="limit"):
                tracker.list_batches(limit=limit)  # type: ignore[arg-type]

    def test_list_leaves_out_expired_batches_and_refuses_a_cursor_that_is_gone(
        self, store: Store
    ) -> None:
        """Expired batches never appear (swept or not); an after naming a batch that
        was deleted, purged or never existed raises ValidationError."""
        clock = FakeClock()
        tracker = BatchTracker(store, ttl=60.0, clock=clock)
        old = tracker.create_batch([("a", "a.jpg")], owner="u").batch_id
        tracker.start_item(old, "a")
        tracker.complete_item(old, "a")
        clock.advance(1)
        live = tracker.create_batch(["b.jpg"], owner="u").batch_id
        gone = tracker.create_batch(["c.jpg"], owner="u").batch_id
        assert tracker.delete(gone)
        clock.advance(61)
        assert [s.batch_id for s in tracker.list_batches(owner="u").batches] == [live]
        assert [s.batch_id for s in tracker.list_batches().batches] == [live]
        assert tracker.cleanup() == 1
        assert [s.batch_id for s in tracker.list_batches(owner="u").batches] == [live]
        for cursor in (old, gone, str(uuid.uuid4())):
            with pytest.raises(ValidationError, match="first page"):
                tracker.list_batches(owner="u", after=cursor)
            with pytest.raises(ValidationError, match="first page"):
                tracker.list_batches(after=cursor)


def _race(
    store: Store, worker: Callable[[], None], threads: int, applied: list[int], n: int
) -> None:
    """Run ``worker`` on ``threads`` threads at once; then each of the ``n`` items of batch
    ``b1`` was started and completed exactly once between them."""
    running = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    loaded = store.load("b1")
    assert loaded is not None
    assert sum(applied) == 2 * n
    assert loaded.version == 2 * n
    assert loaded.progress == Progress(total=n, completed=n)
    assert dict(loaded.stats) == {"n": 2.0 * n}
    assert all(item.status is Status.COMPLETED for item in loaded.items)
