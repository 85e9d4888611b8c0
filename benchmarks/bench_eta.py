"""ETA accuracy: batchtrack's estimate and range against the baselines, on simulated batches.

Each workload kind simulates batches on a fake clock: ``workers`` pull items in order,
each attempt's duration and outcome come from the kind, and every start, finish, failure,
retry and reclaim is fed to a real :class:`~batchtrack.BatchTracker`. The ETA is polled
every 2 simulated seconds, like the status page, and scored against the true remaining
time: the mean absolute percentage error over polls between 10% and 90% done, ignoring
polls with under 5 s truly left. Every estimate is scored as a user sees it, in whole
seconds: rounded to the nearest and at least 1 while the batch is unfinished (what
batchtrack's estimate is by contract); only the "batchtrack (unrounded)" column, kept to
show what rounding costs, is scored before rounding. The range is scored on the same
polls: how often it holds the true remaining time (the goal is 8 in 10) and its median
width, in % of the true remaining time. The baselines are scored on the same event
streams:

- ``avg x remaining``: mean duration of finished attempts x items not final (the original
  service's rule);
- ``avg x remaining / running``: the same divided by the number of items in progress;
- ``tqdm``: tqdm's estimator, an EMA (smoothing 0.3) of items and seconds per update,
  with its bias correction;
- ``rich``: rich's, the throughput over the last 30 seconds.

A baseline sees what such a tool sees: an update when an item becomes final (a failed
attempt that is retried is no progress), and, for the per-running rule, the items the
tracker shows in progress (a lost worker's item until it is reclaimed).

``SEEDS`` are the seeds the estimator was tuned on; ``HELD_OUT_SEEDS`` are for checking
that it was not fitted to them: ``python benchmarks/bench_eta.py --held-out``; any
other range with ``--seeds 100-119``.

Also here: the cost of the ETA in a memory-store event, in microseconds, measured side
by side with the same events with the ETA switched off.
"""

from __future__ import annotations

import gc
import heapq
import math
import random
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from batchtrack import BatchTracker, MemoryStore, _eta
from batchtrack.testing import FakeClock

POLL = 2.0
LEASE = 30.0  # the lease an item is given; a lost worker's item is reclaimed when it runs out
BEAT = LEASE / 3  # how often a worker renews the leases of its items (as the Orchestrator)
PAUSE = 60.0  # how long the workers stop in the "pause" kind
SETTLE = 60.0  # seconds after a change is over within which the range should narrow


class Event(NamedTuple):
    at: float
    kind: str  # "start" | "done" | "fail" | "retry" (failed, then back to pending)
    # | "requeue" (a lost worker's item reclaimed to pending) | "beat" (its lease renewed)
    item: int
    duration: float
    lease: float | None = None  # for "start" and "beat": seconds until the lease runs out


Attempt = Callable[[random.Random, int, int, int], tuple[float, str]]
"""Given the generator, the item's index, the batch size and how many times the item was
started before: the attempt's duration and outcome ("done", "fail", "retry" or "lost")."""


class Kind(NamedTuple):
    attempt: Attempt
    sizes: list[int]
    pause: bool = False  # every worker stops for PAUSE s when the middle item is due
    change: bool = False  # the number of workers changes when the middle item is due
    event: float | None = None  # the share of items done when something changes unannounced


def changed_workers(workers: int) -> int:
    """The concurrency after the change: 8 -> 2 (fewer), 1 -> 4 (more)."""
    return workers // 4 if workers >= 4 else workers * 4


