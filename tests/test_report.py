"""Progress inside an item: processors report through runners, coalesced, and the status
body, the event bodies and the ETA carry it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from batchtrack import (
    BatchTracker,
    InvalidTransition,
    Item,
    MemoryStore,
    Orchestrator,
    Status,
    ValidationError,
    report_progress,
)
from batchtrack._json import status_body
from batchtrack.stores.base import Transition, TransitionResult
from batchtrack.testing import FakeClock


class RecordingStore(MemoryStore):
    """A memory store that logs every report and every applied transition, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, Any]] = []

    def report(self, batch_id: str, item_id: str, fraction: float, *args: Any) -> Any:
        self.log.append(("report", fraction))
        return super().report(batch_id, item_id, fraction, *args)

    def apply(self, batch_id: str, transition: Transition) -> TransitionResult:
        self.log.append((transition.target.value, transition.item_id))
        return super().apply(batch_id, transition)

    def _apply_parts(self, batch_id: str, item_id: str, target: Status, *args: Any) -> Any:
        self.log.append((target.value, item_id))
        return super()._apply_parts(batch_id, item_id, target, *args)


def test_a_processor_reports_and_the_item_json_carries_it_while_running() -> None:
    """report_progress in an Orchestrator's processor shows as "progress" and "stage" in
    the item's JSON while it runs, and is gone once it completed."""
    reported = threading.Event()
    go_on = threading.Event()

    def work(item: Item) -> None:
        assert report_progress(0.42, stage="resizing")
        reported.set()
        assert go_on.wait(30)

    tracker = BatchTracker()
    with Orchestrator(tracker, work) as orchestrator:
        batch_id = orchestrator.submit([Item("a.jpg")]).batch_id
        assert reported.wait(30)
        body = json.loads(status_body(tracker.get(batch_id)))
        assert body["images"][0]["progress"] == 0.42
        assert body["images"][0]["stage"] == "resizing"
        go_on.set()
        final = orchestrator.wait(batch_id, timeout=30)
    entry = json.loads(status_body(final))["images"][0]
    assert entry["status"] == "completed"
    assert "progress" not in entry
    assert "stage" not in entry


def test_reports_are_coalesced_and_the_last_is_written_before_the_item_ends() -> None:
    """A thousand tiny reports make a handful of store writes, and the last report is
    written before the item completes."""
    store = RecordingStore()

    def work(item: Item) -> None:
        for k in range(1, 1001):
            report_progress(k / 2000)  # up to 0.5, in steps of 0.05 %

    tracker = BatchTracker(store)
    with Orchestrator(tracker, work) as orchestrator:
        orchestrator.wait(orchestrator.submit([Item("a.jpg")]).batch_id, timeout=30)
    reports = [value for kind, value in store.log if kind == "report"]
    assert 2 <= len(reports) <= 60
    assert reports[-1] == 0.5
    kinds = [kind for kind, _ in store.log]
    assert kinds.index("completed") > len(kinds) - 1 - kinds[::-1].index("report")


def test_a_new_stage_is_written_at_once() -> None:
    """A report with another stage is written even right after the previous one."""
    store = RecordingStore()

    def work(item: Item) -> None:
        report_progress(0.1, stage="reading")
        report_progress(0.1, stage="resizing")
        report_progress(0.1, stage="saving")

    tracker = BatchTracker(store)
    with Orchestrator(tracker, work) as orchestrator:
        orchestrator.wait(orchestrator.submit([Item("a.jpg")]).batch_id, timeout=30)
    assert [value for kind, value in store.log if kind == "report"] == [0.1, 0.1, 0.1]


def test_report_progress_outside_a_runner_is_false_but_still_checked() -> None:
    """Outside a runner report_progress answers False; a bad fraction still raises."""
    assert report_progress(0.5) is False
    with pytest.raises(ValidationError):
        report_progress(1.5)


def test_a_bad_report_fails_the_item_with_a_clear_error() -> None:
    """A processor reporting a fraction outside [0, 1] fails its item with the
    ValidationError's message."""

    def work(item: Item) -> None:
        report_progress(42)

    tracker = BatchTracker()
    with Orchestrator(tracker, work) as orchestrator:
        final = orchestrator.wait(orchestrator.submit([Item("a.jpg")]).batch_id, timeout=30)
    assert final.items[0].status is Status.FAILED
    assert "fraction must be a number in [0, 1]" in (final.items[0].error or "")


