"""The ETA on a fake clock: edge cases, convergence, steadiness, adaptation; every store."""

from __future__ import annotations

import heapq
import itertools
import json
import random
import statistics
from collections.abc import Callable, Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchtrack import BatchTracker, InvalidTransition, MemoryStore, Progress, _eta
from batchtrack._json import status_body
from batchtrack.stores.base import Store
from batchtrack.testing import FakeClock


def _one_by_one(
    tracker: BatchTracker,
    clock: FakeClock,
    batch_id: str,
    item_ids: Iterable[str],
    seconds: float,
    *,
    retried: bool = False,
) -> None:
    """One worker: each item started, ``seconds`` later completed (with ``retried``,
    first failed after ``seconds``, retried and run again for as long)."""
    for item in item_ids:
        tracker.start_item(batch_id, item)
        clock.advance(seconds)
        if retried:
            tracker.fail_item(batch_id, item, "flaky")
            tracker.retry(batch_id, [item])
            tracker.start_item(batch_id, item)
            clock.advance(seconds)
        tracker.complete_item(batch_id, item)


def _run(
    tracker: BatchTracker,
    clock: FakeClock,
    durations: list[float],
    workers: int,
    on_poll: Callable[[float, int | None, float], None],
    *,
    beats: bool = False,
) -> None:
    """Workers pull items in order; the ETA is polled every 2 s against the true end.
    With ``beats``, each worker renews its item's lease every third of it, as the
    Orchestrator does."""
    snap = tracker.create_batch([f"{i}.jpg" for i in range(len(durations))])
    ids = [item.id for item in snap.items]
    start = clock()
    free = [(start, w) for w in range(workers)]
    events: list[tuple[float, int, str]] = []
    for i, duration in enumerate(durations):
        at, w = heapq.heappop(free)
        events += [(at, 1, f"s{i}"), (at + duration, 0, f"c{i}")]
        beat = at + tracker.lease / 3
        while beats and beat < at + duration:
            events.append((beat, 2, f"h{i}"))
            beat += tracker.lease / 3
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
        elif what[0] == "h":
            tracker.heartbeat(snap.batch_id, ids[i])
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


def test_a_run_of_short_items_in_a_skewed_batch_is_not_a_speed_up(clock: FakeClock) -> None:
    """Skewed durations (log-normal, variance over the mean squared) have runs of short
    items between the long ones: ten of them in a row after sixty items leave the
    estimate where the whole batch puts it, instead of halving it until the next long
    item pushes it back up (their own small spread made them look like a speed-up)."""
    ratios = []
    for seed in range(20):
        rng = random.Random(seed)
        durations = [rng.lognormvariate(0.0, 1.0) for _ in range(60)]
        if statistics.pvariance(durations) < statistics.fmean(durations) ** 2:
            continue  # not skewed enough, as a sample
        durations += [0.3] * 10
        tracker = BatchTracker(clock=clock, lease=30.0)
        snap = tracker.create_batch([f"{i}.jpg" for i in range(200)])
        for item, seconds in zip(snap.items, durations, strict=False):
            tracker.start_item(snap.batch_id, item.id)
            clock.advance(seconds)
            tracker.complete_item(snap.batch_id, item.id)
        eta = tracker.get(snap.batch_id, items=False).estimated_time_remaining
        assert eta is not None
        ratios.append(eta / (statistics.fmean(durations) * (200 - len(durations))))
    assert len(ratios) >= 10
    assert min(ratios) > 0.9, ratios


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


# -- no state shared between batches -------------------------------------------------------


def _two_phase_history(phases: list[tuple[float, float, int]]) -> tuple[BatchTracker, str]:
    """A 30-item batch on its own integer clock: per phase, idle seconds, then items of
    one duration run one after another; 20 items finish by t = 60."""
    clock = FakeClock(0.0)
    tracker = BatchTracker(clock=clock)
    snap = tracker.create_batch([f"{i}.jpg" for i in range(30)])
    ids = iter(item.id for item in snap.items)
    for idle, duration, count in phases:
        clock.advance(idle)
        for _ in range(count):
            item = next(ids)
            tracker.start_item(snap.batch_id, item)
            clock.advance(duration)
            tracker.complete_item(snap.batch_id, item)
    assert clock() == 60
    return tracker, snap.batch_id


