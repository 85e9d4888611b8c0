"""Every built-in store passes the conformance suite users run on their own stores."""

from __future__ import annotations

from batchtrack.testing.conformance import StoreConformance


class TestBuiltinStores(StoreConformance):
    """The suite, over the ``store_factory`` fixture parametrized in conftest."""