def simulate(n: int, workers: int, kind: Kind, seed: int) -> list[Event]:
    """Workers pulling items in order; every event, in time order.

    A retried item goes to the back of the queue when its attempt fails; a lost worker
    is replaced at once, but its item stays in progress until its lease runs out.
    """
    rng = random.Random(seed)
    queue = deque(range(n))
    attempts = [0] * n
    free = [(0.0, w) for w in range(workers)]
    returns: list[tuple[float, int]] = []  # (when the item is back in the queue, item)
    events: list[Event] = []
    pause_until: float | None = None
    capacity: int | None = None
    while queue or returns:
        at, worker = heapq.heappop(free)
        while returns and returns[0][0] <= at:
            queue.append(heapq.heappop(returns)[1])
        if not queue:
            heapq.heappush(free, (returns[0][0], worker))
            continue
        i = queue[0]
        if kind.pause and i >= n // 2 and pause_until is None:
            pause_until = at + PAUSE
        if pause_until is not None and at < pause_until:
            heapq.heappush(free, (pause_until, worker))
            continue
        if kind.change and i >= n // 2 and capacity is None:
            capacity = changed_workers(workers)
            for extra in range(workers, capacity):
                heapq.heappush(free, (at, extra))
        if capacity is not None and worker >= capacity:
            continue  # this worker retires
        queue.popleft()
        d, outcome = kind.attempt(rng, i, n, attempts[i])
        attempts[i] += 1
        if outcome == "lost":
            lost_at = at + rng.uniform(0.1, 0.9) * d
            last = _beats(events, at, lost_at, i, d)
            events.append(Event(last + LEASE, "requeue", i, d))
            heapq.heappush(returns, (last + LEASE, i))
            heapq.heappush(free, (lost_at, worker))
            continue
        _beats(events, at, at + d, i, d)
        events.append(Event(at + d, outcome, i, d))
        if outcome == "retry":
            heapq.heappush(returns, (at + d, i))
        heapq.heappush(free, (at + d, worker))
    events.sort(key=lambda e: (e.at, e.kind == "start"))
    return events


def _beats(events: list[Event], start: float, until: float, item: int, d: float) -> float:
    """A start with a lease of :data:`LEASE` s, renewed every :data:`BEAT` s by its worker
    until ``until`` (its end, or the moment the worker is lost), as the Orchestrator
    does; the time of the last renewal (or of the start)."""
    events.append(Event(start, "start", item, d, LEASE))
    last = start
    while last + BEAT < until:
        last += BEAT
        events.append(Event(last, "beat", item, d, LEASE))
    return last


# -- workload kinds -------------------------------------------------------------------------


def _plain(durations: Callable[[random.Random, int, int], float]) -> Attempt:
    return lambda rng, i, n, tries: (durations(rng, i, n), "done")


def steady(rng: random.Random, i: int, n: int) -> float:
    return rng.uniform(0.8, 1.2)


def heavy_tailed(rng: random.Random, i: int, n: int) -> float:
    return rng.lognormvariate(0.0, 1.0)


