"""Prometheus metrics: counted once where an event happens, exposed at GET /metrics."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from batchtrack import BatchTracker, MemoryStore, SQLiteStore, Status
from batchtrack._extras import install_command
from batchtrack.exceptions import StoreError, ValidationError
from batchtrack.metrics import InstrumentedStore, Metrics
from batchtrack.stores.base import Store
from batchtrack.testing import FakeClock
from batchtrack.testing.conformance import StoreConformance
from http_support import Service, SyncASGIClient, jpeg, stop_serve, uvicorn_server
from test_cli import start_serve

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def scrape(metrics: Metrics) -> Samples:
    body, _ = metrics.exposition()
    return samples(body.decode())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_000_000.0)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


# -- a real server ---------------------------------------------------------------------------


def test_serve_answers_get_metrics_with_the_counts_of_a_real_batch(tmp_path: Path) -> None:
    """`batchtrack serve` answers GET /metrics in the Prometheus text format: after a batch
    of three images and one broken file, 3 completed and 1 failed items, as many durations,
    requests labelled by route pattern (never an id) and no batch left open."""
    base, proc = start_serve(tmp_path / "data", tmp_path / "serve.log")
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            files = [("files", (f"{n}.jpg", jpeg((64, 48)), "image/jpeg")) for n in range(3)]
            files.append(("files", ("broken.jpg", b"not an image", "image/jpeg")))
            uploaded = client.post("/api/upload", files=files)
            assert uploaded.status_code == 201, uploaded.text
            ids = [f["id"] for f in uploaded.json()["files"]]
            started = client.post("/api/process-batch", json={"fileIds": ids}).json()
            deadline = time.monotonic() + 60
            # Until it is over (a batch no item has started yet is still "pending").
            while client.get(started["statusUrl"]).json()["status"] in ("pending", "processing"):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            answer = client.get("/metrics")
    finally:
        stop_serve(proc)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    found = samples(answer.text)
    finished = "batchtrack_items_finished_total"
    assert value(found, finished, outcome="completed") == 3
    assert value(found, finished, outcome="failed") == 1
    assert value(found, finished, outcome="cancelled") == 0
    durations = "batchtrack_item_duration_seconds_count"
    assert value(found, durations, outcome="completed") == 3
    assert value(found, durations, outcome="failed") == 1
    assert value(found, "batchtrack_items_started_total") == 4
    assert value(found, "batchtrack_batches_created_total") == 1
    assert value(found, "batchtrack_open_batches") == 0
    assert value(found, "batchtrack_running_items") == 0
    requests = "batchtrack_http_requests_total"
    routes = {dict(labels)["route"] for name, labels in found if name == requests}
    assert {"/api/upload", "/api/process-batch", "/api/batch-status/{batch}"} <= routes
    assert value(found, requests, method="POST", route="/api/upload", status="201") == 1
    assert value(found, requests, method="POST", route="/api/process-batch", status="202") == 1
    assert not any(started["batchId"] in str(labels) for _, labels in found)
    calls = "batchtrack_store_call_duration_seconds_count"
    # 4 starts and 4 ends: fewer calls when the orchestrator sends several at once.
    assert (value(found, calls, store="SQLiteStore", operation="apply") or 0) >= 2


def test_serve_no_metrics_answers_404_for_metrics(tmp_path: Path) -> None:
    """`batchtrack serve --no-metrics` has no /metrics: a JSON 404 like any unknown path."""
    base, proc = start_serve(tmp_path / "data", tmp_path / "serve.log", "--no-metrics")
    try:
        answer = httpx.get(base + "/metrics", timeout=30)
    finally:
        stop_serve(proc)
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"


def test_asgi_app_under_uvicorn_counts_requests_by_route_pattern(
    tmp_path: Path, metrics: Metrics
) -> None:
    """The ASGI app with ``metrics=`` under uvicorn: ids become ``{batch}`` and ``{item}``,
    an unknown path is ``other``, and /metrics refuses a POST with 405."""
    service = Service(tmp_path, metrics=metrics)
    try:
        batch = service.tracker.create_batch([("a", "a.jpg")]).batch_id
        with uvicorn_server(service.asgi) as base, httpx.Client(base_url=base) as client:
            assert client.get(f"/api/batch-status/{batch}").status_code == 404  # not its owner
            client.get(f"/api/batch-results/{batch}/a")
            client.get(f"/api/batch-results/{batch}.zip")
            assert client.get("/no/such/path/123").status_code == 404
            refused = client.post("/metrics")
            answer = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    finally:
        service.close()
    assert refused.status_code == 405
    assert refused.json()["error"]["code"] == "method_not_allowed"
    assert answer.headers["content-type"].startswith("application/openmetrics-text")
    found = scrape(metrics)
    routes = {
        dict(labels)["route"] for name, labels in found if name == "batchtrack_http_requests_total"
    }
    assert routes == {
        "/api/batch-status/{batch}",
        "/api/batch-results/{batch}/{item}",
        "/api/batch-results/{batch}.zip",
        "other",
        "/metrics",
    }
    status = "batchtrack_http_requests_total"
    assert value(found, status, method="GET", route="other", status="404") == 1
    assert value(found, status, method="POST", route="/metrics", status="405") == 1


def test_wsgi_app_answers_metrics_and_counts_its_requests(tmp_path: Path, metrics: Metrics) -> None:
    """The WSGI app with ``metrics=`` answers GET /metrics in the text format and counts
    its requests by route, as the ASGI app does."""
    service = Service(tmp_path, metrics=metrics)
    transport = httpx.WSGITransport(app=service.wsgi)
    try:
        with httpx.Client(transport=transport, base_url="http://testserver") as client:
            assert client.get("/api/openapi.json").status_code == 200
            answer = client.get("/metrics")
    finally:
        service.close()
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    found = samples(answer.text)
    requests = "batchtrack_http_requests_total"
    assert value(found, requests, method="GET", route="/api/openapi.json", status="200") == 1


def test_an_app_without_metrics_answers_404_for_metrics(tmp_path: Path) -> None:
    """create_app without ``metrics`` serves no /metrics: 404 ``not_found``."""
    service = Service(tmp_path)
    client = SyncASGIClient(service.asgi)
    try:
        answer = client.get("/metrics")
    finally:
        client.close()
        service.close()
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"
    assert type(service.tracker.store) is MemoryStore


def test_create_app_metrics_true_uses_the_one_default_metrics(tmp_path: Path) -> None:
    """``metrics=True`` twice in a process shares batchtrack.metrics.default() (no clash of
    names in the default registry), and a bad value is a ValidationError."""
    from batchtrack.metrics import default

    first = Service(tmp_path / "one", metrics=True)
    second = Service(tmp_path / "two", metrics=True)
    try:
        assert first.tracker.store._metrics is default()  # type: ignore[attr-defined]
        assert second.tracker.store._metrics is default()  # type: ignore[attr-defined]
        with pytest.raises(ValidationError, match="metrics must be True, False or"):
            Service(tmp_path / "three", metrics="yes")
    finally:
        first.close()
        second.close()


# -- counting ---------------------------------------------------------------------------------


def test_item_durations_fall_in_the_buckets_given(clock: FakeClock) -> None:
    """``Metrics(buckets=...)`` sets the duration histogram's bounds; a 3 s item and a 7 s
    failure land in them, measured by the tracker's clock from start to end."""
    metrics = Metrics(CollectorRegistry(), buckets=[1, 5, 3600])
    tracker = metrics.instrument(BatchTracker(clock=clock))
    batch = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")]).batch_id
    tracker.start_item(batch, "a")
    clock.advance(3)
    tracker.complete_item(batch, "a")
    tracker.start_item(batch, "b")
    clock.advance(7)
    tracker.fail_item(batch, "b", "boom")
    found = scrape(metrics)
    bucket = "batchtrack_item_duration_seconds_bucket"
    bounds = {dict(labels)["le"] for name, labels in found if name == bucket}
    assert bounds == {"1.0", "5.0", "3600.0", "+Inf"}
    assert value(found, bucket, outcome="completed", le="1.0") == 0
    assert value(found, bucket, outcome="completed", le="5.0") == 1
    assert value(found, bucket, outcome="failed", le="5.0") == 0
    assert value(found, bucket, outcome="failed", le="3600.0") == 1
    assert value(found, "batchtrack_item_duration_seconds_sum", outcome="completed") == 3
    assert value(found, "batchtrack_item_duration_seconds_sum", outcome="failed") == 7


