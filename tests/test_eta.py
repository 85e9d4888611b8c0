"""The ETA on a fake clock: edge cases, convergence, steadiness, adaptation; every store."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

import pytest

from batchtrack import BatchTracker
from batchtrack.testing import FakeClock


def _run(
    tracker: BatchTracker,
    clock: FakeClock,
    durations: list[float],
    workers: int,
    on_poll: Callable[[float, int | None, float], None],
) -> None:
    """Workers pull items in order; the ETA is polled every 2 s against the true end."""
    snap = tracker.create_batch([f"{i}.jpg" for i in range(len(durations))])
    ids = [item.id for item in snap.items]
    start = clock()
    free = [(start, w) for w in range(workers)]
    events: list[tuple[float, int, str]] = []
    for i, duration in enumerate(durations):
        at, w = heapq.heappop(free)
        events += [(at, 1, f"s{i}"), (at + duration, 0, f"c{i}")]
        heapq.heappush(free, (at + duration, w))
    events.sort()
    end = events[-1][0]
    poll = start
    for at, _, what in events:
        while poll < at:
            clock.now = poll
            on_poll(poll, tracker.get(snap.batch_id, items=False).estimated_time_remaining, end)
            poll += 2.0
        clock.now = at
        i = int(what[1:])
        if what[0] == "s":
            tracker.start_item(snap.batch_id, ids[i])
        else:
            tracker.complete_item(snap.batch_id, ids[i])


def test_none_until_an_item_is_final_then_zero_when_finished(
    tracker: BatchTracker, clock: FakeClock
) -> None:
    """None while nothing is final, an int while running, 0 once finished (also failed)."""
    snap = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")])
    assert tracker.start_item(snap.batch_id, "a").estimated_time_remaining is None
    clock.advance(3)
    eta = tracker.complete_item(snap.batch_id, "a").estimated_time_remaining
    assert isinstance(eta, int)
    assert eta >= 1
    tracker.start_item(snap.batch_id, "b")
    clock.advance(3)
    assert tracker.fail_item(snap.batch_id, "b", "broken").estimated_time_remaining == 0
    assert tracker.get(snap.batch_id).estimated_time_remaining == 0


def test_cancelled_items_alone_give_a_throughput_estimate(
    tracker: BatchTracker, clock: FakeClock
) -> None:
    """With only cancelled items final (no durations yet) the ETA is still a positive int."""
    snap = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")])
    clock.advance(4)
    event = tracker.fail_item(snap.batch_id, "a", "cancelled")
    assert event.estimated_time_remaining == 4


def test_converges_on_a_steady_workload(tracker: BatchTracker, clock: FakeClock) -> None:
    """4 workers, 1 s items: past a quarter done, every poll is within 15% of the truth."""
    errors: list[float] = []

    def check(now: float, eta: int | None, end: float) -> None:
        truth = end - now
        if eta is not None and truth >= 10 and now - clock_start > 0.25 * (end - clock_start):
            errors.append(abs(eta - truth) / truth)

    clock_start = clock()
    _run(tracker, clock, [1.0 + 0.05 * (i % 5) for i in range(400)], 4, check)
    assert errors
    assert max(errors) < 0.15


def test_one_extreme_item_does_not_make_it_jump(tracker: BatchTracker, clock: FakeClock) -> None:
    """One 60 s item among 1 s items moves the ETA between polls by a few seconds at most."""
    durations = [1.0] * 300
    durations[150] = 60.0
    etas: list[int] = []
    _run(tracker, clock, durations, 8, lambda now, eta, end: etas.append(eta) if eta else None)
    jumps = [abs(b - a) for a, b in itertools.pairwise(etas)]
    assert max(jumps) <= 5


def test_adapts_when_items_slow_down(tracker: BatchTracker, clock: FakeClock) -> None:
    """When items become 3x slower midway, the ETA follows within a few polls."""
    durations = [1.0] * 200 + [3.0] * 200
    late_errors: list[float] = []

    def check(now: float, eta: int | None, end: float) -> None:
        truth = end - now
        if eta is not None and truth >= 20 and now > 0.75 * (end - start) + start:
            late_errors.append(abs(eta - truth) / truth)

    start = clock()
    _run(tracker, clock, durations, 4, check)
    assert late_errors
    assert max(late_errors) < 0.2


@pytest.mark.parametrize("workers", [1, 8])
def test_estimate_falls_as_time_passes_on_a_steady_batch(
    tracker: BatchTracker, clock: FakeClock, workers: int
) -> None:
    """Consecutive polls 2 s apart mostly fall by about 2 s, never rising by more than 3."""
    etas: list[int] = []
    _run(
        tracker,
        clock,
        [1.0] * 200,
        workers,
        lambda now, eta, end: etas.append(eta) if eta and end - now > 5 else None,
    )
    steps = [b - a for a, b in itertools.pairwise(etas)]
    assert max(steps) <= 3