def test_batches_with_equal_time_sums_do_not_share_an_estimate() -> None:
    """Two batches with the same count, total duration and total finish time (integer
    times) but opposite trends get their own ETAs, whichever is computed first."""
    slowed, slowed_id = _two_phase_history([(20, 1, 10), (0, 3, 10)])  # 1 s items, then 3 s
    sped, sped_id = _two_phase_history([(0, 3, 10), (20, 1, 10)])  # 3 s items, then 1 s
    sped_eta = sped.get(sped_id, items=False).estimated_time_remaining
    slowed_eta = slowed.get(slowed_id, items=False).estimated_time_remaining
    assert sped_eta is not None
    assert slowed_eta is not None
    assert slowed_eta > 2 * sped_eta  # 10 items at ~3 s vs ~1 s each


# -- the range -------------------------------------------------------------------------------


@st.composite
def _histories(draw: st.DrawFn) -> tuple[int, list[tuple[str, int, float]]]:
    """A batch size and a sequence of (action, item, seconds before it) on its items."""
    size = draw(st.integers(1, 6))
    steps = draw(
        st.lists(
            st.tuples(
                st.sampled_from(
                    ["start", "lease", "beat", "complete", "fail", "retry", "reclaim", "get"]
                ),
                st.integers(0, size - 1),
                st.sampled_from([0.0, 0.5, 1.0, 2.0, 7.0, 30.0]),
            ),
            max_size=30,
        )
    )
    return size, steps


def _replay(
    tracker: BatchTracker, clock: FakeClock, size: int, steps: list[tuple[str, int, float]]
) -> list[tuple[Progress, int | None, tuple[int, int] | None]]:
    """Apply the steps that are allowed; every event's and read's counts, ETA and range."""
    snap = tracker.create_batch([(f"i{i}", f"{i}.jpg") for i in range(size)])
    seen = []
    for action, index, seconds in steps:
        clock.advance(seconds)
        item = f"i{index}"
        try:
            if action == "start":
                event = tracker.start_item(snap.batch_id, item)
            elif action == "lease":  # a start whose worker may be lost
                event = tracker.start_item(snap.batch_id, item, lease=5.0)
            elif action == "beat":  # its worker renews its lease
                tracker.heartbeat(snap.batch_id, item, lease=5.0)
                continue
            elif action == "reclaim":
                tracker.reclaim()
                continue
            elif action == "complete":
                event = tracker.complete_item(snap.batch_id, item)
            elif action == "fail":
                event = tracker.fail_item(snap.batch_id, item, "broken")
            elif action == "retry":
                tracker.retry(snap.batch_id, [item])
                continue
            else:
                got = tracker.get(snap.batch_id, items=False)
                seen.append((got.progress, got.estimated_time_remaining, got.eta_range))
                continue
        except InvalidTransition:
            continue
        seen.append((event.progress, event.estimated_time_remaining, event.eta_range))
    got = tracker.get(snap.batch_id, items=False)
    seen.append((got.progress, got.estimated_time_remaining, got.eta_range))
    return seen


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(history=_histories())
def test_the_range_brackets_the_estimate_on_every_store(
    store_factory: Callable[[], Store], history: tuple[int, list[tuple[str, int, float]]]
) -> None:
    """On any sequence of events, every event and read has low <= ETA <= high and low <
    high (never a point range), None exactly when the ETA is None (before anything
    finished, or a read while only lost items are left), (0, 0) once finished, and
    every store gives the same ETA and range as the memory store."""
    size, steps = history
    runs = []
    for store in (MemoryStore(), store_factory()):
        with store:  # closed by each example: a server allows only so many connections
            clock = FakeClock(1_000.0)
            runs.append(_replay(BatchTracker(store, clock=clock), clock, size, steps))
    assert runs[0] == runs[1]
    for progress, eta, eta_range in runs[0]:
        if eta is None:
            assert eta_range is None
            assert progress.completed + progress.failed == 0 or (
                progress.processing and not progress.pending
            )
        elif progress.pending + progress.processing == 0:
            assert (eta, eta_range) == (0, (0, 0))
        else:
            assert eta_range is not None
            low, high = eta_range
            assert 1 <= low <= eta <= high
            assert low < high


