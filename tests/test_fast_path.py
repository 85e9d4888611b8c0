"""The memory store's fast path gives exactly what the generic store path gives: every
event (ETA and range included), every snapshot, every stored statistic."""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from batchtrack import BatchTracker, MemoryStore, Status, _eta
from batchtrack.exceptions import BatchtrackError
from batchtrack.stores.base import Transition, TransitionResult, add_stats
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
