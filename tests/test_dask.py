"""Orchestrator on a real Dask cluster: processors on the workers, progress in the driver.

One ``LocalCluster`` of two worker processes (one thread each) serves the whole module;
most tests look at one batch of real images (eight good, one broken) run on it once.
docs/examples/dask_batch.py is run as a script, on that cluster and on one of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from batchtrack import (
    BatchSnapshot,
    BatchTracker,
    Item,
    Orchestrator,
    Progress,
    ProgressEvent,
    SQLiteStore,
    Status,
)
from conftest import IN_CI

try:
    from distributed import Client, LocalCluster
    from PIL import Image

    from batchtrack.imaging import ImagePipeline
except ImportError:  # pragma: no cover - depends on the environment
    if IN_CI:
        raise
    pytest.skip("needs batchtrack[dask,images]", allow_module_level=True)

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "dask_batch.py"
MAX_SIZE = 64
ORIENTATION = 0x0112

# name -> (size on disk, size the pipeline must write with max_size=64)
GOOD = {
    "rotated.jpg": ((256, 192), (48, 64)),  # EXIF orientation 6: turned upright, then fitted
    "wide.jpg": ((200, 100), (64, 32)),
    "tall.png": ((128, 256), (32, 64)),
    "square.png": ((96, 96), (64, 64)),
    "small.jpg": ((48, 32), (48, 32)),  # never enlarged
    "alpha.png": ((320, 160), (64, 32)),
    "narrow.jpg": ((64, 128), (32, 64)),
    "banner.png": ((100, 50), (64, 32)),
}
BROKEN = "broken.jpg"


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """A client of a two-process local cluster, closed with its cluster after the module."""
    cluster = LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=1,
        dashboard_address=":0",  # no fixed port: 8787 may be taken (another cluster)
        host="127.0.0.1",
    )
    try:
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of eight small JPEG and PNG images and one file that is not an image."""
    folder = tmp_path_factory.mktemp("photos")
    for name, (size, _) in GOOD.items():
        mode = "RGBA" if name == "alpha.png" else "RGB"
        image = Image.new(mode, size, (200, 30, 30))
        if name == "rotated.jpg":
            exif = Image.Exif()
            exif[ORIENTATION] = 6
            image.save(folder / name, exif=exif.tobytes())
        else:
            image.save(folder / name)
    (folder / BROKEN).write_bytes(b"\xff\xd8\xff" + b"junk" * 50)
    return folder


def _finished(progress: Progress) -> int:
    return progress.completed + progress.failed


def recording_pid(processor: Callable[[Item], Any], folder: Path) -> Callable[[Item], Any]:
    """Wrap a processor so that it writes the pid of its process to ``folder/<item id>``.

    The wrapper is a closure, so Dask ships it by value: the workers need not import
    this test module.
    """

    def process(item: Item) -> Any:
        (folder / str(item.id)).write_text(str(os.getpid()))
        return processor(item)

    return process


@attrs.frozen
class Run:
    """What one batch on the cluster left behind."""

    snap: BatchSnapshot
    events: list[ProgressEvent]
    out: Path
    pids: dict[str, int]  # item id -> pid of the process that ran its processor