def test_the_range_is_in_the_json_body(tracker: BatchTracker, clock: FakeClock) -> None:
    """The status body carries the range right after the ETA: null, then [low, high]."""
    snap = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg"), ("c", "c.jpg")])
    body = tracker.get(snap.batch_id).to_dict()
    assert body["estimatedTimeRemainingRange"] is None
    keys = list(body)
    assert keys[keys.index("estimatedTimeRemaining") + 1] == "estimatedTimeRemainingRange"
    tracker.start_item(snap.batch_id, "a")
    clock.advance(4)
    tracker.complete_item(snap.batch_id, "a")
    body = tracker.get(snap.batch_id).to_dict()
    low, high = body["estimatedTimeRemainingRange"]
    assert low <= body["estimatedTimeRemaining"] <= high
    assert high > low  # one item says little: the range is not a point


def test_the_range_narrows_as_evidence_accumulates(tracker: BatchTracker, clock: FakeClock) -> None:
    """Relative to the estimate, the range after 100 steady items is narrower than after 3."""
    snap = tracker.create_batch([f"{i}.jpg" for i in range(400)])
    widths: dict[int, float] = {}
    for done, item in enumerate(snap.items[:100], start=1):
        tracker.start_item(snap.batch_id, item.id)
        clock.advance(1.0 + 0.1 * (done % 3))
        event = tracker.complete_item(snap.batch_id, item.id)
        assert event.eta_range is not None
        assert event.estimated_time_remaining is not None
        low, high = event.eta_range
        widths[done] = (high - low) / event.estimated_time_remaining
    assert widths[100] < widths[3] / 2


def test_retried_failures_count_as_work_still_to_do(
    tracker: BatchTracker, clock: FakeClock
) -> None:
    """When failed attempts were retried, the pending items are expected to need retries too."""
    etas = []
    for retries in (False, True):
        snap = tracker.create_batch([f"{i}.jpg" for i in range(20)])
        ids = [item.id for item in snap.items[:10]]
        _one_by_one(tracker, clock, snap.batch_id, ids, 1, retried=retries)
        etas.append(tracker.get(snap.batch_id, items=False).estimated_time_remaining)
    assert etas == [10, 20]  # 10 items left at 1 s, and at 2 attempts of 1 s


# -- what the future may hold: pauses and lost workers ---------------------------------


def test_a_pause_widens_the_range_with_its_length(tracker: BatchTracker, clock: FakeClock) -> None:
    """While nothing runs, the estimate expects the pause to last about as long again as
    it has so far, and the range reaches up to several times that."""
    snap = tracker.create_batch([f"{i}.jpg" for i in range(40)])
    _one_by_one(tracker, clock, snap.batch_id, [item.id for item in snap.items[:20]], 1.0)
    working = tracker.get(snap.batch_id, items=False)
    assert working.estimated_time_remaining == 20
    clock.advance(30.0)
    paused = tracker.get(snap.batch_id, items=False)
    assert paused.estimated_time_remaining is not None
    assert paused.eta_range is not None
    assert 45 <= paused.estimated_time_remaining <= 55  # 20 s of work after ~30 s more idle
    low, high = paused.eta_range
    assert low <= 30  # the pause may end at once
    assert high >= 20 + 5 * 30  # or go on for much longer


def test_items_held_by_lost_workers_add_a_wait(clock: FakeClock) -> None:
    """Once an item came back from a lost worker, more items processing than the work
    finished lately shows are held by lost workers: the estimate waits for them."""
    tracker = BatchTracker(clock=clock, lease=20.0)
    snap = tracker.create_batch([f"{i}.jpg" for i in range(60)])
    ids = [item.id for item in snap.items]
    tracker.start_item(snap.batch_id, ids[0])  # its worker dies
    _one_by_one(tracker, clock, snap.batch_id, ids[1:21], 1.0)
    assert tracker.reclaim() == 1
    tracker.start_item(snap.batch_id, ids[21])  # this worker dies too
    _one_by_one(tracker, clock, snap.batch_id, ids[22:30], 1.0)
    snap_now = tracker.get(snap.batch_id, items=False)
    assert snap_now.progress.processing == 1  # the lost one; no item is running
    tracker.start_item(snap.batch_id, ids[30])
    clock.advance(0.5)
    got = tracker.get(snap.batch_id, items=False)
    assert got.progress.processing == 2
    assert got.estimated_time_remaining is not None
    assert got.eta_range is not None
    # 31 items of work (29 pending, one held, one running) at 1 s each, one worker; the
    # held one is back only when its lease runs out, and more may be lost meanwhile.
    assert got.estimated_time_remaining > 31
    assert got.eta_range[1] > got.estimated_time_remaining + 5


