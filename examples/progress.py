"""A batch of simulated image jobs on four worker threads, with live progress and ETA.

Run it: ``python examples/progress.py [--items N] [--seconds S]``. Each job takes a
random time around S seconds; one in eight fails. The tracker is polled every half
second, the way the status page polls the HTTP API.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from batchtrack import BatchTracker, Status


def work(tracker: BatchTracker, batch_id: str, item_id: str, seconds: float) -> None:
    tracker.start_item(batch_id, item_id)
    threading.Event().wait(random.uniform(0.5, 1.5) * seconds)
    if random.random() < 1 / 8:
        tracker.fail_item(batch_id, item_id, "not an image")
    else:
        tracker.complete_item(batch_id, item_id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=24, help="how many jobs (default 24)")
    parser.add_argument("--seconds", type=float, default=0.6, help="mean job time (default 0.6)")
    args = parser.parse_args()
    if args.items < 1 or args.seconds < 0:
        parser.error("--items must be at least 1 and --seconds not negative")

    tracker = BatchTracker()
    batch = tracker.create_batch([f"photo-{n:03d}.jpg" for n in range(args.items)])
    print(f"batch {batch.batch_id}: {batch.progress.total} images")
    with ThreadPoolExecutor(max_workers=4) as pool:
        for item in batch.items:
            pool.submit(work, tracker, batch.batch_id, item.id, args.seconds)
        while True:
            snap = tracker.get(batch.batch_id)
            p = snap.progress
            eta = (
                "…"
                if snap.estimated_time_remaining is None
                else f"{snap.estimated_time_remaining}s"
            )
            print(
                f"{snap.status.value:<10} {p.completed + p.failed:>3}/{p.total} done "
                f"({p.completed} ok, {p.failed} failed, {p.processing} running)  ETA {eta}",
                flush=True,
            )
            if snap.status in (Status.COMPLETED, Status.FAILED):
                break
            threading.Event().wait(0.5)
    for item in snap.items:
        if item.error:
            print(f"  {item.filename}: {item.error}")
    print(f"finished: {snap.to_dict()['finishedAt']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
