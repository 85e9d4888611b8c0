"""The ETA: how many seconds a batch still needs, from the throughput it has shown.

All of the estimate lives here. The tracker asks :func:`stats_for` what to add to a
batch's stored stats with each transition (the store adds the numbers atomically, so
concurrent workers on many hosts never lose a contribution and the result does not depend
on the order they arrive in), and :func:`estimate` turns a batch header into seconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ._models import Progress, Status

__all__ = ["estimate", "needs_origin", "stats_for"]

_NO_STATS: Mapping[str, float] = {}

needs_origin = False
"""Whether :func:`stats_for` uses the batch's creation time (the tracker then caches it)."""


def stats_for(target: Status, at: float, origin: float) -> Mapping[str, float]:
    """What a transition to ``target`` at ``at`` adds to the batch's stats.

    Args:
        target: The item's new status.
        at: When the transition happens.
        origin: When the batch was created (only read when :data:`needs_origin`).
    """
    return _NO_STATS


def estimate(
    progress: Progress, created_at: float, stats: Mapping[str, float], now: float
) -> int | None:
    """Seconds until the batch is finished, rounded up.

    None until the first item is final; 0 once every item is. Otherwise the remaining
    items divided by the throughput shown so far: items finished per second of wall
    time since the batch was created, which already accounts for concurrency.
    """
    finished = progress.completed + progress.failed
    if finished == 0:
        return None
    remaining = progress.pending + progress.processing
    if remaining == 0:
        return 0
    elapsed = max(now - created_at, 1e-6)
    return math.ceil(remaining * elapsed / finished)
