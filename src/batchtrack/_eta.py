"""The ETA: how many seconds a batch still needs, from what the batch has shown so far.

All of the estimate lives here. With every transition the tracker asks
:func:`stats_for` what to add to the batch's stored stats; the store adds the numbers
atomically, so concurrent workers on many hosts never lose a contribution and the result
does not depend on the order they arrive in. :func:`estimate` turns counts and stats into
seconds. Everything is deterministic given the event times.

How the estimate works
----------------------
Remaining time = remaining work / workers busy now, where remaining work is the pending
items plus three quarters of each running one (the last item to finish, not the average
one, ends the batch), times a mean item duration.

Which mean? Durations of finished items are kept as power sums weighted by when the item
finished: ``sum(t**k * d)`` and ``sum(t**k * d**2)`` with ``t`` the finish time since the
batch was created, for k in 0, 1, 2, 4, 8, 16. The weight ``t**k`` looks back over
roughly the last ``1 / (k + 1)`` of the batch's life, so k = 0 is the mean over the whole
batch and k = 16 the mean over its most recent stretch. From the same sums come each
window's variance and effective number of items (``sum(w)**2 / sum(w**2)``, hence the
sums of ``t**(2k)``).

The window is chosen like Lepski's method for adaptive bandwidths: take the longest
window (the least noisy) whose mean agrees, within half a standard error each, with every
shorter window that holds enough items to be trusted (relative standard error at most
30%). A steady or merely noisy batch thus keeps the whole-batch mean and a steady ETA;
a batch that really sped up or slowed down moves to the recent window within a few items.
``benchmarks/bench_eta.py`` scores it against the usual estimators.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ._models import Progress, Status

__all__ = ["estimate", "seconds_remaining", "stats_for"]

_KS = (0, 1, 2, 4, 8, 16)
_TRUSTED = 0.3  # largest relative standard error of a window we believe
_AGREE = 0.5  # how many standard errors two windows may differ by and still agree
_RUNNING_SHARE = 0.75  # how much of a running item's duration still counts as to do

_NO_STATS: Mapping[Status, Mapping[str, tuple[float, int]]] = {}
# Per window: the names of its weight, duration and squared-duration sums, and of the
# sum of squared weights (t**(2k)).
_WINDOWS = tuple((f"w{k}", f"d{k}", f"q{k}", f"w{2 * k}") for k in _KS)


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
    p8 = p4 * p4
    p16 = p8 * p8
    return {
        Status.PROCESSING: {
            "w0": (1.0, 0),
            "w1": (t, 0),
            "w2": (p2, 0),
            "w4": (p4, 0),
            "w8": (p8, 0),
            "w16": (p16, 0),
            "w32": (p16 * p16, 0),
            "d0": (1.0, 1),
            "d1": (t, 1),
            "d2": (p2, 1),
            "d4": (p4, 1),
            "d8": (p8, 1),
            "d16": (p16, 1),
            "q0": (1.0, 2),
            "q1": (t, 2),
            "q2": (p2, 2),
            "q4": (p4, 2),
            "q8": (p8, 2),
            "q16": (p16, 2),
        }
    }


_memo: dict[tuple[float, float, float], float | None] = {}


def _mean_duration(stats: Mapping[str, float]) -> float | None:
    """The mean item duration, memoised: stats change only when an item finishes, while
    the estimate is also wanted at every start and every read."""
    key = (stats.get("w0", 0.0), stats.get("w1", 0.0), stats.get("d0", 0.0))
    try:
        return _memo[key]
    except KeyError:
        pass
    if len(_memo) >= 4096:
        _memo.clear()
    mean = _memo[key] = _choose_mean_duration(stats)
    return mean


def _choose_mean_duration(stats: Mapping[str, float]) -> float | None:
    """The mean item duration over the window chosen as described above."""
    means: list[float] = []
    errors: list[float] = []
    trusted = -1
    get = stats.get
    for i, (w, d, q, w2) in enumerate(_WINDOWS):
        weight = get(w, 0.0)
        if weight <= 0:
            break
        mean = get(d, 0.0) / weight
        variance = get(q, 0.0) / weight - mean * mean
        # variance / effective count, with effective count = weight**2 / sum(w**2)
        error = math.sqrt(variance * get(w2, 0.0)) / weight if variance > 0 else 0.0
        means.append(mean)
        errors.append(error)
        if trusted == i - 1 and error <= _TRUSTED * mean:
            trusted = i
    if not means:
        return None
    top = max(trusted, 0)
    for i in range(top):
        mean, error = means[i], errors[i]
        for j in range(i + 1, top + 1):
            if abs(mean - means[j]) > _AGREE * (error + errors[j]):
                break
        else:
            return mean
    return means[top]


def seconds_remaining(
    progress: Progress, created_at: float, stats: Mapping[str, float], now: float
) -> float | None:
    """The estimate before rounding: None until an item is final, 0.0 once all are."""
    finished = progress.completed + progress.failed
    if finished == 0:
        return None
    remaining = progress.pending + progress.processing
    if remaining == 0:
        return 0.0
    duration = _mean_duration(stats)
    if duration is None:
        # Only cancelled items are final: no durations yet, use plain throughput.
        return remaining * max(now - created_at, 1e-6) / finished
    running = progress.processing
    return (progress.pending + _RUNNING_SHARE * running) * duration / max(running, 1)


def estimate(
    progress: Progress, created_at: float, stats: Mapping[str, float], now: float
) -> int | None:
    """Whole seconds until the batch is finished, rounded up.

    None until the first item is final; 0 once every item is; otherwise at least 1, so
    that 0 always means finished.
    """
    seconds = seconds_remaining(progress, created_at, stats, now)
    if seconds is None or (seconds == 0.0 and progress.pending + progress.processing == 0):
        return None if seconds is None else 0
    return max(1, math.ceil(seconds))
