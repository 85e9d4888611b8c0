"""Time limits per item: Orchestrator(item_timeout=...) and tracked_task(time_limit=...)."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from batchtrack import BatchTracker, Item, Orchestrator, ProgressEvent, Status, ValidationError
from batchtrack.stores.sqlite import SQLiteStore

FINISH = 60.0  # a generous upper bound for "the batch finished"


def _wait_until(condition: Callable[[], bool], timeout: float = FINISH) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class Stuck:
    """Blocks items named ``stuck*`` until released (then returns, or raises when
    ``raise_late``); others return at once. Has ``remove_results`` like ImagePipeline."""

    def __init__(self, *, raise_late: bool = False) -> None:
        self.release = threading.Event()
        self.returned: list[str] = []
        self.removed: list[tuple[str, list[str]]] = []
        self.lock = threading.Lock()
        self.raise_late = raise_late

    def __call__(self, item: Item) -> str:
        if item.filename.startswith("stuck"):
            self.release.wait(FINISH)
        with self.lock:
            self.returned.append(item.filename)
        if self.raise_late and item.filename.startswith("stuck"):
            raise RuntimeError("late trouble")
        return item.filename

    def remove_results(self, batch_id: str, item_ids: list[str]) -> int:
        self.removed.append((batch_id, list(item_ids)))
        return len(item_ids)


@pytest.fixture
def stuck() -> Iterator[Stuck]:
    """A Stuck processor, released at the end of the test so no thread is left behind."""
    processor = Stuck()
    yield processor
    processor.release.set()


def _by_name(snap: Any) -> dict[str, Any]:
    return {item.filename: item for item in snap.items}


def test_an_item_running_too_long_fails_timed_out_and_the_batch_goes_on(
    tmp_path: Path, stuck: Stuck
) -> None:
    """A stuck item fails "timed out after N s" and a new thread runs the rest of the batch."""
    tracker = BatchTracker(SQLiteStore(tmp_path / "t.db"))
    with Orchestrator(tracker, stuck, concurrency=1, item_timeout=0.5) as orch:
        snap = orch.submit(["stuck.jpg", "a.jpg", "b.jpg"])
        final = orch.wait(snap.batch_id, timeout=FINISH)
    items = _by_name(final)
    assert (final.progress.completed, final.progress.failed) == (2, 1)
    assert items["stuck.jpg"].status is Status.FAILED
    assert items["stuck.jpg"].error == "timed out after 0.5 s"
    assert items["a.jpg"].status is items["b.jpg"].status is Status.COMPLETED


def test_the_limit_is_said_as_given() -> None:
    """A whole number of seconds reads as given: "timed out after 1 s"."""
    processor = Stuck()
    try:
        with Orchestrator(BatchTracker(), processor, item_timeout=1) as orch:
            final = orch.run(["stuck.jpg"])
        assert final.items[0].error == "timed out after 1 s"
    finally:
        processor.release.set()


@pytest.mark.parametrize("raise_late", [False, True], ids=["returns", "raises"])
def test_a_late_return_of_a_timed_out_item_is_ignored(raise_late: bool) -> None:
    """The stuck call returning (or raising) later changes nothing: the item stays failed
    with its timeout error, and no event is sent."""
    stuck = Stuck(raise_late=raise_late)
    tracker = BatchTracker()
    events: list[ProgressEvent] = []
    with Orchestrator(tracker, stuck, concurrency=2, item_timeout=0.3) as orch:
        final = orch.run(["stuck.jpg", "a.jpg"], on_progress=events.append)
        seen = len(events)
        stuck.release.set()
        _wait_until(lambda: "stuck.jpg" in stuck.returned)
        time.sleep(0.2)  # let the late outcome reach the orchestrator
        again = tracker.get(final.batch_id)
    assert _by_name(again)["stuck.jpg"].status is Status.FAILED
    assert _by_name(again)["stuck.jpg"].error == "timed out after 0.3 s"
    assert again.version == final.version
    assert len(events) == seen == 4


def test_a_result_written_after_the_timeout_is_removed() -> None:
    """When the stuck call returns late, the result it wrote is removed through the
    processor's remove_results, since its item stays failed."""
    stuck = Stuck()
    with Orchestrator(BatchTracker(), stuck, item_timeout=0.3) as orch:
        final = orch.run(["stuck.jpg"])
        assert stuck.removed == []
        stuck.release.set()
        _wait_until(lambda: bool(stuck.removed))
    assert stuck.removed == [(final.batch_id, [final.items[0].id])]


def test_a_timed_out_item_is_no_longer_heartbeated(stuck: Stuck) -> None:
    """Once an item timed out, its lease leaves the set the orchestrator renews."""
    tracker = BatchTracker()
    with Orchestrator(tracker, stuck, item_timeout=0.3) as orch:
        snap = orch.submit(["stuck.jpg"])
        item_id = snap.items[0].id
        _wait_until(lambda: (snap.batch_id, item_id) in orch._leased, 10)
        orch.wait(snap.batch_id, timeout=FINISH)
        assert (snap.batch_id, item_id) not in orch._leased