def warm_up(rng: random.Random, i: int, n: int) -> float:
    return rng.uniform(0.8, 1.2) * (4.0 if i < n // 10 else 1.0)


def slow_down(rng: random.Random, i: int, n: int) -> float:
    return rng.uniform(0.8, 1.2) * (3.0 if i >= n // 2 else 1.0)


def fast(rng: random.Random, i: int, n: int) -> float:
    return rng.uniform(0.005, 0.015)


def bimodal(rng: random.Random, i: int, n: int) -> float:
    return rng.uniform(20.0, 30.0) if rng.random() < 0.05 else rng.uniform(0.3, 0.7)


def retried(rng: random.Random, i: int, n: int, tries: int) -> tuple[float, str]:
    """1 attempt in 10 fails after its full time and is retried (up to 2 retries)."""
    d = rng.uniform(0.8, 1.2)
    return d, "retry" if tries < 2 and rng.random() < 0.1 else "done"


def lost(rng: random.Random, i: int, n: int, tries: int) -> tuple[float, str]:
    """1 attempt in 20 loses its worker partway; the item is reclaimed LEASE s later."""
    d = rng.uniform(0.8, 1.2)
    return d, "lost" if tries < 2 and rng.random() < 0.05 else "done"


def fail_fast(rng: random.Random, i: int, n: int, tries: int) -> tuple[float, str]:
    """8 items in 10 fail in a blink (bad input); the rest take 2-4 s."""
    if rng.random() < 0.8:
        return rng.uniform(0.02, 0.1), "fail"
    return rng.uniform(2.0, 4.0), "done"


KINDS: dict[str, Kind] = {
    "steady": Kind(_plain(steady), [200, 600]),
    "heavy-tailed": Kind(_plain(heavy_tailed), [200, 600]),
    "warm-up": Kind(_plain(warm_up), [200, 600], event=0.1),
    "slow-down": Kind(_plain(slow_down), [200, 600], event=0.5),
    "fast items": Kind(_plain(fast), [20_000, 60_000]),
    "bimodal": Kind(_plain(bimodal), [300, 900]),
    "retried failures": Kind(retried, [200, 600]),
    "lost workers": Kind(lost, [200, 600]),
    "pause": Kind(_plain(steady), [200, 600], pause=True, event=0.5),
    "concurrency change": Kind(_plain(steady), [200, 600], change=True, event=0.5),
    "mostly fail fast": Kind(fail_fast, [500, 1500]),
}
CONCURRENCY = [1, 8]
SEEDS = [1, 2, 3]  # what the estimator was tuned on
HELD_OUT_SEEDS = list(range(4, 14))  # never looked at while tuning


# -- estimators -------------------------------------------------------------------------------


class Estimator:
    """Sees the event stream as it happens; answers an ETA at poll times."""

    name = ""
    unrounded = False  # scored before rounding to whole seconds (a diagnostic column)

    def __init__(self, n: int) -> None:
        self.n = n
        self.final = 0  # items completed or failed for good
        self.running = 0

    def see(self, event: Event) -> None:
        if event.kind == "beat":
            return
        if event.kind == "start":
            self.running += 1
        elif event.kind == "requeue":
            self.running -= 1
        else:
            self.running -= 1
            self.final += event.kind != "retry"

    def eta(self, now: float) -> float | None:
        raise NotImplementedError

    def range(self, now: float) -> tuple[float, float] | None:
        return None


class Ours(Estimator):
    name = "batchtrack"

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.clock = FakeClock(0.0)
        self.tracker = BatchTracker(clock=self.clock, max_attempts=1_000)
        snap = self.tracker.create_batch([(str(i), f"{i}.jpg") for i in range(n)])
        self.batch = snap.batch_id
        self.snap = snap

    def see(self, event: Event) -> None:
        self.clock.now = event.at
        tracker, batch, item = self.tracker, self.batch, str(event.item)
        if event.kind == "beat":
            tracker.heartbeat(batch, item, lease=event.lease)
        elif event.kind == "start":
            tracker.start_item(batch, item, lease=event.lease)
        elif event.kind == "done":
            tracker.complete_item(batch, item)
        elif event.kind == "fail":
            tracker.fail_item(batch, item, "broken")
        elif event.kind == "retry":
            tracker.fail_item(batch, item, "broken")
            tracker.retry(batch, [item])
        else:
            assert tracker.reclaim() == 1

    def eta(self, now: float) -> float | None:
        self.clock.now = now
        self.snap = self.tracker.get(self.batch, items=False)
        value = self.snap.estimated_time_remaining
        return None if value is None else float(value)

    def range(self, now: float) -> tuple[float, float] | None:
        return self.snap.eta_range  # of the snapshot eta() just read


class OursUnrounded(Ours):
    """Our estimate before rounding to whole seconds."""

    name = "batchtrack (unrounded)"
    unrounded = True

    def eta(self, now: float) -> float | None:
        self.clock.now = now
        record = self.tracker.store.load(self.batch, items=False)
        assert record is not None
        self.record = record
        self.leases = self.tracker._lost_in(record, now)  # lost and quiet, as get() reads
        return _eta.seconds_remaining(
            record.progress, record.created_at, record.stats, now, *self.leases
        )

    def range(self, now: float) -> tuple[float, float] | None:
        record = self.record  # of the poll eta() just read
        return _eta.span_remaining(
            record.progress, record.created_at, record.stats, now, *self.leases
        )


class AverageDuration(Estimator):
    name = "avg x remaining"

    def __init__(self, n: int, *, per_running: bool = False) -> None:
        super().__init__(n)
        self.total = 0.0
        self.attempts = 0
        self.per_running = per_running
        if per_running:
            self.name = "avg x remaining / running"

    def see(self, event: Event) -> None:
        super().see(event)
        if event.kind in ("done", "fail", "retry"):
            self.total += event.duration
            self.attempts += 1

    def eta(self, now: float) -> float | None:
        if not self.final:
            return None
        value = self.total / self.attempts * (self.n - self.final)
        if self.per_running:
            value /= max(self.running, 1)
        return value


class Tqdm(Estimator):
    """tqdm's EMA: ``EMA(dn) / EMA(dt)`` with smoothing 0.3 and bias correction."""

    name = "tqdm"
    alpha = 0.3

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.last: float | None = None
        self.dn = [0.0, 0]  # value, calls
        self.dt = [0.0, 0]

    def _ema(self, state: list[float], x: float) -> None:
        state[0] = self.alpha * x + (1 - self.alpha) * state[0]
        state[1] += 1

    @staticmethod
    def _value(state: list[float], alpha: float) -> float:
        return state[0] / (1 - (1 - alpha) ** state[1]) if state[1] else 0.0

    def see(self, event: Event) -> None:
        before = self.final
        super().see(event)
        if event.kind == "start" and self.last is None:
            self.last = event.at
        if self.final > before:
            assert self.last is not None
            self._ema(self.dn, 1.0)
            self._ema(self.dt, event.at - self.last)
            self.last = event.at

    def eta(self, now: float) -> float | None:
        dt = self._value(self.dt, self.alpha)
        if not self.final or dt <= 0:
            return None
        rate = self._value(self.dn, self.alpha) / dt
        return (self.n - self.final) / rate


class Rich(Estimator):
    """rich's: completed over the last 30 s of samples, divided by their time span."""

    name = "rich"
    window = 30.0

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.samples: deque[tuple[float, int]] = deque()

    def see(self, event: Event) -> None:
        before = self.final
        super().see(event)
        if self.final > before:
            self.samples.append((event.at, 1))
            while self.samples and self.samples[0][0] < event.at - self.window:
                self.samples.popleft()

    def eta(self, now: float) -> float | None:
        if len(self.samples) < 2:
            return None
        span = self.samples[-1][0] - self.samples[0][0]
        if span <= 0:
            return None
        speed = sum(c for _, c in list(self.samples)[1:]) / span
        return (self.n - self.final) / speed


ESTIMATORS: list[Callable[[int], Estimator]] = [
    Ours,
    OursUnrounded,
    AverageDuration,
    lambda n: AverageDuration(n, per_running=True),
    Tqdm,
    Rich,
]
BASELINES = ["avg x remaining", "avg x remaining / running", "tqdm", "rich"]


# -- scoring ----------------------------------------------------------------------------------


class Score(NamedTuple):
    error: float  # MAPE, %
    jump: float  # mean move between consecutive polls, s
    coverage: float  # % of polls whose range holds the truth (nan without a range)
    width: float  # median range width, % of the truth (nan without a range)
    before: float = math.nan  # coverage of the polls before the kind's event
    after: float = math.nan  # and after it
    rises: float = math.nan  # % of polls whose shown estimate rose since the previous one
    unsteady: float = math.nan  # mean |shown - (previous shown - 2 s)|, % of the truth
    width_after: float = math.nan  # median range width in the minute after the change is
    # over, % of the truth
    width_settled: float = math.nan  # and from then on
    rose: int = 0  # polls whose shown estimate rose since the previous one
    compared: int = 0  # polls compared with the previous one
    needless: float = math.nan  # % of polls whose shown estimate rose away from the truth:
    # further from it than the steady countdown (previous shown - 2 s) would have been


def shown(value: float | None) -> float | None:
    """An estimate as a status page shows it: whole seconds, rounded to the nearest, at
    least 1 (0 would mean finished, and every scored poll is of an unfinished batch)."""
    if value is None or math.isinf(value) or math.isnan(value):
        return None
    return float(max(1, round(value)))


def polls(events: list[Event]) -> Iterator[tuple[float, list[Event]]]:
    """(poll time, events since the previous poll)."""
    end = events[-1].at
    i, t = 0, 0.0
    while t < end:
        batch: list[Event] = []
        while i < len(events) and events[i].at <= t:
            batch.append(events[i])
            i += 1
        yield t, batch
        t += POLL


def score(
    events: list[Event],
    n: int,
    make: Callable[[int], Estimator],
    change: float | None = None,
    settle: float = 0.0,
) -> Score:
    """How one estimator does on one event stream; with ``change`` (the share of items
    done when something changes unannounced), its coverage before and after, and the
    median width of its range in the :data:`SETTLE` seconds from ``settle`` seconds after
    the change on (when the change is over), and from then on."""
    estimator = make(n)
    end = max(e.at for e in events if e.kind in ("done", "fail"))
    errors: list[float] = []
    jumps: list[float] = []
    rises: list[bool] = []
    needless: list[bool] = []
    unsteady: list[float] = []
    held: list[bool] = []
    phases: list[bool] = []  # after the event
    widths: list[float] = []
    later: list[float] = []  # widths in the minute after the change is over
    settled: list[float] = []  # and after that minute
    changed_at: float | None = None
    previous: float | None = None
    done = 0
    for t, batch in polls(events):
        for event in batch:
            estimator.see(event)
            done += event.kind in ("done", "fail")
        if changed_at is None and change is not None and done >= change * n:
            changed_at = t
        truth = end - t
        if not 0.1 * n <= done <= 0.9 * n or truth < 5.0:
            previous = None
            continue
        eta = estimator.eta(t)
        if not estimator.unrounded:
            eta = shown(eta)
        value = 1e6 if eta is None or math.isinf(eta) else eta
        errors.append(abs(value - truth) / truth)
        if previous is not None:
            jumps.append(abs(value - previous + POLL))  # a perfect estimate falls by 2 s
            rises.append(value > previous)
            needless.append(value > previous and abs(value - truth) > abs(previous - POLL - truth))
            unsteady.append(abs(value - previous + POLL) / truth)
        previous = value
        span = estimator.range(t)
        if span is not None:
            held.append(span[0] <= truth <= span[1])
            phases.append(change is not None and done >= change * n)
            widths.append((span[1] - span[0]) / truth)
            if changed_at is not None and t >= changed_at + settle:
                (later if t < changed_at + settle + SETTLE else settled).append(widths[-1])
    if not errors:
        return Score(math.nan, math.nan, math.nan, math.nan)

    def share(after: bool) -> float:
        chosen = [h for h, p in zip(held, phases, strict=True) if p is after]
        return 100 * statistics.fmean(chosen) if chosen and change is not None else math.nan

    return Score(
        100 * statistics.fmean(errors),
        statistics.fmean(jumps) if jumps else 0.0,
        100 * statistics.fmean(held) if held else math.nan,
        100 * statistics.median(widths) if widths else math.nan,
        share(False),
        share(True),
        100 * statistics.fmean(rises) if rises else math.nan,
        100 * statistics.fmean(unsteady) if unsteady else math.nan,
        100 * statistics.median(later) if later else math.nan,
        100 * statistics.median(settled) if settled else math.nan,
        sum(rises),
        len(rises),
        100 * statistics.fmean(needless) if needless else math.nan,
    )


def table(quick: bool = False, seeds: list[int] | None = None) -> dict[str, dict[str, Score]]:
    """Scores per kind (all sizes, concurrency levels and seeds pooled) per estimator.

    Errors and coverage are means over the runs; the width is the median of the runs'
    medians.
    """
    results: dict[str, dict[str, Score]] = {}
    if seeds is None:
        seeds = SEEDS[:1] if quick else SEEDS
    for kind_name, kind in KINDS.items():
        per: dict[str, list[Score]] = {}
        for n in kind.sizes[:1] if quick else kind.sizes:
            for workers in CONCURRENCY:
                for seed in seeds:
                    events = simulate(n, workers, kind, seed)
                    settle = PAUSE if kind.pause else 0.0  # when the change is over
                    for make in ESTIMATORS:
                        name = make(1).name
                        per.setdefault(name, []).append(score(events, n, make, kind.event, settle))
        results[kind_name] = {
            name: Score(
                statistics.fmean(s.error for s in scores),
                statistics.fmean(s.jump for s in scores),
                statistics.fmean(s.coverage for s in scores),
                statistics.median(s.width for s in scores),
                _mean_known(s.before for s in scores),
                _mean_known(s.after for s in scores),
                _mean_known(s.rises for s in scores),
                _mean_known(s.unsteady for s in scores),
                _median_known(s.width_after for s in scores),
                _median_known(s.width_settled for s in scores),
                sum(s.rose for s in scores),
                sum(s.compared for s in scores),
                _mean_known(s.needless for s in scores),
            )
            for name, scores in per.items()
        }
    return results


def _mean_known(values: Iterable[float]) -> float:
    """The mean of the values that are not nan (a run may have no poll before an event)."""
    known = [v for v in values if not math.isnan(v)]
    return statistics.fmean(known) if known else math.nan


def _median_known(values: Iterable[float]) -> float:
    """The median of the values that are not nan."""
    known = [v for v in values if not math.isnan(v)]
    return statistics.median(known) if known else math.nan


def steadiness(quick: bool = False) -> float:
    """Mean jump (s) of our estimate between polls 2 s apart, on steady workloads."""
    jumps = []
    for workers in CONCURRENCY:
        for seed in SEEDS[:1] if quick else SEEDS:
            jumps.append(score(simulate(300, workers, KINDS["steady"], seed), 300, Ours).jump)
    return statistics.fmean(jumps)


def report(quick: bool = False, seeds: list[int] | None = None) -> str:
    results = table(quick, seeds)
    names = list(next(iter(results.values())))
    width = max(len(k) for k in results) + 2
    lines = [
        f"seeds: {seeds or (SEEDS[:1] if quick else SEEDS)}",
        "MAPE (%) of the ETA in whole seconds, polls between 10% and 90% done (lower is better)",
        " " * width + "".join(f"{name:>24}" for name in names),
    ]
    for kind, row in results.items():
        lines.append(f"{kind:<{width}}" + "".join(f"{row[n].error:>24.1f}" for n in names))
    means = {n: statistics.fmean(row[n].error for row in results.values()) for n in names}
    lines.append(f"{'mean':<{width}}" + "".join(f"{means[n]:>24.1f}" for n in names))
    lines += [
        "",
        "steadiness: % of polls whose shown ETA rose since the previous poll, and the mean",
        "jump away from a steady countdown, |shown - (previous shown - 2 s)|, % of the truth",
        " " * width + "".join(f"{name:>24}" for name in names),
    ]
    for kind, row in results.items():
        lines.append(
            f"{kind:<{width}}"
            + "".join(f"{f'{row[n].rises:.0f}% / {row[n].unsteady:.1f}%':>24}" for n in names)
        )
    lines += [
        "",
        "rises over all scored polls together (the share above is each run's, averaged:",
        "a short run's rise weighs more), % of polls",
        " " * width + "".join(f"{name:>24}" for name in names),
    ]
    for kind, row in results.items():
        lines.append(
            f"{kind:<{width}}"
            + "".join(f"{100 * row[n].rose / max(row[n].compared, 1):>23.1f}%" for n in names)
        )
    lines += [
        "",
        "rises away from the truth: % of polls whose shown ETA rose and ended further from the",
        "true time left than a steady countdown would have (a rise that corrects an estimate",
        "below the truth is not counted)",
        " " * width + "".join(f"{name:>24}" for name in names),
    ]
    for kind, row in results.items():
        lines.append(f"{kind:<{width}}" + "".join(f"{row[n].needless:>23.1f}%" for n in names))
    lines += [
        "",
        "batchtrack against the best baseline of each kind; its 80% range",
        f"{'':<{width}}{'ours':>7}{'best baseline':>36}{'ratio':>7}{'held':>7}{'width':>7}"
        f"{'held¹':>7}{'width¹':>7}",
    ]
    for kind, row in results.items():
        best = min(BASELINES, key=lambda n: row[n].error)
        ours = row["batchtrack"]
        raw = row["batchtrack (unrounded)"]
        lines.append(
            f"{kind:<{width}}{ours.error:>7.1f}{best:>29}{row[best].error:>7.1f}"
            f"{ours.error / row[best].error:>7.2f}{ours.coverage:>6.0f}%{ours.width:>6.0f}%"
            f"{raw.coverage:>6.0f}%{raw.width:>6.0f}%"
        )
    lines.append(
        "(held: % of polls whose range holds the true time left; width: median width, "
        "% of the true time left;\n ¹ the range before its ends are rounded down and up to "
        "whole seconds)"
    )
    lines += [
        "",
        "where something changes that nothing announced: % of polls held before and after it;",
        f"median width in the first {SETTLE:.0f} s after the change is over (a pause's end),",
        "and from then on, % of the true time left",
        f"{'':<{width}}{'before':>8}{'after':>8}{'width':>8}{'then':>8}",
    ]
    for kind, row in results.items():
        if KINDS[kind].event is not None:
            ours = row["batchtrack"]
            before = "—" if math.isnan(ours.before) else f"{ours.before:.0f}%"
            lines.append(
                f"{kind:<{width}}{before:>8}{ours.after:>7.0f}%{ours.width_after:>7.0f}%"
                f"{ours.width_settled:>7.0f}%"
            )
    lines.append(f"mean jump between polls on steady workloads: {steadiness(quick):.2f} s")
    return "\n".join(lines)


# -- cost ---------------------------------------------------------------------------------------


def _no_estimate(*args: object) -> tuple[None, None]:
    return None, None


def _no_stats(*args: object) -> dict[object, object]:
    return {}


def _no_sums(*args: object) -> None:
    return None


def event_cost(quick: bool = False) -> str:
    """Microseconds per memory-store event (start or complete), with the ETA, without its
    estimate, and without its estimate and stats: interleaved rounds, medians."""
    n = 500 if quick else 2000
    ids = [str(i) for i in range(n)]
    # The memory store sums a start's or finish's stats itself (_eta.added).
    real = (_eta.estimate, _eta.stats_for, _eta.added)
    variants = {
        "full event": real,
        "without the estimate": (_no_estimate, real[1], real[2]),
        "without estimate or stats": (_no_estimate, _no_stats, _no_sums),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    store = MemoryStore()
    try:
        for _ in range(5 if quick else 21):
            for name, (estimate, stats_for, added) in variants.items():
                _eta.estimate, _eta.stats_for = estimate, stats_for  # type: ignore[assignment]
                _eta.added = added  # type: ignore[assignment]
                tracker = BatchTracker(store)
                batch = tracker.create_batch([(i, f"{i}.jpg") for i in ids]).batch_id
                gc.collect()
                start = time.perf_counter()
                for i in ids:
                    tracker.start_item(batch, i)
                    tracker.complete_item(batch, i)
                times[name].append((time.perf_counter() - start) / (2 * n) * 1e6)
                tracker.delete(batch)
    finally:
        _eta.estimate, _eta.stats_for, _eta.added = real
    medians = {name: statistics.median(v) for name, v in times.items()}
    full = medians["full event"]
    return "\n".join(
        ["µs per memory-store event (start or complete), median of interleaved rounds:"]
        + [f"  {name:<28}{value:6.2f} µs" for name, value in medians.items()]
        + [f"  the ETA's share: {full - medians['without estimate or stats']:.2f} µs"]
    )


def run(quick: bool = False) -> list[object]:
    print(report(quick))
    print(event_cost(quick))
    return []


if __name__ == "__main__":
    import sys

    if "--held-out" in sys.argv[1:]:
        print(report(seeds=HELD_OUT_SEEDS))
    elif "--seeds" in sys.argv[1:]:  # e.g. --seeds 100-119: seeds nobody has looked at
        first, _, last = sys.argv[sys.argv.index("--seeds") + 1].partition("-")
        print(report(seeds=list(range(int(first), int(last or first) + 1))))
    else:
        print(report())
        print(event_cost())
