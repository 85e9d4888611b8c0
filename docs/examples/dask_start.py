"""Images processed on a Dask cluster: ``python dask_start.py photos/a.jpg photos/b.png``."""

import sys
from pathlib import Path

from distributed import Client, LocalCluster

from batchtrack import BatchTracker, Orchestrator
from batchtrack.imaging import ImagePipeline


def main(paths):
    # Two worker processes on this machine. On a running cluster, instead of these two
    # lines: client = Client("tcp://10.0.0.5:8786")
    cluster = LocalCluster(n_workers=2, threads_per_worker=1)
    client = Client(cluster)
    orch = Orchestrator(
        BatchTracker(),
        # Absolute paths: the workers open them, and a worker's folder is not ours.
        ImagePipeline(Path("results").resolve(), max_size=1024),
        executor=client.get_executor(pure=False),
        concurrency=sum(client.nthreads().values()),
    )
    snap = orch.run([Path(path).resolve() for path in paths], on_progress=print)
    orch.close()
    client.close()
    cluster.close()
    return snap


# Needed: the worker processes of a LocalCluster import this module too.
if __name__ == "__main__":
    print(main(sys.argv[1:]).progress)