@pytest.mark.parametrize("buckets", [[], [5, 1], [0, 1], [-1], ["1"], [True], [float("nan")], 5])
def test_bad_buckets_are_a_validation_error(buckets: Any) -> None:
    """Buckets must be increasing positive numbers of seconds."""
    with pytest.raises(ValidationError, match="buckets must be increasing positive numbers"):
        Metrics(CollectorRegistry(), buckets=buckets)


def test_a_second_metrics_on_one_registry_is_a_validation_error() -> None:
    """Two Metrics cannot share a registry: the error says what to do."""
    registry = CollectorRegistry()
    Metrics(registry)
    with pytest.raises(ValidationError, match="registry of its own"):
        Metrics(registry)


def test_repeated_transitions_count_once(clock: FakeClock, metrics: Metrics) -> None:
    """A complete that changes nothing (the item was completed already) counts nothing."""
    tracker = metrics.instrument(BatchTracker(clock=clock))
    batch = tracker.create_batch([("a", "a.jpg")]).batch_id
    tracker.start_item(batch, "a")
    tracker.start_item(batch, "a")
    tracker.complete_item(batch, "a")
    tracker.complete_item(batch, "a")
    found = scrape(metrics)
    assert value(found, "batchtrack_items_started_total") == 1
    assert value(found, "batchtrack_items_finished_total", outcome="completed") == 1


