"""ETA accuracy: batchtrack's estimate against the baselines, on simulated batches.

Each workload kind simulates batches on a fake clock: ``workers`` pull items in order,
item durations come from a distribution, and every start and finish is fed to a real
:class:`~batchtrack.BatchTracker`. The ETA is polled every 2 simulated seconds, like the
status page, and scored against the true remaining time: the mean absolute percentage
error over polls between 10% and 90% done, ignoring polls with under 5 s truly left.
The baselines are scored on the same event streams:

- ``avg x remaining``: mean duration of finished items x items not finished (the original
  service's rule);
- ``avg x remaining / running``: the same divided by the number of items in progress;
- ``tqdm``: tqdm's estimator, an EMA (smoothing 0.3) of items and seconds per update,
  with its bias correction;
- ``rich``: rich's, the throughput over the last 30 seconds.
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
from collections import deque
from collections.abc import Callable, Iterator
from typing import NamedTuple

from batchtrack import BatchTracker, _eta
from batchtrack.testing import FakeClock

POLL = 2.0


class Event(NamedTuple):
    at: float
    kind: str  # "start" | "done"
    item: int
    duration: float


Durations = Callable[[random.Random, int, int], float]
"""Given the generator, the item's index and the batch size: the item's duration."""


def simulate(n: int, workers: int, durations: Durations, seed: int) -> list[Event]:
    """Workers pulling items in order; every start and finish, in time order."""
    rng = random.Random(seed)
    free = [(0.0, w) for w in range(workers)]
    events: list[Event] = []
    for i in range(n):
        at, w = heapq.heappop(free)
        d = durations(rng, i, n)
        events.append(Event(at, "start", i, d))
        events.append(Event(at + d, "done", i, d))
        heapq.heappush(free, (at + d, w))
    events.sort(key=lambda e: (e.at, e.kind == "start"))
    return events


# -- workload kinds -------------------------------------------------------------------------


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


KINDS: dict[str, tuple[Durations, list[int]]] = {
    "steady": (steady, [200, 600]),
    "heavy-tailed": (heavy_tailed, [200, 600]),
    "warm-up": (warm_up, [200, 600]),
    "slow-down": (slow_down, [200, 600]),
    "fast items": (fast, [20_000, 60_000]),
    "bimodal": (bimodal, [300, 900]),
}
CONCURRENCY = [1, 8]
SEEDS = [1, 2, 3]


# -- estimators -------------------------------------------------------------------------------


class Estimator:
    """Sees the event stream as it happens; answers an ETA at poll times."""

    name = ""

    def __init__(self, n: int) -> None:
        self.n = n
        self.done = 0
        self.running = 0

    def start(self, event: Event) -> None:
        self.running += 1

    def finish(self, event: Event) -> None:
        self.running -= 1
        self.done += 1

    def eta(self, now: float) -> float | None:
        raise NotImplementedError


class Ours(Estimator):
    name = "batchtrack"

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.clock = FakeClock(0.0)
        self.tracker = BatchTracker(clock=self.clock)
        self.batch = self.tracker.create_batch([(str(i), f"{i}.jpg") for i in range(n)]).batch_id

    def start(self, event: Event) -> None:
        self.clock.now = event.at
        self.tracker.start_item(self.batch, str(event.item))

    def finish(self, event: Event) -> None:
        self.clock.now = event.at
        self.tracker.complete_item(self.batch, str(event.item))

    def eta(self, now: float) -> float | None:
        self.clock.now = now
        value = self.tracker.get(self.batch, items=False).estimated_time_remaining
        return None if value is None else float(value)


class OursUnrounded(Ours):
    """Our estimate before the contract's rounding up to whole seconds."""

    name = "batchtrack (unrounded)"

    def eta(self, now: float) -> float | None:
        self.clock.now = now
        snap = self.tracker.store.load(self.batch, items=False)
        assert snap is not None
        return _eta.seconds_remaining(snap.progress, snap.created_at, snap.stats, now)


class AverageDuration(Estimator):
    name = "avg x remaining"

    def __init__(self, n: int, *, per_running: bool = False) -> None:
        super().__init__(n)
        self.total = 0.0
        self.per_running = per_running
        if per_running:
            self.name = "avg x remaining / running"

    def finish(self, event: Event) -> None:
        super().finish(event)
        self.total += event.duration

    def eta(self, now: float) -> float | None:
        if not self.done:
            return None
        value = self.total / self.done * (self.n - self.done)
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

    def start(self, event: Event) -> None:
        super().start(event)
        if self.last is None:
            self.last = event.at

    def finish(self, event: Event) -> None:
        super().finish(event)
        assert self.last is not None
        self._ema(self.dn, 1.0)
        self._ema(self.dt, event.at - self.last)
        self.last = event.at

    def eta(self, now: float) -> float | None:
        dt = self._value(self.dt, self.alpha)
        if not self.done or dt <= 0:
            return None
        rate = self._value(self.dn, self.alpha) / dt
        return (self.n - self.done) / rate


