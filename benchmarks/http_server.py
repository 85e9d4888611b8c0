"""A server for bench_http: ``python http_server.py ours|raw PORT`` (uvicorn, 1 worker).

``ours`` serves batchtrack's ASGI app with one 20-item batch owned by the session cookie
``batchtrack_session=<32 x 'a'>``; ``raw`` a minimal ASGI app returning a JSON body of the
same size. Prints ``READY <batch id>`` once listening.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import uvicorn

from batchtrack import BatchTracker, Orchestrator
from batchtrack.asgi import create_app
from batchtrack.uploads import UploadStore

SESSION = "a" * 32


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    tracker = BatchTracker()
    snap = tracker.create_batch([f"image{i}.jpg" for i in range(20)], owner=f"session:{SESSION}")
    for item in snap.items[:8]:
        tracker.start_item(snap.batch_id, item.id)
        tracker.complete_item(snap.batch_id, item.id)
    tracker.start_item(snap.batch_id, snap.items[8].id)
    body = (
        __import__("json")
        .dumps(tracker.get(snap.batch_id).to_dict(), separators=(",", ":"))
        .encode()
    )
    if mode == "ours":
        folder = Path(tempfile.mkdtemp())
        app = create_app(tracker, Orchestrator(tracker, lambda item: None), UploadStore(folder))
    else:

        async def app(scope, receive, send):  # type: ignore[no-untyped-def]
            if scope["type"] != "http":
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})

    print(f"READY {snap.batch_id} {len(body)}", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