def test_a_celery_task_gives_its_processor_a_reporter() -> None:
    """A tracked_task's processor reports with report_progress, and the report is
    written before the item completes."""
    celery = pytest.importorskip("celery")
    from batchtrack.celery import CeleryRunner, tracked_task

    app = celery.Celery("eager", broker="memory://", set_as_current=False)
    app.conf.task_always_eager = True
    taken: list[bool] = []
    try:
        store = RecordingStore()
        tracker = BatchTracker(store)
        task = tracked_task(app, tracker, lambda item: taken.append(report_progress(0.7)))
        CeleryRunner(tracker, task).submit(["/in/a.png"])
    finally:
        app.close()
    assert taken == [True]
    kinds = [kind for kind, _ in store.log]
    assert ("report", 0.7) in store.log
    assert kinds.index("report") < kinds.index("completed")


def test_reports_lower_the_eta_by_what_running_items_did() -> None:
    """With the same history, a running item that reported 90 % leaves a shorter ETA
    than one that reported nothing, and one at 0 % a longer one."""
    clock = FakeClock()
    tracker = BatchTracker(clock=clock)
    batch_id = tracker.create_batch([(str(i), "x.jpg") for i in range(6)]).batch_id
    for i in range(3):
        tracker.start_item(batch_id, str(i))
        clock.advance(10)
        tracker.complete_item(batch_id, str(i))
    tracker.start_item(batch_id, "3")
    clock.advance(2)
    unreported = tracker.get(batch_id).estimated_time_remaining
    tracker.report(batch_id, "3", 0.9)
    nearly = tracker.get(batch_id).estimated_time_remaining
    tracker.report(batch_id, "3", 0.0)
    barely = tracker.get(batch_id).estimated_time_remaining
    assert unreported is not None
    assert nearly is not None
    assert barely is not None
    assert nearly < unreported < barely


def test_event_bodies_carry_the_item_progress(tmp_path: Path) -> None:
    """The batch-events stream's first body carries a running item's progress and
    stage, as the status body does."""
    pytest.importorskip("python_multipart")
    import httpx

    from batchtrack import asgi
    from batchtrack.uploads import UploadStore
    from http_support import RecordingRunner, uvicorn_server

    tracker = BatchTracker()
    snap = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")], owner="me")
    tracker.start_item(snap.batch_id, "a")
    tracker.report(snap.batch_id, "a", 0.25, stage="uploading")
    runner = RecordingRunner(tracker, None)  # type: ignore[arg-type]
    app = asgi.create_app(tracker, runner, UploadStore(tmp_path), owner=lambda h: "me")
    with uvicorn_server(app) as base:
        status = httpx.get(f"{base}/api/batch-status/{snap.batch_id}").json()
        url = f"{base}/api/batch-events/{snap.batch_id}"
        with httpx.stream("GET", url, timeout=30) as response:
            data = next(line for line in response.iter_lines() if line.startswith("data:"))
    body = json.loads(data[len("data:") :])
    assert body["images"][0] == status["images"][0]
    assert (body["images"][0]["progress"], body["images"][0]["stage"]) == (0.25, "uploading")


def test_report_is_refused_on_a_pending_item_and_timed_out_items_drop_reports() -> None:
    """report on a pending item raises InvalidTransition; a processor still reporting
    after its item timed out does not fail or change anything."""
    tracker = BatchTracker()
    batch_id = tracker.create_batch([("a", "a.jpg")]).batch_id
    with pytest.raises(InvalidTransition):
        tracker.report(batch_id, "a", 0.1)
    release = threading.Event()

    def slow(item: Item) -> None:
        assert release.wait(30)
        report_progress(0.9)

    with Orchestrator(tracker, slow, item_timeout=0.3) as orchestrator:
        batch = orchestrator.submit([Item("b.jpg")]).batch_id
        final = orchestrator.wait(batch, timeout=30)
        assert final.items[0].error == "timed out after 0.3 s"
        release.set()
        time.sleep(0.2)
    assert tracker.get(batch).items[0].progress is None


def test_openapi_describes_the_item_progress_and_stage() -> None:
    """The image schema of the OpenAPI document has progress in [0, 1] and stage."""
    from batchtrack._openapi import document

    spec = document("/api", 100)
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "attempts" in node.get("properties", {}):
                found.append(node["properties"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec)
    assert found
    assert all(p["progress"]["maximum"] == 1 for p in found)
    assert all(p["stage"]["maxLength"] == 100 for p in found)


def test_a_store_without_reports_never_fails_the_item() -> None:
    """On a store written before reports existed, report_progress is logged and the
    item completes."""
    from batchtrack.stores.base import Store

    class OldStore(MemoryStore):
        report = Store.report  # the base's: NotImplementedError

    def work(item: Item) -> None:
        report_progress(0.5)

    tracker = BatchTracker(OldStore())
    with Orchestrator(tracker, work) as orchestrator:
        final = orchestrator.wait(orchestrator.submit([Item("a.jpg")]).batch_id, timeout=30)
    assert final.items[0].status is Status.COMPLETED
