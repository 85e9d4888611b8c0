"""Where batches live: the :class:`~batchtrack.stores.base.Store` boundary and its stores.

- :class:`~batchtrack.stores.memory.MemoryStore`: one process (the default).
- :class:`~batchtrack.stores.sqlite.SQLiteStore`: one file shared by the threads and
  processes of one machine.
"""

from __future__ import annotations

from .base import BatchRecord, Outcome, Store, Transition, TransitionResult
from .memory import MemoryStore
from .sqlite import SQLiteStore

__all__ = [
    "BatchRecord",
    "MemoryStore",
    "Outcome",
    "SQLiteStore",
    "Store",
    "Transition",
    "TransitionResult",
]
