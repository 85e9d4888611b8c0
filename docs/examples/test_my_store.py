"""Run the store conformance suite on your own store: ``python -m pytest test_my_store.py``."""

from __future__ import annotations

import itertools

import pytest

from batchtrack import SQLiteStore
from batchtrack.testing.conformance import StoreConformance


class MyStore(SQLiteStore):
    """Stands for your store: replace it with yours."""


class TestMyStore(StoreConformance):
    @pytest.fixture
    def store_factory(self, tmp_path):
        # A fresh, empty store on every call: the state machine makes one per example.
        numbers = itertools.count()
        return lambda: MyStore(tmp_path / f"my-{next(numbers)}.db")
