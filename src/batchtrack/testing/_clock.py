"""A clock that moves only when told to."""

from __future__ import annotations

import math
import threading

import attrs

__all__ = ["FakeClock"]


@attrs.define
class FakeClock:
    """A clock that only moves when told to; thread-safe.

    Pass it as ``BatchTracker(clock=clock)`` and call :meth:`advance` to let time pass.

    Args:
        now: The starting time, in seconds since the epoch.

    >>> from batchtrack.testing import FakeClock
    >>> clock = FakeClock(100.0)
    >>> clock.advance(2.5)
    102.5
    >>> clock()
    102.5
    """

    now: float = 1_764_064_800.0  # 2025-11-25T10:00:00Z
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False, repr=False)

    def __call__(self) -> float:
        """The current fake time."""
        return self.now

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds`` (not backward); return the new time.

        Raises:
            ValueError: ``seconds`` is negative or not finite.
        """
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"a clock only moves forward by a finite amount, not {seconds!r}")
        with self._lock:
            self.now += seconds
            return self.now