class Rich(Estimator):
    """rich's: completed over the last 30 s of samples, divided by their time span."""

    name = "rich"
    window = 30.0

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.samples: deque[tuple[float, int]] = deque()

    def finish(self, event: Event) -> None:
        super().finish(event)
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
        return (self.n - self.done) / speed


ESTIMATORS: list[Callable[[int], Estimator]] = [
    Ours,
    OursUnrounded,
    AverageDuration,
    lambda n: AverageDuration(n, per_running=True),
    Tqdm,
    Rich,
]


# -- scoring ----------------------------------------------------------------------------------


def polls(events: list[Event]) -> Iterator[tuple[float, int, list[Event]]]:
    """(poll time, items done by then, events since the previous poll)."""
    end = events[-1].at
    i, done, t = 0, 0, 0.0
    while t < end:
        batch: list[Event] = []
        while i < len(events) and events[i].at <= t:
            batch.append(events[i])
            done += events[i].kind == "done"
            i += 1
        yield t, done, batch
        t += POLL


def score(events: list[Event], n: int, make: Callable[[int], Estimator]) -> tuple[float, float]:
    """(MAPE in %, mean jump between consecutive polls in seconds) of one estimator."""
    estimator = make(n)
    end = events[-1].at
    errors: list[float] = []
    jumps: list[float] = []
    previous: float | None = None
    for t, done, batch in polls(events):
        for event in batch:
            (estimator.start if event.kind == "start" else estimator.finish)(event)
        truth = end - t
        if not 0.1 * n <= done <= 0.9 * n or truth < 5.0:
            previous = None
            continue
        eta = estimator.eta(t)
        value = 1e6 if eta is None or math.isinf(eta) else eta
        errors.append(abs(value - truth) / truth)
        if previous is not None:
            jumps.append(abs(value - previous + POLL))  # a perfect estimate falls by 2 s
        previous = value
    if not errors:
        return math.nan, math.nan
    return 100 * statistics.fmean(errors), statistics.fmean(jumps) if jumps else 0.0


def table(quick: bool = False) -> dict[str, dict[str, float]]:
    """MAPE per kind (all sizes, concurrency levels and seeds pooled) per estimator."""
    results: dict[str, dict[str, float]] = {}
    seeds = SEEDS[:1] if quick else SEEDS
    for kind, (durations, sizes) in KINDS.items():
        per: dict[str, list[float]] = {}
        for n in sizes[:1] if quick else sizes:
            for workers in CONCURRENCY:
                for seed in seeds:
                    events = simulate(n, workers, durations, seed)
                    for make in ESTIMATORS:
                        name = make(1).name
                        per.setdefault(name, []).append(score(events, n, make)[0])
        results[kind] = {name: statistics.fmean(v) for name, v in per.items()}
    return results


def steadiness(quick: bool = False) -> float:
    """Mean jump (s) of our estimate between polls 2 s apart, on steady workloads."""
    jumps = []
    for workers in CONCURRENCY:
        for seed in SEEDS[:1] if quick else SEEDS:
            jumps.append(score(simulate(300, workers, steady, seed), 300, Ours)[1])
    return statistics.fmean(jumps)


def report(quick: bool = False) -> str:
    results = table(quick)
    names = list(next(iter(results.values())))
    width = max(len(k) for k in results) + 2
    lines = [
        "MAPE (%) of the ETA, polls between 10% and 90% done (lower is better)",
        " " * width + "".join(f"{name:>24}" for name in names),
    ]
    for kind, row in results.items():
        lines.append(f"{kind:<{width}}" + "".join(f"{row[name]:>24.1f}" for name in names))
    means = {name: statistics.fmean(row[name] for row in results.values()) for name in names}
    lines.append(f"{'mean':<{width}}" + "".join(f"{means[name]:>24.1f}" for name in names))
    lines.append(f"mean jump between polls on steady workloads: {steadiness(quick):.2f} s")
    return "\n".join(lines)


def run(quick: bool = False) -> list[object]:
    print(report(quick))
    return []


if __name__ == "__main__":
    print(report())
