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
``sum(t**(2k))`` for each window's effective number of items; ``sum(d**3)`` and
``sum(d**4)`` for how heavy the tail is. Every start adds its start time (``a0``) and
lease (``g0``), every reclaim one (``k0``), its time (``r0``) and how long the item was
held (``l1``): with ``sum(t)`` of finishes (``w1``) and ``sum(d)`` they give the total
age of the items running now. 18 sums in all, 2 per start, 13 per finish. The weight
``t**k`` looks back over roughly the last ``1 / (k + 1)`` of the batch's life: k = 0 is
the whole batch, the largest k its most recent stretch. The windows precise enough to
be trusted (relative standard error at most :data:`_TRUSTED`) are blended, each
weighted by one over its mean squared error: its variance, plus its squared distance
from the most recent trusted window beyond a threshold in standard errors of that one
(a bias; closer than that it is noise). While every window agrees, the recent ones,
which are subsets of the whole, add only noise: they count for nothing (even a
twentieth made the ETA rise and fall with them on heavy tails), and past the threshold
they take over gradually. The threshold makes the ETA steady: :data:`_AGREE`
standard errors for alike durations, more for skewed ones, more again when the recent
window is the slower one (the ETA rises only for a clearly lasting slow-down), and more
for a window of few items. A steady or merely noisy batch thus keeps the whole-batch
mean, one that really sped up or slowed down moves to the recent window within a few
items. No previously shown value is kept: the ETA is a function of the sums and the
clock, the same in every process.

Between two finishes the sums stay put and only the running items age; the estimate
shown then never rises above what the same sums gave at the latest finish (itself read
from the sums), unless the range's low end does (:func:`_governed`): it counts down
between finishes instead of climbing on an item that merely runs long, and still rises
under a stall that lasts.

From the blended mean ``m`` and variance ``v`` of durations:

* each running item still needs ``(m**2 + v) / (2 m)`` on average: the mean residual of
  a renewal process, which is what an item seen at a random moment of its run has left
  (half an item when all take the same time, more when a few long ones dominate);