def test_stuck_threads_past_the_bound_hold_their_slots(stuck: Stuck) -> None:
    """With concurrency 1, one stuck thread is replaced; a second one holds its slot until
    a stuck call returns, and then the batch goes on."""
    tracker = BatchTracker()
    with Orchestrator(tracker, stuck, concurrency=1, item_timeout=0.3) as orch:
        snap = orch.submit(["stuck1.jpg", "stuck2.jpg", "a.jpg"])
        _wait_until(lambda: tracker.get(snap.batch_id).progress.failed == 2)
        time.sleep(0.5)
        assert _by_name(tracker.get(snap.batch_id))["a.jpg"].status is Status.PENDING
        stuck.release.set()
        final = orch.wait(snap.batch_id, timeout=FINISH)
    assert (final.progress.completed, final.progress.failed) == (1, 2)


@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan"), True, "2"])
def test_a_bad_item_timeout_is_rejected(value: Any) -> None:
    """item_timeout must be a positive finite number of seconds, or None."""
    with pytest.raises(ValidationError, match="item_timeout"):
        Orchestrator(BatchTracker(), str, item_timeout=value)


def sleepy(item: Item) -> int:
    """Picklable: ``stuck*`` sleeps forever (writing its pid first); ``wait*`` waits for
    the file ``go`` next to its source; others return at once."""
    folder = Path(str(item.source)).parent
    if item.filename.startswith("stuck"):
        (folder / "stuck.pid").write_text(str(os.getpid()))
        while True:
            time.sleep(3600)
    if item.filename.startswith("wait"):
        while not (folder / "go").exists():
            time.sleep(0.02)
    return os.getpid()


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in "ZX"


def test_a_stuck_process_is_killed_and_its_pool_replaced(tmp_path: Path) -> None:
    """With a real ProcessPoolExecutor, the process stuck in a timed-out item is killed, a
    new pool takes over, and an item the old pool was running starts over and completes."""
    tracker = BatchTracker()
    paths = [str(tmp_path / name) for name in ("stuck.jpg", "wait.jpg", "a.jpg", "b.jpg")]

    def on_progress(event: ProgressEvent) -> None:
        if event.item.status is Status.FAILED:
            (tmp_path / "go").touch()  # only once the stuck item has timed out

    with ProcessPoolExecutor(2) as pool:
        with Orchestrator(tracker, sleepy, concurrency=2, executor=pool, item_timeout=2) as orch:
            final = orch.run(paths, on_progress=on_progress)
            assert orch.executor is not pool
            assert isinstance(orch.executor, ProcessPoolExecutor)
        items = _by_name(final)
        assert items["stuck.jpg"].error == "timed out after 2 s"
        assert final.progress.completed == 3
        assert items["wait.jpg"].status is Status.COMPLETED
        assert items["wait.jpg"].attempts == 1
        pid = int((tmp_path / "stuck.pid").read_text())
        _wait_until(lambda: _gone(pid), 10)


# -- Celery: tracked_task(time_limit=...) on a real worker -----------------------------------


def test_a_bad_time_limit_is_rejected() -> None:
    """tracked_task's time_limit must be a positive finite number of seconds, or None."""
    celery = pytest.importorskip("celery")
    from batchtrack.celery import tracked_task

    app = celery.Celery("limits")
    for value in (0, -1, float("inf"), "1"):
        with pytest.raises(ValidationError, match="time_limit"):
            tracked_task(app, BatchTracker(), str, name=f"t{value}", time_limit=value)
    task = tracked_task(app, BatchTracker(), str, name="ok", time_limit=2)
    assert (task.soft_time_limit, task.time_limit) == (2.0, 7.0)


def test_celery_items_past_the_time_limit_fail_timed_out_soft_and_hard(tmp_path: Path) -> None:
    """On a real prefork worker with time_limit=1: an item interrupted by the soft limit and
    one that ignores it (its process killed by the hard limit) both end failed "timed out
    after 1 s" after one attempt, never retried (a redelivery is skipped); the other item
    completes."""
    pytest.importorskip("celery")
    import subprocess

    from batchtrack.celery import CeleryRunner
    from conftest import celery_worker_command
    from test_celery import _cluster

    with _cluster(tmp_path, workers=0) as cluster:
        module = cluster._fresh("time_limit_worker_app")
        try:
            command = celery_worker_command("timed")
            command[command.index("celery_worker_app")] = "time_limit_worker_app"
            with open(cluster.root / "timed.log", "wb") as log:
                cluster.workers["timed"] = subprocess.Popen(
                    command,
                    cwd=cluster.root,
                    env=cluster.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            runner = CeleryRunner(cluster.tracker, module.timed_task)
            sources = cluster.sources("ok 30", "stubborn 30", "ok 0")
            snap = runner.submit(sources)
            final = cluster.finished(snap.batch_id, timeout=60)
            cluster.queue_drained(timeout=30)  # acknowledged, not waiting to come back
            time.sleep(2)  # a redelivery, had there been one, would have started by now
            items = {Path(str(i.source)).name: i for i in cluster.tracker.get(snap.batch_id).items}
            slow, stubborn, quick = (items[p.name] for p in sources)
            assert slow.error == stubborn.error == "timed out after 1 s", cluster.worker_logs()
            assert quick.status is Status.COMPLETED
            assert (final.progress.completed, final.progress.failed) == (1, 2)
            assert slow.attempts == stubborn.attempts == 1
            events = cluster.log()
            started = [item for event, item, _ in events if event == "start"]
            done = {item for event, item, _ in events if event == "done"}
            assert sorted(started) == sorted([slow.id, stubborn.id, quick.id])
            assert done == {quick.id}
            logs = cluster.worker_logs(tail=100_000)
            assert "Hard time limit" in logs
            assert "Soft time limit" in logs
        finally:
            sys.modules.pop("time_limit_worker_app", None)
