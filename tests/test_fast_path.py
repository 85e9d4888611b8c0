"""The stores' fast paths (memory, SQLite, Redis) give exactly what the generic store path
gives: every event (ETA and range included), every snapshot, every stored statistic."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchtrack import BatchTracker, MemoryStore, SQLiteStore, Status, _eta
from batchtrack.exceptions import BatchtrackError
from batchtrack.stores.base import Store, Transition, TransitionResult, add_stats
from batchtrack.testing import FakeClock


class GenericMemoryStore(MemoryStore):
    """The same store with apply() overridden: the tracker takes the generic path."""

    def apply(self, batch_id: str, transition: Transition) -> TransitionResult:
        return super().apply(batch_id, transition)


_steps = st.lists(
    st.tuples(
        st.sampled_from(
            ["start", "complete", "fail", "heartbeat", "retry", "cancel", "reclaim", "wait"]
        ),
        st.integers(0, 5),
        st.sampled_from([0.0, 0.25, 1.0, 3.5, 40.0]),
    ),
    max_size=60,
)


def _do(tracker: BatchTracker, batch_id: str, step: tuple[str, int, float]) -> Any:
    action, index, seconds = step
    item = str(index)
    tracker.clock.advance(seconds)  # type: ignore[attr-defined]
    try:
        if action == "start":
            return tracker.start_item(batch_id, item, lease=30.0 if index % 2 else None)
        if action == "complete":
            return tracker.complete_item(batch_id, item)
        if action == "fail":
            return tracker.fail_item(batch_id, item, f"boom {index}")
        if action == "heartbeat":
            return tracker.heartbeat(batch_id, item)
        if action == "retry":
            return tracker.retry(batch_id)
        if action == "cancel":
            return tracker.cancel(batch_id)
        if action == "reclaim":
            return tracker.reclaim_items()
        return None
    except BatchtrackError as exc:
        return (type(exc), str(exc).replace(batch_id, "B"))


def _comparable(value: Any, batch_id: str) -> Any:
    """Events with their ETA worked out and the batch id taken out."""
    if hasattr(value, "estimated_time_remaining") and hasattr(value, "item"):
        return (
            value.item,
            value.progress,
            value.estimated_time_remaining,
            value.eta_range,
            value.changed,
            value.version,
        )
    if isinstance(value, list):
        return [tuple(x for x in entry if x != batch_id) for entry in value]
    return value


@given(steps=_steps, read_late=st.booleans())
@settings(max_examples=150, deadline=None)
def test_fast_and_generic_paths_agree(steps: list[tuple[str, int, float]], read_late: bool) -> None:
    fast = BatchTracker(MemoryStore(), clock=FakeClock(1000.0), lease=20.0, max_attempts=2)
    slow = BatchTracker(GenericMemoryStore(), clock=FakeClock(1000.0), lease=20.0, max_attempts=2)
    items = [(str(n), f"{n}.jpg") for n in range(6)]
    a, b = fast.create_batch(items).batch_id, slow.create_batch(items).batch_id
    seen: list[tuple[Any, Any]] = []
    for step in steps:
        pair = (_do(fast, a, step), _do(slow, b, step))
        if read_late:
            seen.append(pair)  # read after every later step: the lazy ETA must not drift
        else:
            assert _comparable(pair[0], a) == _comparable(pair[1], b)
        one, other = fast.get(a), slow.get(b)
        assert (one.items, one.progress, one.version) == (
            other.items,
            other.progress,
            other.version,
        )
        assert (one.estimated_time_remaining, one.eta_range) == (
            other.estimated_time_remaining,
            other.eta_range,
        )
        assert fast.store._batches[a].stats == slow.store._batches[b].stats
    for x, y in seen:
        assert _comparable(x, a) == _comparable(y, b)


def test_memory_event_values_are_the_frozen_classes_themselves() -> None:
    """The memory store's written-out event hands out ItemSnapshot, Progress and
    ProgressEvent instances (not their writable fill-in twins), frozen and weakly
    referable like the public constructors' values."""
    import weakref

    import attrs

    from batchtrack import ItemSnapshot, Progress, ProgressEvent

    tracker = BatchTracker(MemoryStore(), clock=FakeClock(1000.0))
    batch_id = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")]).batch_id
    started = tracker.start_item(batch_id, "a")
    tracker.clock.advance(2.0)  # type: ignore[attr-defined]
    events = [started, tracker.complete_item(batch_id, "a"), tracker.fail_item(batch_id, "b", "x")]
    stored = tracker.get(batch_id)
    for event in events:
        values = (event.item, event.progress)
        assert (type(event), type(values[0]), type(values[1])) == (
            ProgressEvent,
            ItemSnapshot,
            Progress,
        )
        for value, name in ((event, "version"), (values[0], "status"), (values[1], "total")):
            with pytest.raises(attrs.exceptions.FrozenInstanceError):
                setattr(value, name, 1)
            with pytest.raises(attrs.exceptions.FrozenInstanceError):
                delattr(value, name)
        assert weakref.ref(values[0])() is values[0]
    assert [type(item) for item in stored.items] == [ItemSnapshot, ItemSnapshot]
    assert stored.items[0] == ItemSnapshot("a", "a.jpg", Status.COMPLETED, attempts=1)
    assert events[1].progress == Progress(2, completed=1, pending=1)
    assert hash(events[1].item) == hash(stored.items[0])