* remaining work = pending items x ``m`` (times attempts per finished item, when failed
  attempts were retried) + running items x that residual, shared by the workers busy
  now. Workers are the running items, unless the work finished lately shows fewer
  working (``(k + 1) sum(t**k d) / T**(k + 1)`` is a window's busy workers) *and* the
  running items are older than running items get (their ages add up to about running x
  residual; a held item's age keeps growing): then the excess is *held* by lost
  workers and counts as work still to do — no more of them than are *quiet* (their
  lease not renewed lately: :func:`quiet_within`) until an item came back from a lost
  worker. Old items whose leases are renewed are long ones; while nothing finishes at
  all (a stall) the batch is not over before the stall is, as long again as it has
  lasted (as a pause). Young excess items are workers that joined, or
  came back from a pause. While none runs (a pause), the concurrency the batch had
  while it worked;
* the batch ends when its last worker does, not its average one: add the expected lead
  of the last of ``r`` residuals over their mean: ``(r - 1) / (r + 1)`` residuals when
  items all take the same time, ``H(r) - 1`` when durations are exponential, between by
  the durations' relative variance;
* a wait on top of the work: in a pause, as long again as it has lasted (the median of
  not knowing where in it we are); once items came back from lost workers, or the held
  ones are clearly old, until they come back (after the stay the reclaimed ones had, or
  before any reclaim their lease) and, when more losses are likely, until the last of
  those comes back, and one more stay when those may be lost again.

The range is the work part times ``exp(-z s)`` and ``exp(+z s)`` (z = 1.28 for 8 in
10), ``s**2`` its relative variance from: the pending items' own spread
(``cv**2 / pending``, an item's attempts included when failures are retried), the
blended mean's standard error (the windows overlap, so no better than if they were one
error), both planned one standard error larger when the tail is heavy (kurtosis), the
two most recent windows' disagreement (a trend still under way), the spread of the
last worker's end, and a share that grows with how far ahead it looks compared with
the history it has seen; plus the wait at its low and high ends: a pause's a ninth and
nine times its idle time; lost workers' from the same model of losses (a loss comes
after an exponential gap). Its ends are rounded down and up to whole seconds, so that
the range always holds the span: one narrower than a second becomes a second wide, not
a point that no true time can equal.
``benchmarks/bench_eta.py`` scores both against the usual estimators.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

from ._models import Progress, Status

__all__ = [
    "PAUSED",
    "STARTING",
    "WAITING_FOR_LOST_ITEMS",
    "added",
    "estimate",
    "estimate_why",
    "quiet_within",
    "reclaimed",
    "seconds_remaining",
    "span_remaining",
    "stats_for",
]

PAUSED = "paused"
"""Why there is no ETA: the batch is paused (the tracker says so; nothing here knows)."""
STARTING = "starting"
"""Why there is no ETA: nothing has finished yet, so there is no pace to go by."""

WAITING_FOR_LOST_ITEMS = "waiting_for_lost_items"
"""Why there is no ETA: every item left is lost (its lease ran out, its worker is gone)
and waits to be reclaimed; when that happens, and how long the next worker takes, no
pace of this batch tells."""

_KS = (0, 1, 16)  # the windows' powers; t**32 stays finite for t up to 1e9 s
_TRUSTED = 0.4  # largest relative standard error of a window we believe
_AGREE = 2.0  # how many standard errors of the recent window a bias must exceed
_SKEWED = 0.5  # how much more it must exceed them per unit of relative variance (up to 1)
_SLOWER = 1.5  # how much more again when the recent window is the slower one
_FEW_FASTER = 1.0  # effective items by which a faster recent window's threshold grows
_FEW_SLOWER = 3.0  # and a slower one's: (1 + these / its effective count) times
_Z = 1.2816  # the 90th percentile of the standard normal: 8 in 10 between -z and +z
_HORIZON = 0.0004  # relative variance per unit of (time ahead / time seen)
_KURT = 1.0  # standard errors of the variance added for heavy tails
_SUBSET = 0.0  # weight of the recent windows while all windows agree
_TREND = 0.1  # how much of the windows' disagreement counts as uncertainty
_Z_HIGH = -math.log(0.9)  # gap exceeded 9 times in 10 by an exponential gap x rate
_Z_LOW = -math.log(0.1)  # gap exceeded 1 time in 10
_LEADCAP = 1.0  # how far beyond exponential the last worker's lead is extrapolated
_SURE = 8.0  # residuals (times 1 + cv2) of age that show held items are lost
_SEEN = 10  # finished attempts before items are judged held by their age
_AGED = 2.0  # standard deviations of age beyond which running items are held
_LATEST = (33.0 / 17.0) ** (1.0 / 16.0)  # the latest finish over the sums' "last"
_QUIET = 0.6  # share of a lease left below which no worker renewed it lately

# Statuses as module constants for the hot path (added): an Enum member lookup costs a
# class __getattr__, several times a global's.
_PENDING, _PROCESSING = Status.PENDING, Status.PROCESSING
_COMPLETED, _FAILED = Status.COMPLETED, Status.FAILED
_NO_STATS: Mapping[Status, Mapping[str, tuple[float, int]]] = {}
# Per window: the names of its weight, duration and squared-duration sums, and of the
# sum of squared weights (t**(2k)).
_WINDOWS = tuple((f"w{k}", f"d{k}", f"q{k}", f"w{2 * k}", k + 1) for k in _KS)


def stats_for(
    target: Status, at: float, origin: float, lease: float | None = None
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
        lease: For a start, the seconds the item is leased for (summed as ``g0``:
            how long a lost item is likely to stay held); the tracker always gives it.
    """
    if target is Status.PROCESSING:
        return {
            Status.PENDING: {
                "a0": (max(at - origin, 0.0), 0),
                "g0": (lease or 0.0, 0),
            }
        }
    if target is not Status.COMPLETED and target is not Status.FAILED:
        return _NO_STATS
    t = max(at - origin, 0.0)
    p2 = t * t
    p16 = p2 * p2
    p16 *= p16
    p16 *= p16
    return {
        Status.PROCESSING: {
            "w0": (1.0, 0),
            "w1": (t, 0),
            "w2": (p2, 0),
            "w16": (p16, 0),
            "w32": (p16 * p16, 0),
            "d0": (1.0, 1),
            "d1": (t, 1),
            "d16": (p16, 1),
            "q0": (1.0, 2),
            "q1": (t, 2),
            "q16": (p16, 2),
            "c0": (1.0, 3),
            "f0": (1.0, 4),
        }
    }


# The sums a finish adds to, in stats_for's order.
_FINISH_SUMS = ("w0", "w1", "w2", "w16", "w32", "d0", "d1", "d16", "q0", "q1", "q16", "c0", "f0")


def added(
    stats: Mapping[str, float],
    previous: Status,
    target: Status,
    at: float,
    origin: float,
    lease: float | None,
    elapsed: float,
) -> dict[str, float] | None:
    """A copy of ``stats`` with what :func:`stats_for` ``(target, at, origin, lease)``
    adds for an item leaving ``previous`` after ``elapsed`` seconds, summed exactly as
    :func:`~batchtrack.stores.base.add_stats` sums it (bit for bit); None when it adds
    nothing.

    The memory and SQLite stores' hot path: the same numbers without building the
    contributions, the copy and the sums in one dict display.
    (``x * 1.0`` is ``x`` in floating point, so the unit factors are left out.)
    """
    if target is _PROCESSING:
        if previous is not _PENDING:
            return None
        if "a0" not in stats or "g0" not in stats:  # the first start: the sums start at 0.0
            stats = {**stats}
            stats.setdefault("a0", 0.0)
            stats.setdefault("g0", 0.0)
        return {
            **stats,
            "a0": stats["a0"] + max(at - origin, 0.0),
            "g0": stats["g0"] + (lease or 0.0),
        }
    if previous is not _PROCESSING or (target is not _COMPLETED and target is not _FAILED):
        return None
    t = max(at - origin, 0.0)
    p2 = t * t
    p16 = p2 * p2
    p16 *= p16
    p16 *= p16
    square = elapsed * elapsed
    if "f0" not in stats:  # the first finish (f0 comes last): the sums start at 0.0
        stats = {**stats}
        for name in _FINISH_SUMS:
            stats.setdefault(name, 0.0)
    s = stats
    # One dict display: the copy and the 13 sums in one go (keys keep their places).
    return {
        **s,
        "w0": s["w0"] + 1.0,
        "w1": s["w1"] + t,
        "w2": s["w2"] + p2,
        "w16": s["w16"] + p16,
        "w32": s["w32"] + p16 * p16,
        "d0": s["d0"] + elapsed,
        "d1": s["d1"] + t * elapsed,
        "d16": s["d16"] + p16 * elapsed,
        "q0": s["q0"] + square,
        "q1": s["q1"] + t * square,
        "q16": s["q16"] + p16 * square,
        "c0": s["c0"] + square * elapsed,
        "f0": s["f0"] + square * square,
    }


def reclaimed(at: float, origin: float) -> Mapping[Status, Mapping[str, tuple[float, int]]]:
    """What taking a lost item back at ``at`` adds: one more (``k0``), when (``r0``)
    and how long it was held, from its start (``l1``)."""
    return {Status.PROCESSING: {"k0": (1.0, 0), "r0": (max(at - origin, 0.0), 0), "l1": (1.0, 1)}}


# The durations model of a batch, a pure function of the stats its fit reads (the
# windows' sums, c0 and f0): memoised on their exact values, so two batches share an
# entry only when those are equal. They change only when an item finishes, while the
# estimate is also wanted at every start and every read.
class _Model(NamedTuple):
    mean: float  # item duration
    residual: float  # what a running item still needs, on average
    cv2: float  # relative variance of item durations
    uncertainty: float  # relative variance of the mean: standard error and trend
    finished: float  # attempts that ended after processing (sum(t**0))
    busy: tuple[tuple[float, int], ...]  # per window: (k + 1) * sum(t**k * d), k + 1
    last: float  # about when the latest attempt ended, in seconds since creation
    tail: float  # where residuals lie between uniform (0) and exponential (1), or beyond


_FIT_NAMES = (*(name for window in _WINDOWS for name in window[:4]), "c0", "f0")
_memo: dict[tuple[float | None, ...], _Model | None] = {}


def _model(stats: Mapping[str, float]) -> _Model | None:
    key = tuple(map(stats.get, _FIT_NAMES))
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
    counts: list[float] = []  # effective numbers of items
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
        counts.append(weight * weight / get(w2, 0.0) if get(w2, 0.0) > 0.0 else 1.0)
    if not means or means[0] <= 0:
        return None
    # Blend the trusted windows, each weighted by 1 / its mean squared error: its
    # variance plus its bias, measured against the most recent trusted window and
    # counted only beyond a threshold in standard errors of that one (otherwise it is
    # noise). The threshold is where the ETA's steadiness comes from, and it is
    # asymmetric: _AGREE standard errors for durations alike, more when they are
    # skewed (a few items' mean is then most often below the true one, until a long
    # item comes); more again when the recent window is the slower one (the ETA should
    # rise only when a slow-down is clearly lasting); and more when the window holds
    # few items (their spread itself is unsure: a Student-like widening).
    recent = means[-1]
    skew = variances[0] / (means[0] * means[0])
    z = _AGREE * (1.0 + _SKEWED * (skew if skew < 1.0 else 1.0))
    few = _FEW_FASTER
    if recent > means[0]:
        z *= _SLOWER
        few = _FEW_SLOWER
    z *= 1.0 + few / counts[-1]
    # The recent window's standard error from its own spread, or, when durations are
    # skewed, from the whole batch's if that is larger: a run of short items (as
    # skewed durations often have) has a small spread of its own, and would look like
    # a batch that sped up when it is the same batch between two long items.
    error = errors[-1]
    if skew >= 1.0 and variances[0] / counts[-1] > error:
        error = variances[0] / counts[-1]
    noise = z * z * error
    floor = 1e-12 * recent * recent
    total_weight = mean = variance = spread = 0.0
    # Nested windows: while they all agree, the recent ones add no information, only
    # noise; the whole batch leads. They take over gradually as the disagreement
    # grows past the threshold, so the ETA does not switch between the two.
    worst = max((m - recent) ** 2 for m in means) - noise
    subset = _SUBSET
    if worst > 0.0:
        subset = 1.0 if worst >= noise else _SUBSET + (1.0 - _SUBSET) * worst / noise
    for i, (m, v, e) in enumerate(zip(means, variances, errors, strict=True)):
        bias = (m - recent) ** 2 - noise
        mse = e + (bias if bias > 0.0 else 0.0) + floor
        weight = 1.0 / mse
        if i:
            weight *= subset
        total_weight += weight
        spread += weight * math.sqrt(mse)
        mean += weight * m
        variance += weight * v
    mean /= total_weight
    variance /= total_weight
    if mean <= 0:
        return None
    # The windows overlap (the whole batch holds the recent items), so their errors are
    # not independent: the blend is no more precise than if they were one error, its
    # root MSE the weighted mean of theirs.
    spread /= total_weight
    # A trend still under way shows as the two most recent windows disagreeing beyond
    # their noise.
    shift = 0.0
    if len(means) > 1:
        shift = (means[-1] - means[-2]) ** 2 - noise
        if shift < 0.0:
            shift = 0.0
    # The whole batch's raw moments of durations, for the two corrections below.
    n = get("w0", 0.0)
    m1 = get("d0", 0.0) / n if n > 0.0 else 0.0
    m2 = get("q0", 0.0) / n if n > 0.0 else 0.0
    # How the running items' residuals spread: their second moment is E[d**3] / 3m, so
    # their relative variance is 1/3 with durations all alike, 1 with exponential ones.
    tail = variance / (mean * mean)
    if m1 > 0.0 and m2 > 0.0 and "c0" in stats:
        residual_cv2 = 4.0 * m1 * get("c0", 0.0) / (3.0 * n * m2 * m2) - 1.0
        # From the whole batch, while the durations' cv2 is from the recent windows
        # too: the smaller, as a mixture of short and long items has a large cv2 but
        # residuals no wider than uniform ones.
        if 1.5 * residual_cv2 - 0.5 < tail:
            tail = 1.5 * residual_cv2 - 0.5
    tail = 0.0 if tail < 0.0 else _LEADCAP if tail > _LEADCAP else tail
    # Heavy tails: a sample's variance then falls short of the true one more often
    # than not. Plan for one standard error of it more, (kurtosis - 1) / n relative,
    # from the whole batch's third and fourth moments.
    if n > 1.0 and "f0" in stats:
        second = m2 - m1 * m1
        if second > 1e-12 * m2:
            third = 4.0 * m1 * get("c0", 0.0) / n
            fourth = get("f0", 0.0) / n - third + (6.0 * m2 - 3.0 * m1 * m1) * m1 * m1
            kurtosis = fourth / (second * second)
            if kurtosis > 1.0:
                inflate = 1.0 + _KURT * math.sqrt((kurtosis - 1.0) / n)
                variance *= inflate
                spread *= math.sqrt(inflate)
    # About when the latest attempt ended: the sum-weighted mean of t**16 over t**32.
    last = 0.0
    w16 = get("w16", 0.0)
    if w16 > 0.0:
        last = (get("w32", 0.0) / w16) ** (1.0 / 16.0)
    return _Model(
        mean,
        (mean * mean + variance) / (2.0 * mean),
        variance / (mean * mean),
        (spread * spread + _TREND * shift) / (mean * mean),
        n,
        tuple(busy),
        last,
        tail,
    )


def _last(workers: float, tail: float) -> tuple[float, float]:
    """How the last of ``workers`` running items ends: the expected lead of its residual
    over their mean, and its variance, in residuals (squared). With residuals uniform
    (all items take the same time): ``(r - 1) / (r + 1)`` and ``4r / ((r + 1)**2 (r +
    2))``; exponential (``tail`` = 1): ``H(r) - 1`` and ``sum(1 / k**2, k <= r)``;
    between and beyond by ``tail``."""
    r = workers if workers > 1.0 else 1.0
    uniform = (r - 1.0) / (r + 1.0)
    uniform_var = 4.0 * r / ((r + 1.0) * (r + 1.0) * (r + 2.0))
    # H(r) - 1 and sum(1 / k**2) for real r
    exponential = math.log(r) + 0.5772 + 0.5 / r - 1.0 / (12.0 * r * r) - 1.0
    if exponential < uniform:
        exponential = uniform
    exponential_var = 1.6449 - 1.0 / (r + 0.5)
    f = tail
    return uniform + f * (exponential - uniform), uniform_var + f * (exponential_var - uniform_var)


def quiet_within(stats: Mapping[str, float], running: int) -> float:
    """Seconds ahead within which a running item's lease runs out when no worker renewed
    it lately: :data:`_QUIET` of the leases the batch's items were given at their start
    (0.0 without leases).

    A worker renews its items' leases every third of a lease or so (the
    :class:`~batchtrack.Orchestrator` does), so a live item always has two thirds of its
    lease or more ahead of it; one whose lease runs out sooner than this is lost, or is
    about to be."""
    starts = stats.get("w0", 0.0) + stats.get("k0", 0.0) + running
    lease = stats.get("g0", 0.0)
    return _QUIET * lease / starts if lease > 0.0 and starts > 0.0 else 0.0


def _lost_for_sure(
    stats: Mapping[str, float], held_age: float, residual: float, cv2: float, starts: float
) -> bool:
    """Whether items held this long are surely lost before any came back: older than
    many residuals, and than a tenth of the lease they were given (a worker renews its
    lease every third of it or so; an item young next to its lease may still run)."""
    lease = stats.get("g0", 0.0) / starts if starts > 0.0 else 0.0
    return held_age > _SURE * residual * (1.0 + cv2) and held_age > 0.1 * lease


def _lost_wait(
    stats: Mapping[str, float],
    held: float,
    held_age: float,
    sure: bool,
    reclaimed: float,
    attempts: float,
    running: int,
    pending: int,
    mean: float,
    seconds: float,
    elapsed: float,
) -> tuple[float, float, float]:
    """The wait lost workers add to ``seconds`` of work: expected, low and high.

    An item lost stays held until its lease runs out: as long as the reclaimed ones
    stayed (``l1`` sums their time from start to reclaim), or before any reclaim, by
    Little's law, the items held now over the rate they were lost at. The held ones
    come back spread over that stay (the last of ``h`` at quantile ``q`` after
    ``stay * q**(1/h)``), and each then needs an item's time. Attempts to come are lost
    at the rate seen so far: the last such loss, ``gap`` before the work would end
    (exponential, at ``rate`` losses per second of work), pushes the end out by
    ``stay + mean - gap`` if that is positive.
    """
    lost = held + (reclaimed if reclaimed > 0.0 else 0.0)
    if reclaimed >= 1.0 and stats.get("l1", 0.0) > 0.0:
        stay = stats["l1"] / reclaimed
    elif stats.get("g0", 0.0) > 0.0:
        stay = stats["g0"] / (attempts + running + reclaimed)
    else:
        stay = held * elapsed / lost
    back = back_low = back_high = 0.0
    if held > 0.0:
        # What is left of their stay: spread up to twice what their mean age leaves.
        left = stay if held_age <= 0.0 else min(stay, 2.0 * max(stay - held_age, mean))
        back = left * held / (held + 1.0) + mean - seconds
        back_low = left * 0.1 ** (1.0 / held) + mean - seconds
        back_high = left * 0.9 ** (1.0 / held) + mean - seconds
    late = stay + mean
    future = low = high = 0.0
    chance = lost / (lost + attempts)  # that an attempt is lost
    rate = chance * (pending + held) / seconds
    if rate > 0.0:
        span = min(late, seconds)  # a loss must come while there is work
        some = -math.expm1(-rate * span)  # that one comes within a stay of the end
        future = late * some - (some - rate * span * math.exp(-rate * span)) / rate
        if _Z_HIGH / rate < span:
            high = late - _Z_HIGH / rate
        if _Z_LOW / rate < span:
            low = late - _Z_LOW / rate
        # The items that come back at the end (rate x stay of them) may be lost again,
        # each by the same chance: one more stay.
        again = -math.expm1(-chance * rate * stay)
        future += some * again * late
        if some * again > 0.1:
            high += late
    if not sure:
        # Only reclaims, or items held for longer than items run, show that items are
        # really lost (and not, say, held by workers that just joined): until then the
        # wait only widens the range.
        return 0.0, 0.0, max(back_high, high, 0.0)
    return max(back, future, 0.0), max(back_low, low, 0.0), max(back_high, high, 0.0)


class _Found(NamedTuple):
    seconds: float  # the estimate, unrounded
    work: float  # the part of it that is work, the rest being a wait
    variance: float  # relative variance of the work part
    low_wait: float  # the wait at the range's low end
    high_wait: float  # the wait at its high end


def _seconds(
    progress: Progress,
    created_at: float,
    stats: Mapping[str, float],
    now: float,
    lost: int = 0,
    reported: tuple[int, float] = (0, 0.0),
    quiet: int | None = None,
) -> _Found | None:
    """The estimate and what its range is made of; None without a basis.

    ``lost`` processing items are known lost (their lease ran out): they are not about
    to finish but work to do again once reclaimed, held until then. ``reported``: how
    many running items reported their progress, and the sum of their fractions.
    """
    pending = progress.pending
    running = progress.processing
    if pending + running == 0:  # cancelled items are final too
        return _Found(0.0, 0.0, 0.0, 0.0, 0.0)
    finished = progress.completed + progress.failed
    if finished == 0:
        return None
    known_lost = float(lost if lost < running else running)
    running -= int(known_lost)  # the ones still run by a worker
    elapsed = now - created_at
    if elapsed < 1e-6:
        elapsed = 1e-6
    model = _model(stats) if stats else None
    if model is None:
        # Only cancelled items are final: no durations yet, use plain throughput.
        seconds = (pending + running) * elapsed / finished
        return _Found(seconds, seconds, 1.0 / finished + _HORIZON * seconds / elapsed, 0, 0)
    mean, residual, cv2, uncertainty, attempts, busy, last, tail = model
    held = reclaimed = suspect = held_age = blocked = 0.0
    suspect_share = 1.0
    running_work = 0.0
    if running == 0:
        # Nobody is working (a pause, or between items): assume the concurrency the
        # batch had while it worked.
        idle = elapsed - last if last < elapsed else 0.0
        active = elapsed - idle if elapsed - idle > mean else elapsed
        workers = busy[0][0] / active
        if workers * pending < 1.0:
            workers = 1.0 / pending
    elif known_lost:
        # The lost items' ages are in the sums too, so the live ones' cannot be told
        # apart: take each live item's residual as it comes on average.
        idle = 0.0
        reclaimed = stats.get("k0", 0.0)
        workers = float(running)
        running_work = running * residual
    else:
        idle = 0.0
        # The running items' ages: start times of all attempts, less those that ended
        # (end - duration) or were reclaimed (reclaim - stay). They add up to about
        # running x residual (a renewal process's age is distributed like its residual).
        if "a0" in stats:
            age = running * elapsed - (
                stats["a0"]
                - stats.get("w1", 0.0)
                + stats.get("d0", 0.0)
                - stats.get("r0", 0.0)
                + stats.get("l1", 0.0)
            )
        else:  # a batch started before ages were kept
            age = running * residual
        # Workers busy lately: each window's work done per second of its span. Items
        # processing beyond that, by half an item or more, are held by workers that are
        # gone without failing them, or are run by workers that just joined (or came
        # back from a pause): the age tells which, as a held item's keeps growing.
        working = max(total / elapsed**k1 for total, k1 in busy)
        reclaimed = stats.get("k0", 0.0)
        workers = float(running)
        # Held items can only be among the quiet ones, when leases say which: an item
        # whose worker renews its lease is alive however old it is (a long one).
        holdable = running - working
        if (
            quiet is not None
            and stats.get("g0", 0.0) > 0.0
            and reclaimed < 1.0
            and quiet - known_lost < holdable
        ):
            holdable = quiet - known_lost
        if running >= working + 0.5:
            # A handful of finished items says little about how long items take: an
            # old item is then as likely a long one.
            excess_age = age - running * residual
            aged = excess_age > _AGED * residual * math.sqrt(running * (1.0 + cv2))
            if aged and attempts >= _SEEN and holdable >= 0.5:
                held = holdable
                working = running - held
                workers = working if working > 1.0 else 1.0
                held_age = (age - working * residual) / held
                running_work = working * residual
            elif aged and attempts >= _SEEN and elapsed - last * _LATEST > mean:
                # Alive by their leases, so long items, and nothing finished for longer
                # than an item takes: a stall. Like a pause, it goes on about as long
                # again as it has lasted (the median, not knowing where in it we are),
                # and the batch is not over before it is.
                blocked = elapsed - last * _LATEST
                suspect = running - working  # may still be lost: widens the range
            else:
                suspect = running - working  # only widens the range
                # by as much as the running items are older than running items get:
                # not at all when they are young (workers that just came back from a
                # pause, or joined), fully when they are about to count as held.
                older = excess_age / (_AGED * residual * math.sqrt(running * (1.0 + cv2)))
                suspect_share = 0.0 if older <= 0.0 else older if older < 1.0 else 1.0
        if held == 0.0:
            # What the running items still need, from how long they have run: with
            # durations all alike, an item's mean less its age; with exponential ones
            # (or wider), no matter its age, the residual.
            alike = 1.0 - cv2 if cv2 < 1.0 else 0.0
            work = running * residual - alike * (age - running * residual)
            floor = 0.1 * running * residual
            running_work = work if work > floor else floor
            if reported[0]:
                # Items that reported how far they are (BatchTracker.report): what is
                # left of a mean item, instead of the guess from their age.
                n = reported[0] if reported[0] < running else running
                done = reported[1] if reported[1] < n else float(n)
                running_work = running_work * (running - n) / running + (n - done) * mean

    if known_lost:
        # Work to do again once reclaimed; their stay is over, so they add no wait of
        # their own, only to the losses seen (as if reclaimed already).
        held += known_lost
    # Failed attempts that were retried did work without finishing an item.
    per_item = attempts / finished if attempts > finished else 1.0
    ahead = (pending + held) * mean * per_item / workers
    seconds = ahead + running_work / workers
    lead, lead_var = _last(workers, tail)
    seconds += residual * lead
    if blocked > seconds:
        seconds = blocked
    wait = low_wait = high_wait = 0.0
    if idle > 0.0:
        # A pause: it goes on about as long again as it has lasted so far, the median
        # of not knowing where in it we are, and 8 times in 10 between a ninth of that
        # and nine times it.
        wait, low_wait, high_wait = idle, idle / 9.0, 9.0 * idle
    elif held > 0.0 or reclaimed >= 1.0 or suspect > 0.0:
        wait, low_wait, high_wait = _lost_wait(
            stats,
            (held - known_lost) or suspect,
            held_age,
            reclaimed >= 1.0
            or known_lost > 0.0
            or _lost_for_sure(stats, held_age, residual, cv2, attempts + running),
            reclaimed + known_lost,
            attempts,
            running,
            pending,
            mean,
            seconds,
            elapsed,
        )
        if suspect > 0.0 and held == 0.0 and reclaimed < 1.0:
            high_wait *= suspect_share
    # Relative variance of the work: the remaining items' own spread, the mean's
    # standard error and the windows' disagreement (both only on the pending items),
    # how far ahead we look.
    # An item's work is its attempts' durations: with a attempts per item on average
    # (geometric, variance a (a - 1)), its relative variance is cv2 / a + (a - 1) / a.
    if per_item > 1.0:
        cv2 = (cv2 + per_item - 1.0) / per_item
    share = ahead / seconds
    variance = (
        share * share * (cv2 / (pending + held or 1) + uncertainty)
        + residual * residual * lead_var / (seconds * seconds)
        + _HORIZON * (seconds + wait) / elapsed
    )
    return _Found(seconds + wait, seconds, variance, low_wait, high_wait)


def _governed(
    progress: Progress,
    created_at: float,
    stats: Mapping[str, float],
    now: float,
    lost: int,
    reported: tuple[int, float],
    quiet: int | None,
    found: _Found,
    low: float,
) -> float:
    """The estimate as shown: no higher than the same sums gave at the latest finish,
    unless the range's low end now is.

    Between two finishes the sums do not change, only the clock: what the estimate does
    then is the running items growing older. Under a lasting stall that is news (held
    items, a pause), but far more often it is noise of the model (items older than the
    finished ones took, with a few long ones not finished yet), and the estimate should
    then count down, not up. So it may rise between finishes only as far as the range's
    low end rises: a stall that lasts pushes it up, one that ends does not show. The
    latest finish is a function of the sums (:attr:`_Model.last`), so every process
    shows the same number. A pause (nothing running) keeps its wait: nothing finishes
    during one.
    """
    if progress.processing <= lost:
        return found.seconds
    model = _model(stats) if stats else None
    if model is None:
        return found.seconds
    # The latest finish: ``last`` is the t**16-weighted mean of t**16 over the finish
    # times, which for a steady pace up to T is T**16 * 17/33.
    ref = created_at + model.last * _LATEST
    if not created_at < ref < now:
        return found.seconds
    before = _seconds(progress, created_at, stats, ref, lost, reported, quiet)
    if before is None or found.seconds <= before.seconds:
        return found.seconds
    return before.seconds if before.seconds > low else low


def _shown(
    progress: Progress,
    created_at: float,
    stats: Mapping[str, float],
    now: float,
    lost: int = 0,
    reported: tuple[int, float] = (0, 0.0),
    quiet: int | None = None,
) -> tuple[float, float, float] | None:
    """The estimate as shown and its 80% range, before rounding; None without a basis."""
    found = _seconds(progress, created_at, stats, now, lost, reported, quiet)
    if found is None:
        return None
    start, end = _span(found)
    point = _governed(progress, created_at, stats, now, lost, reported, quiet, found, start)
    return point, start, end


def seconds_remaining(
    progress: Progress,
    created_at: float,
    stats: Mapping[str, float],
    now: float,
    lost: int = 0,
    quiet: int | None = None,
) -> float | None:
    """The estimate before rounding: None until an item is final, 0.0 once all are."""
    shown = _shown(progress, created_at, stats, now, lost, (0, 0.0), quiet)
    return None if shown is None else shown[0]


def _span(found: _Found) -> tuple[float, float]:
    """The 80% range before rounding."""
    factor = math.exp(min(_Z * math.sqrt(found.variance), 30.0))
    return found.work / factor + found.low_wait, found.work * factor + found.high_wait


def span_remaining(
    progress: Progress,
    created_at: float,
    stats: Mapping[str, float],
    now: float,
    lost: int = 0,
    quiet: int | None = None,
) -> tuple[float, float] | None:
    """The 80% range before rounding to whole seconds (for the benchmark)."""
    found = _seconds(progress, created_at, stats, now, lost, (0, 0.0), quiet)
    return None if found is None else _span(found)


def estimate_why(
    progress: Progress,
    created_at: float,
    stats: Mapping[str, float],
    now: float,
    lost: int,
    reported: tuple[int, float] = (0, 0.0),
    quiet: int | None = None,
) -> tuple[int | None, tuple[int, int] | None, str | None]:
    """:func:`estimate`, knowing that ``lost`` of the processing items are lost (their
    lease ran out, not yet reclaimed), and why there is no ETA when there is none.

    The reason is None whenever the ETA is not: :data:`STARTING` while nothing has
    finished (whatever else holds), :data:`WAITING_FOR_LOST_ITEMS` while every item left
    is a lost one. Lost items among others still running count as work to do again,
    not as about to finish.
    """
    if progress.completed + progress.failed == 0 and progress.pending + progress.processing:
        return None, None, STARTING
    if progress.processing and not progress.pending and lost >= progress.processing:
        return None, None, WAITING_FOR_LOST_ITEMS
    eta, eta_range = estimate(progress, created_at, stats, now, lost, reported, quiet)
    return eta, eta_range, None


def estimate(
    progress: Progress,
    created_at: float,
    stats: Mapping[str, float],
    now: float,
    lost: int = 0,
    reported: tuple[int, float] = (0, 0.0),
    quiet: int | None = None,
) -> tuple[int | None, tuple[int, int] | None]:
    """Whole seconds until the batch is finished, and the 80% range around it.

    Both None until the first item is final; ``0`` and ``(0, 0)`` once every item is;
    otherwise the estimate rounded to the nearest second but at least 1 (so that 0
    always means finished), and ``(low, high)`` with ``1 <= low <= estimate <= high``
    and ``low < high``: the range's ends rounded down and up, so that it holds the whole
    span (a span narrower than a second never becomes a point no true time can equal).
    """
    shown = _shown(progress, created_at, stats, now, lost, reported, quiet)
    if shown is None:
        return None, None
    if not (progress.pending or progress.processing):
        return 0, (0, 0)
    seconds, start, end = shown
    point = round(seconds) or 1
    low = math.floor(start) or 1
    high = math.ceil(end)
    if low > point:
        low = point
    if high <= low:  # never a point: no true time left equals a whole second
        high = low + 1
    return point, (low, high if high > point else point)
