"""batchtrack: run batches of work and show people live progress and an honest ETA.

The public names are re-exported here; see the documentation for the guide.
"""

from __future__ import annotations

from ._models import BatchPage, BatchSnapshot, Item, ItemSnapshot, Progress, ProgressEvent, Status
from ._orchestrator import Orchestrator
from ._report import report_progress
from ._tracker import BatchTracker
from .exceptions import (
    BatchNotFound,
    BatchPaused,
    BatchtrackError,
    FileStorageError,
    InputsGone,
    InvalidTransition,
    ItemNotFound,
    OrchestratorClosed,
    ProcessingError,
    StoreError,
    ValidationError,
)
from .stores.memory import MemoryStore
from .stores.sqlite import SQLiteStore
from .typing import ProgressCallback

__all__ = [
    "BatchNotFound",
    "BatchPage",
    "BatchPaused",
    "BatchSnapshot",
    "BatchTracker",
    "BatchtrackError",
    "FileStorageError",
    "InputsGone",
    "InvalidTransition",
    "Item",
    "ItemNotFound",
    "ItemSnapshot",
    "MemoryStore",
    "Orchestrator",
    "OrchestratorClosed",
    "ProcessingError",
    "Progress",
    "ProgressCallback",
    "ProgressEvent",
    "SQLiteStore",
    "Status",
    "StoreError",
    "ValidationError",
    "report_progress",
]

__version__ = "0.1.0"