def test_cancel_and_retry_are_counted(clock: FakeClock, metrics: Metrics) -> None:
    """A cancel counts its items as finished ``cancelled``; a retry counts what it put
    back to pending."""
    tracker = metrics.instrument(BatchTracker(clock=clock))
    batch = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg"), ("c", "c.jpg")]).batch_id
    tracker.start_item(batch, "a")
    tracker.fail_item(batch, "a", "boom")
    assert tracker.cancel(batch) == 2
    assert tracker.retry(batch) == 3
    found = scrape(metrics)
    finished = "batchtrack_items_finished_total"
    assert value(found, finished, outcome="cancelled") == 2
    assert value(found, finished, outcome="failed") == 1
    assert value(found, "batchtrack_items_retried_total") == 3


def test_reclaimed_items_are_counted_by_what_became_of_them(clock: FakeClock) -> None:
    """A lost item put back to pending counts ``to="pending"``; one out of attempts counts
    ``to="failed"`` and as a failed item (without a duration: its worker never said)."""
    metrics = Metrics(CollectorRegistry())
    tracker = metrics.instrument(BatchTracker(clock=clock, lease=10, max_attempts=2))
    batch = tracker.create_batch([("a", "a.jpg")]).batch_id
    for _ in range(2):
        tracker.start_item(batch, "a")
        clock.advance(11)
        assert tracker.reclaim() == 1
    found = scrape(metrics)
    assert value(found, "batchtrack_items_reclaimed_total", to="pending") == 1
    assert value(found, "batchtrack_items_reclaimed_total", to="failed") == 1
    assert value(found, "batchtrack_items_finished_total", outcome="failed") == 1
    assert value(found, "batchtrack_item_duration_seconds_count", outcome="failed") == 0


