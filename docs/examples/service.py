"""The batchtrack parts every mounting example shares: tracker, orchestrator, uploads."""

from __future__ import annotations

from pathlib import Path

from batchtrack import BatchTracker, Orchestrator, SQLiteStore
from batchtrack.imaging import ImagePipeline
from batchtrack.uploads import UploadStore


def parts(data_dir: Path) -> tuple[BatchTracker, Orchestrator, UploadStore]:
    (data_dir / "results").mkdir(parents=True, exist_ok=True)
    tracker = BatchTracker(SQLiteStore(data_dir / "batches.db"))
    orchestrator = Orchestrator(tracker, ImagePipeline(data_dir / "results"), concurrency=2)
    uploads = UploadStore(data_dir / "uploads")
    return tracker, orchestrator, uploads