# -- what the range is made of ----------------------------------------------------------


def test_a_narrow_range_is_never_a_point_that_misses(clock: FakeClock) -> None:
    """Two workers on items of exactly 1 s: the true time left is known to a hair, and a
    span narrower than a second still becomes whole seconds that hold it."""
    tracker = BatchTracker(clock=clock)
    snap = tracker.create_batch([f"{i}.jpg" for i in range(100)])
    ids = [item.id for item in snap.items]
    for pair in range(0, 94, 2):
        for item in ids[pair : pair + 2]:
            tracker.start_item(snap.batch_id, item)
        clock.advance(1.0)
        for item in ids[pair : pair + 2]:
            tracker.complete_item(snap.batch_id, item)
    for item in ids[94:96]:
        tracker.start_item(snap.batch_id, item)
    clock.advance(0.3)
    got = tracker.get(snap.batch_id, items=False)
    truth = 2 + 0.7  # two more pairs, and what is left of this one
    assert got.eta_range is not None
    low, high = got.eta_range
    assert low < high
    assert low <= truth <= high


def test_retried_attempts_widen_the_range(tracker: BatchTracker, clock: FakeClock) -> None:
    """How many attempts the items still to do will need is itself uncertain."""
    widths = []
    for retries in (False, True):
        snap = tracker.create_batch([f"{i}.jpg" for i in range(40)])
        ids = [item.id for item in snap.items[:20]]
        _one_by_one(tracker, clock, snap.batch_id, ids, 1, retried=retries)
        got = tracker.get(snap.batch_id, items=False)
        assert got.eta_range is not None
        assert got.estimated_time_remaining is not None
        low, high = got.eta_range
        widths.append((high - low) / got.estimated_time_remaining)
    assert widths[1] > 2 * widths[0]


def test_heavy_tails_widen_the_range(tracker: BatchTracker, clock: FakeClock) -> None:
    """Rare long items make a sample's variance fall short of the truth: the range plans
    for more, from the third and fourth moments of the durations."""
    snap = tracker.create_batch([f"{i}.jpg" for i in range(120)])
    for i, item in enumerate(snap.items[:60]):
        tracker.start_item(snap.batch_id, item.id)
        clock.advance(20.0 if i % 30 == 7 else 1.0)
        tracker.complete_item(snap.batch_id, item.id)
    record = tracker.store.load(snap.batch_id, items=False)
    assert record is not None
    light = {k: v for k, v in record.stats.items() if k not in ("c0", "f0")}
    now = clock()
    _, wide = _eta.estimate(record.progress, record.created_at, record.stats, now)
    _, narrow = _eta.estimate(record.progress, record.created_at, light, now)
    assert wide is not None
    assert narrow is not None
    assert wide[1] - wide[0] > 1.2 * (narrow[1] - narrow[0])


