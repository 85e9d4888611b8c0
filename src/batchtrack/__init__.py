"""batchtrack: run batches of work and show people live progress and an honest ETA.

The public names are re-exported here; see the documentation for the guide.
"""

from __future__ import annotations

from ._models import BatchSnapshot, ItemSnapshot, Progress, ProgressEvent, Status
from ._tracker import BatchTracker
from .exceptions import (
    BatchNotFound,
    BatchtrackError,
    InvalidTransition,
    ItemNotFound,
    StoreError,
    ValidationError,
)
from .stores.memory import MemoryStore
from .stores.sqlite import SQLiteStore

__all__ = [
    "BatchNotFound",
    "BatchSnapshot",
    "BatchTracker",
    "BatchtrackError",
    "InvalidTransition",
    "ItemNotFound",
    "ItemSnapshot",
    "MemoryStore",
    "Progress",
    "ProgressEvent",
    "SQLiteStore",
    "Status",
    "StoreError",
    "ValidationError",
]

__version__ = "0.1.0"
