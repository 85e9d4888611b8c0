"""Side-by-side timing: run two workloads interleaved and report the ratio of medians.

The machine is shared and noisy, so a lone absolute time means little. Each comparison
alternates the two workloads many times (A, B, A, B, ...) so that both see the same
conditions, and reports the ratio of their median times.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import attrs

Workload = Callable[[], object]


@attrs.frozen
class Comparison:
    """The result of timing ``ours`` against ``baseline`` in one run."""

    name: str
    ours: float
    baseline: float
    goal: str
    passed: bool

    @property
    def ratio(self) -> float:
        """ours / baseline: below 1 means ours is faster."""
        return self.ours / self.baseline

    def line(self) -> str:
        verdict = "ok" if self.passed else "MISSED"
        return (
            f"{self.name:<58} ratio {self.ratio:7.3f}  "
            f"(ours {self.ours * 1e3:9.3f} ms, base {self.baseline * 1e3:9.3f} ms)  "
            f"goal {self.goal:<10} {verdict}"
        )


def _time(fn: Workload) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(
    name: str,
    ours: Workload,
    baseline: Workload,
    *,
    goal: float,
    rounds: int = 15,
    setup: Callable[[], None] | None = None,
) -> Comparison:
    """Time ``ours`` and ``baseline`` interleaved; pass when ours/baseline <= goal.

    Args:
        name: What is compared.
        ours: The batchtrack workload.
        baseline: The reference workload doing the same job.
        goal: The largest acceptable ratio ours/baseline.
        rounds: How many times each runs (the median is kept).
        setup: Called before every single run, untimed.
    """
    a: list[float] = []
    b: list[float] = []
    gc.collect()
    for i in range(rounds):
        order = (ours, baseline) if i % 2 == 0 else (baseline, ours)
        for fn in order:
            if setup is not None:
                setup()
            elapsed = _time(fn)
            (a if fn is ours else b).append(elapsed)
    ours_t, base_t = statistics.median(a), statistics.median(b)
    return Comparison(name, ours_t, base_t, f"<= {goal:g}", ours_t / base_t <= goal)