def test_each_process_counts_only_what_it_applied_and_gauges_read_the_store(
    tmp_path: Path, clock: FakeClock, metrics: Metrics
) -> None:
    """Two trackers on one SQLite file (two processes): the instrumented one counts only
    its own transitions, while its gauges count the other's running items too."""
    ours = metrics.instrument(BatchTracker(SQLiteStore(tmp_path / "b.db"), clock=clock))
    theirs = BatchTracker(SQLiteStore(tmp_path / "b.db"), clock=clock)
    batch = ours.create_batch([("a", "a.jpg"), ("b", "b.jpg"), ("c", "c.jpg")]).batch_id
    theirs.start_item(batch, "a")
    theirs.complete_item(batch, "a")
    theirs.start_item(batch, "b")
    ours.start_item(batch, "c")
    found = scrape(metrics)
    assert value(found, "batchtrack_items_started_total") == 1
    assert value(found, "batchtrack_items_finished_total", outcome="completed") == 0
    assert value(found, "batchtrack_open_batches") == 1
    assert value(found, "batchtrack_running_items") == 2
    assert value(found, "batchtrack_pending_items") == 0
    ours.store.close()
    theirs.store.close()


class _Flaky(MemoryStore):
    """A memory store whose loads fail while ``down`` is set."""

    down = False

    def load(self, batch_id: str, *, items: bool = True) -> Any:
        if self.down:
            raise StoreError("the store is away")
        return super().load(batch_id, items=items)


def test_store_errors_are_counted_and_raised_unchanged(clock: FakeClock, metrics: Metrics) -> None:
    """A store call that fails raises the store's own error and counts one error by
    operation and class; a batch not found is an answer, not an error."""
    flaky = _Flaky()
    tracker = metrics.instrument(BatchTracker(flaky, clock=clock))
    batch = tracker.create_batch(["a.jpg"]).batch_id
    flaky.down = True
    with pytest.raises(StoreError, match="the store is away"):
        tracker.get(batch, items=False)
    flaky.down = False
    with pytest.raises(LookupError):
        tracker.store.apply_many("no-such-batch", _any_transition(clock))
    found = scrape(metrics)
    errors = "batchtrack_store_errors_total"
    assert value(found, errors, store="_Flaky", operation="load", error="StoreError") == 1
    assert [labels for name, labels in found if name == errors] == [
        frozenset({("store", "_Flaky"), ("operation", "load"), ("error", "StoreError")})
    ]
    calls = "batchtrack_store_call_duration_seconds_count"
    assert value(found, calls, store="_Flaky", operation="apply_many") == 1


def _any_transition(clock: FakeClock) -> Any:
    from batchtrack.stores.base import Transition

    now = clock()
    return Transition("", Status.CANCELLED, frozenset({Status.PENDING}), now, None, now, now)