def test_the_last_of_many_workers_sets_the_end(clock: FakeClock) -> None:
    """With spread-out durations the batch ends when its slowest last item does: on
    exponential durations and 8 workers the ETA is not biased low near the end."""
    rng = random.Random(7)
    polls: list[tuple[float, int | None, float]] = []
    for _ in range(12):
        batch: list[tuple[float, int | None, float]] = []
        durations = [rng.expovariate(1.0) for _ in range(120)]
        _run(BatchTracker(clock=clock), clock, durations, 8, lambda *poll, b=batch: b.append(poll))
        polls += batch[len(batch) * 2 // 3 :]  # the last third of the batch
    ratios = [eta / (end - at) for at, eta, end in polls if eta is not None and end - at >= 4.0]
    assert 0.9 <= statistics.fmean(ratios) <= 1.15


def test_workers_that_join_are_not_lost_workers(tracker: BatchTracker, clock: FakeClock) -> None:
    """More items running than the work done lately shows, all of them young: workers
    joined (or came back from a pause). The ETA shares the work among them all."""
    snap = tracker.create_batch([f"{i}.jpg" for i in range(60)])
    ids = [item.id for item in snap.items]
    _one_by_one(tracker, clock, snap.batch_id, ids[:20], 1.0)
    for item in ids[20:24]:  # four workers now
        tracker.start_item(snap.batch_id, item)
    clock.advance(0.2)
    got = tracker.get(snap.batch_id, items=False)
    assert got.estimated_time_remaining is not None
    assert got.estimated_time_remaining <= 12  # ~40 items of 1 s on 4 workers


@pytest.mark.parametrize("renewed", [False, True])
def test_a_lost_item_shows_by_its_age_and_silence_before_any_reclaim(
    clock: FakeClock, renewed: bool
) -> None:
    """An item processing for far longer than items take, whose lease nobody renewed
    for longer than a worker renews it (a third of it), is held by a lost worker: the
    ETA waits for its lease to run out and for it to be done again, before any reclaim.
    The same item with its lease renewed is a long one, alive: no wait for its lease,
    though the range still allows for a long run."""
    tracker = BatchTracker(clock=clock, lease=30.0)
    snap = tracker.create_batch([f"{i}.jpg" for i in range(12)])
    ids = [item.id for item in snap.items]
    tracker.start_item(snap.batch_id, ids[0])  # its worker dies (unless renewed)
    _one_by_one(tracker, clock, snap.batch_id, ids[1:11], 1.0)
    if renewed:
        tracker.heartbeat(snap.batch_id, ids[0])
    tracker.start_item(snap.batch_id, ids[11])
    clock.advance(2.5)  # 12.5 s without a renewal: over a third of the lease
    got = tracker.get(snap.batch_id, items=False)
    assert got.progress.processing == 2
    assert got.estimated_time_remaining is not None
    assert got.eta_range is not None
    if renewed:
        assert got.estimated_time_remaining < 10
        assert got.eta_range[1] >= 20
        return
    # Back after its 30 s lease (~17.5 s from now), then about a second of work.
    assert got.estimated_time_remaining >= 10
    assert got.eta_range[1] >= 20


def test_once_a_worker_was_lost_an_old_item_is_suspect_before_its_lease_says_so(
    clock: FakeClock,
) -> None:
    """After one item came back from a lost worker, the batch is known to lose workers:
    a second item far older than items get is taken for held by one as soon as its age
    shows it (not only once its lease has gone unrenewed for a third of it): the one
    live worker does the pending items alone, and the ETA waits for the held one."""
    tracker = BatchTracker(clock=clock, lease=30.0)
    snap = tracker.create_batch([f"{i}.jpg" for i in range(60)])
    ids = [item.id for item in snap.items]
    tracker.start_item(snap.batch_id, ids[0])  # its worker dies
    _one_by_one(tracker, clock, snap.batch_id, ids[1:33], 1.0)
    assert tracker.reclaim() == 1
    tracker.start_item(snap.batch_id, ids[33])  # this worker dies too
    _one_by_one(tracker, clock, snap.batch_id, ids[34:40], 1.0)
    tracker.start_item(snap.batch_id, ids[40])
    clock.advance(0.5)  # ids[33] silent for 6.5 s of its 30 s lease
    got = tracker.get(snap.batch_id, items=False)
    assert got.progress.pending == 20
    assert got.estimated_time_remaining is not None
    assert got.eta_range is not None
    # 20 pending items of 1 s on one worker (not shared with the dead one's), and the
    # held one back in ~23.5 s: about 24.5 s, and surely not under 20.
    assert got.eta_range[0] >= 20
    assert got.estimated_time_remaining >= 24


def test_running_items_count_what_is_left_of_them(tracker: BatchTracker, clock: FakeClock) -> None:
    """Items that all take the same time: one that has run for 1.6 of its 2 s needs 0.4
    more, not the 1 s an item seen at a random moment has left on average."""
    snap = tracker.create_batch([f"{i}.jpg" for i in range(31)])
    ids = [item.id for item in snap.items]
    _one_by_one(tracker, clock, snap.batch_id, ids[:20], 2.0)
    tracker.start_item(snap.batch_id, ids[20])
    clock.advance(1.6)
    got = tracker.get(snap.batch_id, items=False)
    assert got.estimated_time_remaining == 20  # 10 pending x 2 s + 0.4 s


def test_a_long_item_after_instant_failures_is_not_taken_for_lost(
    tracker: BatchTracker, clock: FakeClock
) -> None:
    """Files that fail at once (not images) say little about how long a real item takes:
    the first real one, running for seconds, is not a lost worker's, and the ETA does not
    wait for its lease."""
    snap = tracker.create_batch([f"{i}.jpg" for i in range(12)])
    ids = [item.id for item in snap.items]
    for item in ids[:5]:
        tracker.start_item(snap.batch_id, item)
        clock.advance(0.001)
        tracker.fail_item(snap.batch_id, item, "not an image")
    tracker.start_item(snap.batch_id, ids[5])
    clock.advance(3.0)
    got = tracker.get(snap.batch_id, items=False)
    assert got.estimated_time_remaining is not None
    assert got.estimated_time_remaining < 10  # not the 300 s lease


# -- why there is no ETA ------------------------------------------------------------------


def test_no_eta_while_only_lost_items_are_left_and_the_body_says_why(
    tracker: BatchTracker, clock: FakeClock
) -> None:
    """Once every item left is lost (its lease ran out, not yet reclaimed) the ETA is
    None with the reason "waiting_for_lost_items", not "1 s" until the reclaim."""
    snap = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg"), ("c", "c.jpg")])
    batch = snap.batch_id
    tracker.start_item(batch, "a", lease=30.0)  # its worker is killed (-9)
    _one_by_one(tracker, clock, batch, ["b", "c"], 2.0)
    before = tracker.get(batch)
    assert before.estimated_time_remaining is not None
    assert before.eta_unavailable is None
    assert "etaUnavailable" not in before.to_dict()
    clock.advance(27.0)  # the lease of "a" runs out (started 4 s ago plus 27 > 30)
    lost = tracker.get(batch)
    assert (lost.estimated_time_remaining, lost.eta_range) == (None, None)
    assert lost.eta_unavailable == "waiting_for_lost_items"
    body = json.loads(status_body(lost))
    assert body["estimatedTimeRemaining"] is None
    assert body["etaUnavailable"] == "waiting_for_lost_items"
    assert tracker._state(batch, None)[1:] == (None, None)  # what the ETag is made of
    assert tracker.reclaim() == 1  # back to pending: a runner will start it again
    again = tracker.get(batch)
    assert again.estimated_time_remaining is not None
    assert again.eta_unavailable is None


def test_the_reason_is_starting_until_something_finished(
    tracker: BatchTracker, clock: FakeClock
) -> None:
    """Before any item is final the body says "starting"; a finished batch carries no
    reason at all."""
    snap = tracker.create_batch([("a", "a.jpg")])
    assert snap.eta_unavailable == "starting"
    assert snap.to_dict()["etaUnavailable"] == "starting"
    tracker.start_item(snap.batch_id, "a", lease=5.0)
    clock.advance(10.0)  # lost before anything finished: still no pace to go by
    assert tracker.get(snap.batch_id).eta_unavailable == "starting"
    tracker.complete_item(snap.batch_id, "a")  # late, but it counts
    done = tracker.get(snap.batch_id)
    assert (done.estimated_time_remaining, done.eta_unavailable) == (0, None)
    assert "etaUnavailable" not in done.to_dict()


def test_lost_items_among_running_ones_are_not_counted_as_about_to_finish(
    tracker: BatchTracker, clock: FakeClock
) -> None:
    """Of two items processing, the one whose lease ran out is work to do again, not
    half an item from done: one live worker still has it, and the pending ones, ahead."""
    snap = tracker.create_batch([f"{i}.jpg" for i in range(8)])
    ids = [item.id for item in snap.items]
    tracker.start_item(snap.batch_id, ids[0], lease=3.0)  # its worker dies
    _one_by_one(tracker, clock, snap.batch_id, ids[1:4], 1.0)  # the other goes on
    tracker.start_item(snap.batch_id, ids[4])
    clock.advance(0.5)  # the lease of ids[0] ran out 0.5 s ago; nothing reclaimed it
    got = tracker.get(snap.batch_id, items=False)
    assert (got.progress.processing, got.progress.pending) == (2, 3)
    assert got.eta_unavailable is None
    assert got.estimated_time_remaining is not None
    assert got.eta_range is not None
    # 3 pending items and the lost one again, 1 s each, on the one live worker (counted
    # as a running item, the lost one would make that about 2 s).
    assert got.estimated_time_remaining >= 4
    assert got.eta_range[1] >= 4


def test_a_range_under_a_second_is_never_a_point(tracker: BatchTracker, clock: FakeClock) -> None:
    """Items of 10 ms with a few left: the span is far under a second, and the range
    is still two different whole seconds, the estimate among them."""
    snap = tracker.create_batch([f"{i}.jpg" for i in range(100)])
    _one_by_one(tracker, clock, snap.batch_id, [item.id for item in snap.items[:95]], 0.01)
    got = tracker.get(snap.batch_id, items=False)
    assert got.estimated_time_remaining == 1
    assert got.eta_range == (1, 2)
    assert json.loads(status_body(got))["estimatedTimeRemainingRange"] == [1, 2]


# -- steadiness ----------------------------------------------------------------------------


def _steady_steps(tracker: BatchTracker, clock: FakeClock, workers: int, seed: int) -> list[int]:
    """Items of 0.8-1.2 s, polled every 2 s: how the shown ETA moves between polls from
    a tenth of the batch's time on, while more than 10 s are left."""
    rng = random.Random(seed)
    durations = [rng.uniform(0.8, 1.2) for _ in range(200)]
    polled: list[tuple[float, int]] = []

    def poll(now: float, eta: int | None, end: float) -> None:
        if eta is not None and end - now > 10:
            polled.append((now, eta))

    _run(tracker, clock, durations, workers, poll)
    start = polled[0][0] + 0.1 * (polled[-1][0] - polled[0][0])
    etas = [eta for now, eta in polled if now >= start]
    return [b - a for a, b in itertools.pairwise(etas)]


@pytest.mark.parametrize(("workers", "seed"), [(2, 1), (2, 3), (4, 1), (4, 2)])
def test_a_steady_batch_counts_down_without_ever_rising(
    tracker: BatchTracker, clock: FakeClock, workers: int, seed: int
) -> None:
    """With a few workers on alike items the shown ETA never rises, and it falls by
    about the 2 s that passed between two polls."""
    steps = _steady_steps(tracker, clock, workers, seed)
    assert max(steps) <= 0
    assert statistics.fmean(abs(step + 2) for step in steps) < 0.6


@pytest.mark.parametrize("seed", [1, 3, 5])
def test_one_worker_on_alike_items_counts_down_steadily(
    tracker: BatchTracker, clock: FakeClock, seed: int
) -> None:
    """One worker on alike items: a few recent items that happen to be quick do not
    pull the ETA down for the next ones to push it back up (at most one rise)."""
    steps = _steady_steps(tracker, clock, 1, seed)
    assert sum(step > 0 for step in steps) <= 1
    assert statistics.fmean(abs(step + 2) for step in steps) < 0.6


def test_a_lasting_slow_down_is_followed_within_a_few_polls(
    tracker: BatchTracker, clock: FakeClock
) -> None:
    """One worker, items 3x slower from the middle on: the ETA rises to the new pace,
    within 20% of the truth from 20 polls (40 s, 13 slow items) after the change."""
    durations = [1.0] * 100 + [3.0] * 100
    late: list[float] = []
    start = clock()

    def check(now: float, eta: int | None, end: float) -> None:
        if eta is not None and now >= start + 100 + 40 and end - now >= 20:
            late.append(abs(eta - (end - now)) / (end - now))

    _run(tracker, clock, durations, 1, check)
    assert late
    assert max(late) < 0.2


def test_the_range_narrows_as_soon_as_work_resumes_after_a_pause(clock: FakeClock) -> None:
    """Four workers stop for 5 minutes a quarter in: once they are back, their young
    items are not taken for lost ones, and the range is as narrow as before the pause."""
    tracker = BatchTracker(clock=clock)
    snap = tracker.create_batch([f"{i}.jpg" for i in range(400)])
    ids = iter(item.id for item in snap.items)
    start = clock()
    widths: list[float] = []  # the range's width over the ETA, after the pause
    for step in range(95):
        at = start + step + (300.0 if step >= 25 else 0.0)
        clock.now = at
        for item in itertools.islice(ids, 4):
            tracker.start_item(snap.batch_id, item)
        if step >= 25 and step % 2 == 0:
            got = tracker.get(snap.batch_id, items=False)
            assert got.eta_range is not None
            assert got.estimated_time_remaining
            low, high = got.eta_range
            widths.append((high - low) / got.estimated_time_remaining)
        clock.now = at + 1.0
        for item in snap.items[4 * step : 4 * step + 4]:
            tracker.complete_item(snap.batch_id, item.id)
    assert max(widths) < 0.3


# -- between finishes -------------------------------------------------------------------


def test_a_long_item_after_short_ones_does_not_make_the_eta_climb(clock: FakeClock) -> None:
    """One worker, 20 items of half a second, then one that runs on: while nothing
    finishes the shown ETA does not rise (the item is as likely long as lost), and
    the range's top end rises to allow for a lost one."""
    tracker = BatchTracker(clock=clock, lease=30.0)
    snap = tracker.create_batch([f"{i}.jpg" for i in range(300)])
    ids = [item.id for item in snap.items]
    _one_by_one(tracker, clock, snap.batch_id, ids[:20], 0.5)
    tracker.start_item(snap.batch_id, ids[20])
    shown: list[int] = []
    tops: list[int] = []
    for _ in range(12):  # 24 s, still within the 30 s lease
        clock.advance(2.0)
        got = tracker.get(snap.batch_id, items=False)
        assert got.estimated_time_remaining is not None
        assert got.eta_range is not None
        assert got.eta_range[0] <= got.estimated_time_remaining <= got.eta_range[1]
        shown.append(got.estimated_time_remaining)
        tops.append(got.eta_range[1])
    assert all(b <= a for a, b in itertools.pairwise(shown))
    assert tops[-1] > tops[0] + 10


@pytest.mark.parametrize("seed", [1, 2])
def test_between_finishes_the_eta_never_rises_on_a_bimodal_batch(
    clock: FakeClock, seed: int
) -> None:
    """One worker on short items with a long one now and then (1 in 20 takes 20-30 s):
    between two polls with no finish in between, the shown ETA never rises."""
    rng = random.Random(seed)
    durations = [
        rng.uniform(20.0, 30.0) if rng.random() < 0.05 else rng.uniform(0.3, 0.7)
        for _ in range(300)
    ]
    finishes = list(itertools.accumulate(durations, initial=clock()))[1:]
    polled: list[tuple[float, int]] = []

    def poll(now: float, eta: int | None, end: float) -> None:
        if eta is not None:
            polled.append((now, eta))

    _run(BatchTracker(clock=clock, lease=30.0), clock, durations, 1, poll)
    quiet = [
        (a, b)
        for (t0, a), (t1, b) in itertools.pairwise(polled)
        if not any(t0 < at <= t1 for at in finishes)
    ]
    assert len(quiet) > 100
    assert all(b <= a for a, b in quiet)


def test_long_items_whose_leases_are_renewed_are_not_taken_for_lost(clock: FakeClock) -> None:
    """Eight workers, and four of them on long items (25 s among items of half a
    second) whose leases they renew: however old those items get, they are alive, so
    while the other four keep finishing short items the shown ETA counts down instead of
    climbing poll after poll as if their workers were lost."""
    durations = [0.5] * 40 + [25.0] * 4 + [0.5] * 400
    polled: list[tuple[float, int]] = []

    def poll(now: float, eta: int | None, end: float) -> None:
        if eta is not None:
            polled.append((now, eta))

    start = clock()
    _run(BatchTracker(clock=clock, lease=30.0), clock, durations, 8, poll, beats=True)
    # The long items start at about 2.5 s and end at about 27.5 s.
    between = [eta for at, eta in polled if start + 6.0 <= at < start + 27.0]
    assert len(between) >= 10
    assert all(b <= a for a, b in itertools.pairwise(between)), between


def test_a_stall_that_lasts_still_raises_the_eta(clock: FakeClock) -> None:
    """Four workers that stop finishing anything (their items run on and on): the
    shown ETA does not count down forever but rises with its range's low end."""
    tracker = BatchTracker(clock=clock)
    snap = tracker.create_batch([f"{i}.jpg" for i in range(80)])
    ids = [item.id for item in snap.items]
    for round_ in range(10):  # 4 workers, items of half a second
        batch = ids[4 * round_ : 4 * round_ + 4]
        for item in batch:
            tracker.start_item(snap.batch_id, item)
        clock.advance(0.5)
        for item in batch:
            tracker.complete_item(snap.batch_id, item)
    for item in ids[40:44]:
        tracker.start_item(snap.batch_id, item)
    shown: list[int] = []
    for _ in range(10):
        clock.advance(2.0)
        eta = tracker.get(snap.batch_id, items=False).estimated_time_remaining
        assert eta is not None
        shown.append(eta)
    assert shown[-1] > shown[0] + 5