class ApplyAllMemoryStore(MemoryStore):
    """The same store with apply_all() overridden: the tracker's calls of several
    events take apply_all() (the memory store's own, atomic) instead of the fast path."""

    def apply_all(self, batch_id: str, transitions: Sequence[Transition]) -> list[TransitionResult]:
        return super().apply_all(batch_id, transitions)


_groups = st.lists(
    st.tuples(
        st.lists(
            st.tuples(
                st.sampled_from(["start", "complete", "fail", "fail long"]), st.integers(0, 6)
            ),
            max_size=8,
        ),
        st.sampled_from(["", "pause", "unpause", "retry", "wait", "expire"]),
        st.sampled_from([0.0, 0.5, 2.0, 30.0]),
    ),
    max_size=25,
)


def _group_answers(tracker: BatchTracker, batch_id: str, group: list[tuple[str, int]]) -> Any:
    from batchtrack._tracker import _COMPLETE, _FAIL, _START, MAX_ERROR_LENGTH

    rules = {"start": _START, "complete": _COMPLETE, "fail": _FAIL, "fail long": _FAIL}
    steps = [
        (
            str(index),
            rules[action],
            None if action in ("start", "complete") else "x" * (MAX_ERROR_LENGTH + index),
            15.0 if action == "start" else None,
        )
        for action, index in group
    ]
    try:
        answers = tracker._apply_events(batch_id, steps)
    except BatchtrackError as exc:
        return type(exc), str(exc).replace(batch_id, "B")
    return [
        (type(a), str(a).replace(batch_id, "B"))
        if isinstance(a, BatchtrackError)
        else (
            type(a),
            type(a.item),
            type(a.progress),
            a.item,
            a.progress,
            a.changed,
            a.version,
            a.estimated_time_remaining,
            a.eta_range,
        )
        for a in answers
    ]