def test_a_failing_metric_is_logged_and_the_batch_goes_on(
    clock: FakeClock, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    """When counting raises, the transition still happens and the failure is logged once
    with its traceback."""
    tracker = metrics.instrument(BatchTracker(clock=clock))
    batch = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")]).batch_id

    def broken(*args: Any) -> None:
        raise RuntimeError("metrics are broken")

    metrics._finished[Status.COMPLETED].inc = broken
    with caplog.at_level(logging.DEBUG, logger="batchtrack"):
        for item in ("a", "b"):
            tracker.start_item(batch, item)
            assert tracker.complete_item(batch, item).item.status is Status.COMPLETED
    assert tracker.get(batch).status.value == "completed"
    failures = [r for r in caplog.records if "metrics failed" in r.getMessage()]
    assert [r.levelno for r in failures] == [logging.ERROR, logging.DEBUG]
    assert failures[0].exc_info is not None


def test_pause_and_other_store_methods_reach_the_wrapped_store(
    clock: FakeClock, metrics: Metrics
) -> None:
    """Methods a Store has by default (pause's set_paused among them) are the wrapped
    store's, timed, not the base class's NotImplementedError; its own attributes show
    through."""
    tracker = metrics.instrument(BatchTracker(clock=clock))
    batch = tracker.create_batch(["a.jpg"]).batch_id
    assert tracker.pause(batch) is True
    assert tracker.get(batch).status.value == "paused"
    assert tracker.store.inner._batches  # type: ignore[attr-defined]
    assert tracker.store._batches is tracker.store.inner._batches  # type: ignore[attr-defined]
    found = scrape(metrics)
    calls = "batchtrack_store_call_duration_seconds_count"
    assert value(found, calls, store="MemoryStore", operation="set_paused") == 1


class TestInstrumentedStoreConformance(StoreConformance):
    """The store conformance suite passes through an InstrumentedStore: it answers
    exactly as the store it wraps."""

    @pytest.fixture
    def store_factory(self) -> Callable[[], Store]:
        return lambda: InstrumentedStore(MemoryStore(), Metrics(CollectorRegistry()))


# -- several processes, and without prometheus-client -------------------------------------------


_WORKER = textwrap.dedent(
    """
    import sys
    from batchtrack import BatchTracker
    from batchtrack.metrics import Metrics

    tracker = Metrics().instrument(BatchTracker())
    batch = tracker.create_batch([f"{n}.jpg" for n in range(int(sys.argv[1]))])
    for item in batch.items:
        tracker.start_item(batch.batch_id, item.id)
        tracker.complete_item(batch.batch_id, item.id)
    """
)

_SCRAPER = textwrap.dedent(
    """
    from batchtrack import BatchTracker
    from batchtrack.metrics import Metrics

    metrics = Metrics()
    tracker = metrics.instrument(BatchTracker())
    print(metrics.exposition()[0].decode())
    """
)


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_multiprocess_mode_adds_up_every_process(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR, one process's exposition sums the counters of two
    processes that finished 2 and 3 items (and its gauges are read from its store)."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    _python(_WORKER, "2", env=env)
    _python(_WORKER, "3", env=env)
    found = samples(_python(_SCRAPER, env=env))
    assert value(found, "batchtrack_items_finished_total", outcome="completed") == 5
    assert value(found, "batchtrack_item_duration_seconds_count", outcome="completed") == 5
    assert value(found, "batchtrack_batches_created_total") == 2
    assert value(found, "batchtrack_open_batches") == 0


_HIDDEN = "import sys; sys.modules['prometheus_client'] = None\n"


def test_without_prometheus_client_the_option_gives_a_one_line_hint(tmp_path: Path) -> None:
    """create_app(metrics=True) without prometheus-client raises ImportError naming the
    extra and the install command; importing batchtrack.metrics says the same."""
    code = _HIDDEN + textwrap.dedent(
        f"""
        from batchtrack import BatchTracker, Orchestrator
        from batchtrack.asgi import create_app
        from batchtrack.uploads import UploadStore

        tracker = BatchTracker()
        runner = Orchestrator(tracker, str)
        for attempt in ("create_app", "import"):
            try:
                if attempt == "create_app":
                    create_app(tracker, runner, UploadStore({str(tmp_path)!r}), metrics=True)
                else:
                    import batchtrack.metrics
            except ImportError as exc:
                print(exc)
        runner.close()
        """
    )
    lines = _python(code).splitlines()
    command = install_command("metrics")
    assert lines == [
        f"create_app(metrics=...) needs prometheus-client: {command}",
        f"batchtrack.metrics needs prometheus-client: {command}",
    ]


def test_serve_metrics_without_prometheus_client_is_a_one_line_usage_error(
    tmp_path: Path,
) -> None:
    """`batchtrack serve --metrics` without prometheus-client exits 2 with one line."""
    code = _HIDDEN + (
        "from batchtrack.cli import main\n"
        f"sys.exit(main(['serve', '--metrics', '--data-dir', {str(tmp_path)!r}]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "batchtrack serve: error: this command needs prometheus-client: "
        + install_command("metrics")
    ]
