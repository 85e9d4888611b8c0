"""Where batches live: the :class:`~batchtrack.stores.base.Store` boundary and its stores.

- :class:`~batchtrack.stores.memory.MemoryStore`: one process (the default).
"""

from __future__ import annotations

from .base import BatchRecord, Outcome, Store, Transition, TransitionResult
from .memory import MemoryStore

__all__ = ["BatchRecord", "MemoryStore", "Outcome", "Store", "Transition", "TransitionResult"]
