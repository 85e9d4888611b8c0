"""The ETA: how many seconds a batch still needs, and how sure that is.

All of the estimate lives here. With every transition the tracker asks
:func:`stats_for` what to add to the batch's stored stats; the store adds the numbers
atomically, so concurrent workers on many hosts never lose a contribution and the result
does not depend on the order they arrive in. :func:`estimate` turns counts and stats into
seconds and an 80% range. Everything is deterministic given the event times.

How the estimate works
----------------------
Durations of items that finished after processing are kept as power sums weighted by
when the item finished: ``sum(t**k)``, ``sum(t**k * d)`` and ``sum(t**k * d**2)`` with
``t`` the finish time since the batch was created, for k in :data:`_KS`, and
``sum(t**(2k))`` for each window's effective number of items (11 sums in all). The
weight ``t**k`` looks back over roughly the last ``1 / (k + 1)`` of the batch's life:
k = 0 is the whole batch, the largest k its most recent stretch. The windows precise
enough to be trusted (relative standard error at most :data:`_TRUSTED`) are blended,
each weighted by one over its mean squared error: its variance, plus its squared
distance from the most recent trusted window beyond :data:`_AGREE` standard errors of
that one (a bias; closer than that it is noise). A steady or merely noisy batch thus
keeps the whole-batch mean, one that really sped up or slowed down moves to the recent
window within a few items.

From the blended mean ``m`` and variance ``v`` of durations:

* each running item still needs ``(m**2 + v) / (2 m)`` on average: the mean residual of
  a renewal process, which is what an item seen at a random moment of its run has left
  (half an item when all take the same time, more when a few long ones dominate);
* remaining work = pending items x ``m`` (times attempts per finished item, when failed
  attempts were retried) + running items x that residual, shared by the workers busy
  now. Workers are the running items, unless the work finished lately shows fewer
  working (``(k + 1) sum(t**k d) / T**(k + 1)`` is a window's busy workers): items left
  processing by lost workers do not count until reclaimed. While none runs (a pause),
  the batch's mean concurrency so far;
* the batch ends when its last worker does, not its average one: add the expected lead
  of the last of ``r`` workers over their mean, ``residual x (r - 1) / (r + 1)``.

The range is the unrounded estimate times ``exp(-z s)`` and ``exp(+z s)`` (z = 1.28 for
8 in 10), ``s**2`` the relative variance from: the pending items' own spread
(``cv**2 / pending``), the blended mean's standard error and the windows' disagreement
(a trend the estimate may not have caught up with), one residual, and a share that
grows with how far ahead it looks compared with the history it has seen.
``benchmarks/bench_eta.py`` scores both against the usual estimators.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

from ._models import Progress, Status

__all__ = ["estimate", "seconds_remaining", "stats_for"]

_KS = (0, 2, 16)  # the windows' powers; t**32 stays finite for t up to 1e9 s
_TRUSTED = 0.4  # largest relative standard error of a window we believe
_AGREE = 2.0  # how many standard errors of the recent window a bias must exceed
_Z = 1.2816  # the 90th percentile of the standard normal: 8 in 10 between -z and +z
_HORIZON = 0.0015  # relative variance per unit of (time ahead / time seen)
_TREND = 0.5  # how much of the windows' disagreement counts as uncertainty
_IDLE = 1.5  # running items beyond this many times the busy workers are not running

_NO_STATS: Mapping[Status, Mapping[str, tuple[float, int]]] = {}
# Per window: the names of its weight, duration and squared-duration sums, and of the
# sum of squared weights (t**(2k)).
_WINDOWS = tuple((f"w{k}", f"d{k}", f"q{k}", f"w{2 * k}", k + 1) for k in _KS)


def stats_for(
    target: Status, at: float, origin: float
) -> Mapping[Status, Mapping[str, tuple[float, int]]]:
    """What a transition to ``target`` at ``at`` adds to the batch's stats.

    Only an item that finishes after processing contributes (an item cancelled while
    pending did no work): its finish time's powers ``t**k`` (``w``), and the same times
    its duration (``d``) and squared duration (``q``), the duration being the seconds
    the store measures since the item started.

    Args:
        target: The item's new status.
        at: When the transition happens.
        origin: When the batch was created.
    """
    if target is not Status.COMPLETED and target is not Status.FAILED:
        return _NO_STATS
    t = max(at - origin, 0.0)
    p2 = t * t
    p4 = p2 * p2
    p16 = p4 * p4
    p16 *= p16
    return {
        Status.PROCESSING: {
            "w0": (1.0, 0),
            "w2": (p2, 0),
            "w4": (p4, 0),
            "w16": (p16, 0),
            "w32": (p16 * p16, 0),
            "d0": (1.0, 1),
            "d2": (p2, 1),
            "d16": (p16, 1),
            "q0": (1.0, 2),
            "q2": (p2, 2),
            "q16": (p16, 2),
        }
    }


# The durations model of a batch, a pure function of its stats: memoised on the exact
# stats (every name and value, in the store's order), so two batches share an entry only
# when their stats are equal. Stats change only when an item finishes, while the
# estimate is also wanted at every start and every read.
class _Model(NamedTuple):
    mean: float  # item duration
    residual: float  # what a running item still needs, on average
    cv2: float  # relative variance of item durations
    uncertainty: float  # relative variance of the mean: standard error and trend
    finished: float  # attempts that ended after processing (sum(t**0))
    busy: tuple[tuple[float, int], ...]  # per window: (k + 1) * sum(t**k * d), k + 1


_memo: dict[tuple[object, ...], _Model | None] = {}


def _model(stats: Mapping[str, float]) -> _Model | None:
    key = (*stats, *stats.values())
    model = _memo.get(key, _memo)
    if model is _memo:
        if len(_memo) >= 4096:
            _memo.clear()
        model = _memo[key] = _fit(stats)
    return model  # type: ignore[return-value]


def _fit(stats: Mapping[str, float]) -> _Model | None:
    """The durations model over the trusted windows, blended as described above."""
    get = stats.get
    means: list[float] = []
    variances: list[float] = []
    errors: list[float] = []  # squared standard errors
    busy: list[tuple[float, int]] = []
    for w, d, q, w2, k1 in _WINDOWS:
        weight = get(w, 0.0)
        if weight <= 0:
            break
        total = get(d, 0.0)
        mean = total / weight
        variance = get(q, 0.0) / weight - mean * mean
        if variance < 0.0:
            variance = 0.0
        # variance / effective count, with effective count = weight**2 / sum(w**2)
        error = variance * get(w2, 0.0) / (weight * weight)
        busy.append((k1 * total, k1))
        if means and (len(means) < len(busy) - 1 or error > _TRUSTED**2 * mean * mean):
            continue  # not precise enough to be believed, nor any shorter window
        means.append(mean)
        variances.append(variance)
        errors.append(error)
    if not means or means[0] <= 0:
        return None
    # Blend the trusted windows, each weighted by 1 / its mean squared error: its
    # variance plus its bias, measured against the most recent trusted window and
    # counted only beyond _AGREE standard errors of that one (otherwise it is noise).
    recent = means[-1]
    noise = _AGREE * _AGREE * errors[-1]
    floor = 1e-12 * recent * recent
    total_weight = mean = variance = 0.0
    for m, v, e in zip(means, variances, errors, strict=True):
        bias = (m - recent) ** 2 - noise
        weight = 1.0 / (e + (bias if bias > 0.0 else 0.0) + floor)
        total_weight += weight
        mean += weight * m
        variance += weight * v
    mean /= total_weight
    variance /= total_weight
    if mean <= 0:
        return None
    trend = max(abs(m - mean) for m in means) / mean
    return _Model(
        mean,
        (mean * mean + variance) / (2.0 * mean),
        variance / (mean * mean),
        1.0 / (total_weight * mean * mean) + _TREND * trend * trend,
        get("w0", 0.0),
        tuple(busy),
    )


def _seconds(
    progress: Progress, created_at: float, stats: Mapping[str, float], now: float
) -> tuple[float, float] | None:
    """(seconds left, relative variance of that), unrounded; None without a basis."""
    finished = progress.completed + progress.failed
    if finished == 0:
        return None
    pending = progress.pending
    running = progress.processing
    if pending + running == 0:
        return 0.0, 0.0
    elapsed = now - created_at
    if elapsed < 1e-6:
        elapsed = 1e-6
    model = _model(stats) if stats else None
    if model is None:
        # Only cancelled items are final: no durations yet, use plain throughput.
        seconds = (pending + running) * elapsed / finished
        return seconds, 1.0 / finished + _HORIZON * seconds / elapsed
    mean, residual, cv2, uncertainty, attempts, busy = model
    if running == 0:
        # Nobody is working right now (a pause, or between items): assume the
        # concurrency the batch has had on average so far.
        workers = busy[0][0] / elapsed
        if workers * pending < 1.0:
            workers = 1.0 / pending
    else:
        # Workers busy lately: each window's work done per second of its span. More
        # items processing than that says are held by workers that are gone without
        # failing them (or by a run of long items): count those that visibly work.
        working = max(total / elapsed**k1 for total, k1 in busy)
        workers = working if running > _IDLE * working else float(running)
    # Failed attempts that were retried did work without finishing an item.
    ahead = pending * mean / workers
    if attempts > finished:
        ahead *= attempts / finished
    seconds = ahead + running * residual / workers
    if workers > 1.0:
        seconds += residual * (workers - 1.0) / (workers + 1.0)
    # Relative variance: the remaining items' own spread, the mean's standard error and
    # the windows' disagreement (both only on the pending items), how far ahead we look.
    share = ahead / seconds
    variance = (
        share * share * (cv2 / (pending or 1) + uncertainty)
        + residual * residual / (3.0 * seconds * seconds)
        + _HORIZON * seconds / elapsed
    )
    return seconds, variance


def seconds_remaining(
    progress: Progress, created_at: float, stats: Mapping[str, float], now: float
) -> float | None:
    """The estimate before rounding: None until an item is final, 0.0 once all are."""
    found = _seconds(progress, created_at, stats, now)
    return None if found is None else found[0]


def estimate(
    progress: Progress, created_at: float, stats: Mapping[str, float], now: float
) -> tuple[int | None, tuple[int, int] | None]:
    """Whole seconds until the batch is finished, and the 80% range around it.

    Both None until the first item is final; ``0`` and ``(0, 0)`` once every item is;
    otherwise the estimate rounded to the nearest second but at least 1 (so that 0
    always means finished), and ``(low, high)`` with ``1 <= low <= estimate <= high``.
    """
    found = _seconds(progress, created_at, stats, now)
    if found is None:
        return None, None
    seconds, variance = found
    if seconds == 0.0 and not (progress.pending or progress.processing):
        return 0, (0, 0)
    point = round(seconds) or 1
    factor = math.exp(min(_Z * math.sqrt(variance), 30.0))
    low = round(seconds / factor) or 1
    high = round(seconds * factor)
    return point, (low if low < point else point, high if high > point else point)
