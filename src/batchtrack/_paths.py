"""Where the command line and the demo service keep their data (shared, import-free)."""

from __future__ import annotations

__all__ = ["DB_NAME"]

DB_NAME = "batchtrack.db"
"""The database file of ``batchtrack serve`` and ``batchtrack status`` in the data folder."""
