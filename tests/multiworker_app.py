"""An ASGI app for `uvicorn --workers N`: every worker builds it from the environment.

BATCHTRACK_STORE is ``sqlite:<path>`` or ``redis:<url>``; BATCHTRACK_DATA the folder for
uploads and results, shared by the workers.
"""

from __future__ import annotations

import os
from pathlib import Path

from batchtrack import BatchTracker, Orchestrator, SQLiteStore
from batchtrack.asgi import create_app
from batchtrack.imaging import ImagePipeline
from batchtrack.uploads import UploadStore

kind, _, where = os.environ["BATCHTRACK_STORE"].partition(":")
if kind == "redis":
    from batchtrack.stores.redis import RedisStore

    store = RedisStore(where, prefix=os.environ.get("BATCHTRACK_PREFIX", "batchtrack:"))
else:
    store = SQLiteStore(where)
data = Path(os.environ["BATCHTRACK_DATA"])
(data / "results").mkdir(parents=True, exist_ok=True)
tracker = BatchTracker(store)
orchestrator = Orchestrator(tracker, ImagePipeline(data / "results", max_size=256), concurrency=2)
app = create_app(tracker, orchestrator, UploadStore(data / "uploads"))