@given(groups=_groups)
@settings(max_examples=150, deadline=None)
def test_memory_apply_steps_answers_like_apply_all(
    groups: list[tuple[list[tuple[str, int]], str, float]],
) -> None:
    """The orchestrator's calls (several starts, completions and failures at once) give on
    the memory store's fast path what apply_all() gives: every answer, event, snapshot,
    sum, lease and end marker; a step naming no item (index 6) changes nothing."""
    trackers = []
    for store in (MemoryStore(), ApplyAllMemoryStore()):
        tracker = BatchTracker(store, clock=FakeClock(1000.0), lease=20.0, ttl=5.0)
        batch_id = tracker.create_batch([(str(n), f"{n}.jpg") for n in range(6)]).batch_id
        trackers.append((tracker, batch_id))
    assert getattr(trackers[1][0].store, "_apply_steps", None) is None  # the generic way
    for group, then, seconds in groups:
        answers = [_group_answers(tracker, batch_id, group) for tracker, batch_id in trackers]
        assert answers[0] == answers[1]
        for tracker, batch_id in trackers:
            tracker.clock.advance(seconds)  # type: ignore[attr-defined]
            if then == "expire":
                tracker.clock.advance(10.0)  # type: ignore[attr-defined]
            try:
                if then in ("pause", "unpause"):
                    getattr(tracker, then)(batch_id)
                elif then == "retry":
                    tracker.retry(batch_id)
            except BatchtrackError:
                pass
        (fast, a), (slow, b) = trackers
        one, other = fast.store._batches.get(a), slow.store._batches.get(b)  # type: ignore[attr-defined]
        assert (one is None) == (other is None)
        if one is not None:
            assert (one.items, one.progress, one.version, one.stats, one.leases, one.log) == (
                other.items,
                other.progress,
                other.version,
                other.stats,
                other.leases,
                other.log,
            )
    (fast, a), (slow, b) = trackers
    assert [e.version for e in fast.store.outbox_claim(1e9, 10, 2e9)] == [
        e.version for e in slow.store.outbox_claim(1e9, 10, 2e9)
    ]
    assert sorted(fast.store._leases) == sorted(  # type: ignore[attr-defined]
        (until, a, n)
        for until, _, n in slow.store._leases  # type: ignore[attr-defined]
    )


def test_an_instrumented_memory_store_counts_the_several_event_calls() -> None:
    """The orchestrator's calls of several events on an instrumented memory store go
    through the wrapper's apply_all() (counted), not around it to the store's fast path."""
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry

    from batchtrack._tracker import _COMPLETE, _START
    from batchtrack.metrics import Metrics

    registry = CollectorRegistry()
    tracker = Metrics(registry).instrument(BatchTracker(clock=FakeClock(1000.0)))
    batch_id = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")]).batch_id
    tracker._apply_events(batch_id, [("a", _START, None, 30.0), ("b", _START, None, 30.0)])
    tracker._apply_events(batch_id, [("a", _COMPLETE, None, None)])
    assert registry.get_sample_value("batchtrack_items_started_total") == 2
    finished = registry.get_sample_value(
        "batchtrack_items_finished_total", {"outcome": "completed"}
    )
    assert finished == 1


_times = st.floats(0.0, 1e7, allow_nan=False)


@given(
    previous=st.sampled_from(list(Status)),
    target=st.sampled_from(list(Status)),
    at=_times,
    origin=_times,
    lease=st.none() | st.floats(0.001, 1e6),
    elapsed=st.floats(0.0, 1e5),
    before=st.sampled_from(["empty", "started", "finished"]),
)
@settings(max_examples=300, deadline=None)
def test_memory_stats_sum_like_the_contributions_bit_for_bit(
    previous: Status,
    target: Status,
    at: float,
    origin: float,
    lease: float | None,
    elapsed: float,
    before: str,
) -> None:
    """The memory store's one-piece sums equal stats_for's contributions added by add_stats."""
    stats: dict[str, float] = {}
    if before != "empty":
        add_stats(stats, _eta.stats_for(Status.PROCESSING, 7.5, 1.25, 30.0)[Status.PENDING], 0.0)
    if before == "finished":
        add_stats(stats, _eta.stats_for(Status.COMPLETED, 9.0, 1.25)[Status.PROCESSING], 1.5)
    frozen = dict(stats)
    expected: dict[str, float] | None = None
    contributions = _eta.stats_for(target, at, origin, lease).get(previous)
    if contributions:
        expected = dict(stats)
        add_stats(expected, contributions, elapsed)
    got = _eta.added(stats, previous, target, at, origin, lease, elapsed)
    assert stats == frozen  # a copy: the stats a result already shares never change
    if expected is None:
        assert got is None
    else:
        assert got is not None
        assert list(got) == list(expected)
        assert [struct.pack("<d", v) for v in got.values()] == [
            struct.pack("<d", v) for v in expected.values()
        ]


