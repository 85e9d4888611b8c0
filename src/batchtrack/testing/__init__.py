"""Helpers for testing code that uses batchtrack, and stores written for it.

- :class:`FakeClock`: a clock you move by hand, for :class:`~batchtrack.BatchTracker`'s
  ``clock=`` argument. Needs nothing beyond batchtrack.
- :mod:`batchtrack.testing.strategies`: Hypothesis strategies for items, batches and
  event sequences (needs ``hypothesis``).
- :mod:`batchtrack.testing.conformance`: the store conformance suite, a Hypothesis
  state machine checked against a model plus plain pytest checks (needs ``hypothesis``
  and ``pytest``): ``StoreConformance``, ``TrackerMachine``.

Install the test extra for the last two: ``pip install 'batchtrack[test]'``.
"""

from __future__ import annotations

from typing import Any

from ._clock import FakeClock

__all__ = ["FakeClock", "StoreConformance", "TrackerMachine"]


def __getattr__(name: str) -> Any:
    # The conformance suite needs hypothesis and pytest; import them only when asked.
    if name in ("StoreConformance", "TrackerMachine"):
        from . import conformance

        return getattr(conformance, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
