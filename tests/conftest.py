"""Shared fixtures: a fake clock, every store, and the Hypothesis profiles."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from batchtrack import BatchTracker, MemoryStore, SQLiteStore
from batchtrack.stores.base import Store
from batchtrack.testing import FakeClock

settings.register_profile(
    "ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=40, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

StoreFactory = Callable[[], Store]


def _memory(tmp_path: Path) -> StoreFactory:
    return MemoryStore


def _sqlite(tmp_path: Path) -> StoreFactory:
    return lambda: SQLiteStore(tmp_path / f"{uuid.uuid4()}.db")


ALL_STORES: dict[str, Callable[[Path], StoreFactory]] = {"memory": _memory, "sqlite": _sqlite}
"""Every built-in store, by name: each value turns a temporary folder into a factory."""


@pytest.fixture(params=sorted(ALL_STORES))
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """A factory for fresh stores of each kind in turn; every store made is closed after."""
    made: list[Store] = []
    make = ALL_STORES[request.param](tmp_path)

    def factory() -> Store:
        store = make()
        made.append(store)
        return store

    yield factory
    for store in made:
        store.close()


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock at 2025-11-25T10:00:00Z."""
    return FakeClock()


@pytest.fixture
def tracker(store_factory: StoreFactory, clock: FakeClock) -> BatchTracker:
    """A tracker on each store in turn, driven by the fake clock, ttl one hour."""
    return BatchTracker(store_factory(), ttl=3600.0, clock=clock)