def _stores(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Store, Store]:
    """A store of ``kind`` and the same store class with apply() overridden (the tracker
    then takes the generic path)."""
    if kind == "sqlite":

        class GenericSQLiteStore(SQLiteStore):
            def apply(self, batch_id: str, transition: Transition) -> TransitionResult:
                return super().apply(batch_id, transition)

        return SQLiteStore(tmp_path / "fast.db"), GenericSQLiteStore(tmp_path / "slow.db")
    pytest.importorskip("redis")
    from batchtrack.stores.redis import RedisStore

    class GenericRedisStore(RedisStore):
        def apply(self, batch_id: str, transition: Transition) -> TransitionResult:
            return super().apply(batch_id, transition)

    url = request.getfixturevalue("redis_url")
    tag = uuid.uuid4().hex[:6]
    return RedisStore(url, prefix=f"fast{tag}:"), GenericRedisStore(url, prefix=f"slow{tag}:")


def _step(tracker: BatchTracker, batch_id: str, action: str, item: str) -> Any:
    if action == "pause":
        return tracker.pause(batch_id)
    if action == "unpause":
        return tracker.unpause(batch_id)
    try:
        if action == "start":
            event = tracker.start_item(batch_id, item)
        elif action == "complete":
            event = tracker.complete_item(batch_id, item)
        else:
            event = tracker.fail_item(batch_id, item, "boom")
    except BatchtrackError as exc:
        return type(exc), str(exc).replace(batch_id, "B")
    return (
        event.item,
        event.progress,
        event.changed,
        event.version,
        event.estimated_time_remaining,
        event.eta_range,
    )


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_store_fast_event_path_answers_like_apply(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A start, completion or failure through the store's fast path gives what apply() gives."""
    trackers = []
    for store in _stores(kind, request, tmp_path):
        tracker = BatchTracker(store, clock=FakeClock(1000.0), lease=20.0)
        trackers.append((tracker, tracker.create_batch([(str(n), f"{n}.jpg") for n in range(4)])))
    steps: list[tuple[str, str]] = [
        ("start", "0"),
        ("start", "0"),  # a repeat: unchanged
        ("complete", "1"),  # pending: rejected
        ("complete", "0"),
        ("fail", "1"),  # failed before it started: no stats
        ("pause", ""),
        ("start", "2"),  # paused
        ("unpause", ""),
        ("start", "2"),
        ("fail", "2"),
        ("start", "9"),  # no such item
        ("start", "3"),
        ("complete", "3"),  # ends the batch
        ("complete", "3"),
    ]
    for action, item in steps:
        answers = []
        for tracker, snap in trackers:
            tracker.clock.advance(1.25)  # type: ignore[attr-defined]
            answers.append(_step(tracker, snap.batch_id, action, item))
        assert answers[0] == answers[1], (action, item)
    (fast, a), (slow, b) = trackers
    one, other = fast.get(a.batch_id), slow.get(b.batch_id)
    assert (one.items, one.progress, one.version, one.status) == (
        other.items,
        other.progress,
        other.version,
        other.status,
    )
    loaded = [tracker.store.load(snap.batch_id, items=False) for tracker, snap in trackers]
    assert loaded[0] is not None
    assert loaded[1] is not None
    assert dict(loaded[0].stats) == dict(loaded[1].stats)
    assert loaded[0].stats  # the starts and finishes were summed
    ends = [
        [e.version for e in tracker.store.outbox_claim(2000.0, 10, 2030.0)]
        for tracker, _ in trackers
    ]
    assert ends[0] == ends[1]
    assert len(ends[0]) == 1