@pytest.fixture(scope="module")
def run(client: Client, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The batch of ``photos`` through ImagePipeline on the cluster, events collected."""
    out = tmp_path_factory.mktemp("out")
    pid_folder = tmp_path_factory.mktemp("pids")
    events: list[ProgressEvent] = []
    processor = recording_pid(ImagePipeline(out, max_size=MAX_SIZE), pid_folder)
    with Orchestrator(BatchTracker(), processor, executor=client.get_executor()) as orch:
        snap = orch.run(sorted(photos.iterdir()), on_progress=events.append)
    pids = {path.name: int(path.read_text()) for path in pid_folder.iterdir()}
    return Run(snap, events, out, pids)


def test_final_snapshot_counts_every_image_and_fails_the_broken_one(run: Run) -> None:
    """Eight images complete and the broken file fails with a short one-line error."""
    snap = run.snap
    assert snap.status is Status.COMPLETED
    assert (snap.progress.total, snap.progress.completed, snap.progress.failed) == (9, 8, 1)
    assert (snap.progress.processing, snap.progress.pending) == (0, 0)
    failed = [i for i in snap.items if i.status is Status.FAILED]
    assert [i.filename for i in failed] == [BROKEN]
    assert failed[0].error in ("not an image", "truncated image: the file ends early")
    assert all(i.error is None for i in snap.items if i.filename != BROKEN)


def test_one_result_per_good_image_fitted_and_upright(run: Run) -> None:
    """The output folder holds exactly one file per good image, at the promised size."""
    by_id = {i.id: i.filename for i in run.snap.items if i.filename != BROKEN}
    results = sorted(run.out.iterdir())
    assert sorted(path.stem for path in results) == sorted(by_id)
    for path in results:
        name = by_id[path.stem]
        with Image.open(path) as image:
            assert image.size == GOOD[name][1], name
            assert image.format == ("JPEG" if name.endswith(".jpg") else "PNG")


def test_events_reach_the_driver_with_final_counts_one_to_n(run: Run) -> None:
    """on_progress gets a start and a final event per item; the finals count 1..N once."""
    assert len(run.events) == 2 * 9
    assert {e.batch_id for e in run.events} == {run.snap.batch_id}
    finals = [e for e in run.events if e.item.status.is_final]
    assert [_finished(e.progress) for e in finals] == list(range(1, 10))
    assert sorted(e.item.id for e in finals) == sorted(i.id for i in run.snap.items)
    assert finals[-1].estimated_time_remaining == 0


def test_processors_ran_in_the_worker_processes(run: Run, client: Client) -> None:
    """Every item was processed in one of the cluster's worker processes, not the driver."""
    worker_pids = set(client.run(os.getpid).values())
    assert len(worker_pids) == 2
    assert os.getpid() not in worker_pids
    assert sorted(run.pids) == sorted(i.id for i in run.snap.items)
    assert set(run.pids.values()) <= worker_pids


def test_sqlite_progress_is_readable_from_another_store_on_the_file(
    client: Client, photos: Path, tmp_path: Path
) -> None:
    """With SQLiteStore, the driver's updates are visible to a second store on the file."""
    out = tmp_path / "out"
    out.mkdir()
    writer, reader = SQLiteStore(tmp_path / "batches.db"), SQLiteStore(tmp_path / "batches.db")
    try:
        watcher = BatchTracker(reader)
        seen: list[tuple[int, int]] = []  # (finished per event, finished per reader)

        def watch(event: ProgressEvent) -> None:
            read = watcher.get(event.batch_id).progress
            seen.append((_finished(event.progress), _finished(read)))

        pipeline = ImagePipeline(out, max_size=MAX_SIZE)
        with Orchestrator(BatchTracker(writer), pipeline, executor=client.get_executor()) as orch:
            snap = orch.run(sorted(photos.iterdir()), on_progress=watch)
        final = watcher.get(snap.batch_id)
        assert final.to_dict() == snap.to_dict()
        assert (final.progress.completed, final.progress.failed) == (8, 1)
        # Each transition was committed before its event was sent, and only ever adds.
        assert len(seen) == 2 * 9
        assert all(read >= sent for sent, read in seen)
    finally:
        writer.close()
        reader.close()


def test_a_retried_item_runs_again_on_the_cluster(client: Client, tmp_path: Path) -> None:
    """After tracker.retry, resume runs the failed items again (executor with pure=False)."""
    calls = tmp_path / "calls"
    calls.mkdir()

    def fails_the_first_time(item: Item) -> str:
        log = calls / str(item.id)
        with log.open("a") as f:
            f.write("call\n")
        if log.read_text().count("call") == 1:
            raise RuntimeError("flaky disk")
        return "ok"

    tracker = BatchTracker()
    executor = client.get_executor(pure=False)
    with Orchestrator(tracker, fails_the_first_time, executor=executor) as orch:
        first = orch.run(["a.jpg", "b.jpg"])
        assert first.progress.failed == 2
        assert tracker.retry(first.batch_id) == 2
        orch.resume(first.batch_id)
        second = orch.wait(first.batch_id, timeout=60)
    assert (second.progress.completed, second.progress.failed) == (2, 0)
    assert sorted(log.read_text() for log in calls.iterdir()) == ["call\ncall\n"] * 2


def _example(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def _check_example_output(result: subprocess.CompletedProcess[str], results: Path) -> None:
    assert result.returncode == 1, result.stdout + result.stderr  # one image failed
    lines = result.stdout.splitlines()
    assert lines[-1] == "8 completed, 1 failed"
    progress = lines[:-1]
    assert len(progress) == 9
    assert [line.split("]")[0] for line in progress] == [f"[{n}/9" for n in range(1, 10)]
    assert {line.split("] ")[1].split(":")[0] for line in progress} == {*GOOD, BROKEN}
    assert any(line.split("] ")[1].startswith(f"{BROKEN}: ") for line in progress)
    assert len(list(results.iterdir())) == 8


def test_example_runs_a_folder_on_a_given_scheduler(
    client: Client, photos: Path, tmp_path: Path
) -> None:
    """dask_batch.py --scheduler processes the folder on that cluster and prints progress."""
    results = tmp_path / "results"
    result = _example(str(photos), str(results), "--scheduler", client.scheduler.address)
    _check_example_output(result, results)


def test_example_starts_a_local_cluster_without_a_scheduler(photos: Path, tmp_path: Path) -> None:
    """Without --scheduler, dask_batch.py runs the folder on a local cluster of its own."""
    results = tmp_path / "results"
    _check_example_output(_example(str(photos), str(results)), results)
