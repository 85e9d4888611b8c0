"""Shrink a folder of images on a Dask cluster, with live progress in this process.

    python dask_batch.py PHOTOS RESULTS [--scheduler tcp://10.0.0.5:8786]

Without ``--scheduler`` it starts a local cluster of two worker processes. Either way
the images are processed on the workers, while the tracker and the progress lines stay
here, in the driver. PHOTOS and RESULTS must be folders that every worker sees.
Exit status: 0 when every image succeeded, 1 when some failed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from distributed import Client, LocalCluster

from batchtrack import BatchSnapshot, BatchTracker, Orchestrator, ProgressEvent
from batchtrack.imaging import ImagePipeline


def show(event: ProgressEvent) -> None:
    """Print each finished image with the batch's progress and ETA (runs in the driver)."""
    if not event.item.status.is_final:
        return  # an item started
    done = event.progress.completed + event.progress.failed
    eta = event.estimated_time_remaining
    left = "" if eta is None or done == event.progress.total else f", about {eta} s left"
    outcome = event.item.error or "ok"
    print(f"[{done}/{event.progress.total}] {event.item.filename}: {outcome}{left}", flush=True)


def process_folder(client: Client, photos: Path, results: Path) -> BatchSnapshot:
    """Run every file in ``photos`` through an ImagePipeline on the client's cluster."""
    tracker = BatchTracker()  # BatchTracker(SQLiteStore(path)) lets other processes watch
    # The pipeline is pickled and sent to the workers; the tracker never leaves here.
    pipeline = ImagePipeline(results, max_size=1024)
    # pure=False: every call is a task of its own, so an item retried later runs again
    # instead of Dask handing back the result it still holds for the same arguments.
    executor = client.get_executor(pure=False)
    # As many items in flight as the cluster has threads: no worker idles, and no item
    # shows "processing" while it only waits in Dask's queue.
    concurrency = max(1, sum(client.nthreads().values()))
    paths = sorted(path for path in photos.iterdir() if path.is_file())
    with Orchestrator(tracker, pipeline, executor=executor, concurrency=concurrency) as orch:
        return orch.run(paths, on_progress=show)


def main(argv: Sequence[str] | None = None) -> int:
    """Process PHOTOS into RESULTS; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path, help="folder of images to process")
    parser.add_argument("results", type=Path, help="folder for the results (created)")
    parser.add_argument("--scheduler", help="address of a running Dask scheduler")
    args = parser.parse_args(argv)
    if not args.photos.is_dir():
        parser.error(f"{args.photos} is not a folder")
    # Absolute paths: they are what the workers get, and a worker's cwd is not ours.
    photos, results = args.photos.resolve(), args.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    if args.scheduler:
        with Client(args.scheduler) as client:
            snap = process_folder(client, photos, results)
    else:
        with (
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster,
            Client(cluster) as client,
        ):
            snap = process_folder(client, photos, results)
    print(f"{snap.progress.completed} completed, {snap.progress.failed} failed")
    return 0 if snap.progress.failed == 0 else 1


# The guard is needed: the worker processes of a LocalCluster import this module too.
if __name__ == "__main__":
    sys.exit(main())
