"""batchtrack.celery: a tracked task and a runner, on real Celery workers and a real Redis.

The workers are real ``celery worker`` processes (prefork, two processes each) running
docs/examples/celery_app.py through tests/celery_worker_app.py; Redis is a real
redis-server, broker and store at once. The in-process tests run the task eagerly on a
MemoryStore.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from batchtrack import BatchSnapshot, BatchTracker, Item, MemoryStore, ProcessingError, Status
from batchtrack._extras import install_command
from batchtrack._tracker import INPUT_NOT_KEPT
from batchtrack.exceptions import StoreError, ValidationError
from batchtrack.stores.base import Transition, TransitionResult
from batchtrack.testing import FakeClock
from conftest import IN_CI, celery_worker_command, start_redis

try:
    from celery import Celery

    from batchtrack.celery import (
        DEFAULT_TASK_NAME,
        MAX_BACKOFF,
        CeleryRunner,
        retry_delay,
        tracked_task,
    )
except ImportError:  # pragma: no cover - depends on the environment
    if IN_CI:
        raise
    pytest.skip("Celery is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
TESTS = ROOT / "tests"


# -- in process: the task run eagerly on a MemoryStore -----------------------------------


class Calls:
    """A processor that records its calls and fails as told, per filename."""

    def __init__(self, failures: dict[str, int] | None = None, exc: Exception | None = None):
        self.items: list[Item] = []
        self.failures = dict(failures or {})  # filename -> how many calls fail first
        self.exc = exc or RuntimeError("disk full on /srv/out/x.png")

    def __call__(self, item: Item) -> str:
        self.items.append(item)
        if self.failures.get(item.filename, 0) > 0:
            self.failures[item.filename] -= 1
            raise self.exc
        return "ok"

    def count(self, filename: str) -> int:
        return sum(item.filename == filename for item in self.items)


@pytest.fixture
def eager_app() -> Iterator[Any]:
    """A Celery app that runs every task in process, at once (retries too)."""
    app = Celery("eager", broker="memory://", set_as_current=False)
    app.conf.task_always_eager = True
    yield app
    app.close()


def _eager(
    app: Any, processor: Callable[[Item], Any], store: Any = None, **options: Any
) -> tuple[BatchTracker, Any, CeleryRunner]:
    tracker = BatchTracker(MemoryStore() if store is None else store)
    task = tracked_task(app, tracker, processor, retry_backoff=0, **options)
    return tracker, task, CeleryRunner(tracker, task)


def test_submit_processes_every_item_from_its_stored_source(eager_app: Any) -> None:
    """Each item reaches the processor once, with its id, batch id and stored source."""
    calls = Calls()
    tracker, _, runner = _eager(eager_app, calls)
    snap = runner.submit([Item("a.png", source="/in/a.png"), Path("/in/b.png")], owner="u1")
    final = tracker.get(snap.batch_id, owner="u1")
    assert final.progress.completed == 2
    assert final.status is Status.COMPLETED
    assert sorted((i.filename, i.source, i.id, i.batch_id) for i in calls.items) == sorted(
        (i.filename, i.source, i.id, snap.batch_id) for i in snap.items
    )
    assert [i.source for i in snap.items] == ["/in/a.png", "/in/b.png"]


def test_redelivery_after_completion_is_acked_and_skipped(eager_app: Any) -> None:
    """The message of a completed item, delivered again, runs nothing and counts nothing."""
    calls = Calls()
    tracker, task, runner = _eager(eager_app, calls)
    snap = runner.submit(["/in/a.png"])
    item_id = snap.items[0].id
    before = tracker.get(snap.batch_id)
    result = task.apply((snap.batch_id, item_id))
    assert result.successful()
    assert result.result is None
    assert len(calls.items) == 1
    after = tracker.get(snap.batch_id)
    assert after.progress == before.progress
    assert after.version == before.version


def test_redelivery_of_a_processing_item_takes_it_over_and_counts_it_once(
    eager_app: Any,
) -> None:
    """An item left processing by a dead worker is processed again and completed once."""
    calls = Calls()
    tracker, task, _ = _eager(eager_app, calls)
    snap = tracker.create_batch([Item("a.png", source="/in/a.png")])
    item_id = snap.items[0].id
    tracker.start_item(snap.batch_id, item_id)  # the worker that died
    assert task.apply((snap.batch_id, item_id)).result == "completed"
    final = tracker.get(snap.batch_id)
    assert final.progress.completed == 1
    assert final.items[0].attempts == 1
    assert [i.source for i in calls.items] == ["/in/a.png"]


def test_cancelled_item_is_skipped(eager_app: Any) -> None:
    """A message for a cancelled item is acknowledged without running the processor."""
    calls = Calls()
    tracker, task, runner = _eager(eager_app, calls)
    snap = tracker.create_batch(["a.png", "b.png"])
    assert runner.cancel(snap.batch_id) is True
    for item in snap.items:
        assert task.apply((snap.batch_id, item.id)).result is None
    assert calls.items == []
    final = tracker.get(snap.batch_id)
    assert [i.status for i in final.items] == [Status.CANCELLED, Status.CANCELLED]
    assert runner.cancel(snap.batch_id) is False


def test_message_of_a_paused_batch_is_dropped_and_resume_after_unpause_runs_it(
    eager_app: Any,
) -> None:
    """A message arriving while its batch is paused is acknowledged without running the
    processor and the item stays pending; after unpause, resume sends and runs it."""
    calls = Calls()
    tracker, task, runner = _eager(eager_app, calls)
    snap = tracker.create_batch([Item("a.png", source="/in/a.png")])
    item_id = snap.items[0].id
    assert tracker.pause(snap.batch_id)
    result = task.apply((snap.batch_id, item_id))
    assert result.successful()
    assert result.result is None
    assert calls.items == []
    held = tracker.get(snap.batch_id)
    assert (held.status, held.items[0].status, held.items[0].attempts) == (
        Status.PAUSED,
        Status.PENDING,
        0,
    )
    assert tracker.unpause(snap.batch_id)
    runner.resume(snap.batch_id)
    assert [i.filename for i in calls.items] == ["a.png"]
    assert tracker.get(snap.batch_id).status is Status.COMPLETED


def test_an_item_whose_input_was_not_kept_fails_instead_of_running_a_guess(
    eager_app: Any,
) -> None:
    """An item an Orchestrator took as bytes (stored source "") reaches no processor on
    a Celery worker: it fails with "its input was not kept: submit it again"."""
    calls = Calls()
    tracker, _, runner = _eager(eager_app, calls)
    snap = tracker.create_batch([Item("cat.jpg", source=INPUT_NOT_KEPT)])
    runner.resume(snap.batch_id)
    final = tracker.get(snap.batch_id)
    assert calls.items == []
    assert final.items[0].status is Status.FAILED
    assert final.items[0].error == "its input was not kept: submit it again"


def test_cancel_of_an_unknown_batch_is_false(eager_app: Any) -> None:
    """Cancelling a batch that does not exist returns False, like the Orchestrator."""
    _, _, runner = _eager(eager_app, Calls())
    assert runner.cancel("9b2f7c43-8a3c-4f0e-9d1e-2b6a4d8c1e00") is False


def test_failure_is_retried_then_completes(eager_app: Any) -> None:
    """An item that fails twice and then succeeds ends completed, after three calls."""
    calls = Calls({"a.png": 2})
    tracker, _, runner = _eager(eager_app, calls, max_retries=3)
    snap = runner.submit(["/in/a.png"])
    assert calls.count("a.png") == 3
    assert tracker.get(snap.batch_id).items[0].status is Status.COMPLETED


def test_failure_after_the_last_retry_fails_the_item_with_one_line(eager_app: Any) -> None:
    """After max_retries retries the item fails with a one-line message, no paths."""
    calls = Calls({"a.png": 99}, RuntimeError("disk full on /srv/out/x.png\nsecond line"))
    tracker, _, runner = _eager(eager_app, calls, max_retries=2)
    snap = runner.submit(["/in/a.png"])
    assert calls.count("a.png") == 3
    item = tracker.get(snap.batch_id).items[0]
    assert item.status is Status.FAILED
    assert item.error == "RuntimeError: disk full on x.png"


def test_processing_error_fails_at_once_with_its_message(eager_app: Any) -> None:
    """A ProcessingError says the input is bad: no retry, its message is the error."""
    calls = Calls({"a.png": 99}, ProcessingError("not an image"))
    tracker, _, runner = _eager(eager_app, calls, max_retries=3)
    snap = runner.submit(["/in/a.png"])
    assert calls.count("a.png") == 1
    assert tracker.get(snap.batch_id).items[0].error == "not an image"


class FlakyStore(MemoryStore):
    """A MemoryStore whose next transitions apply but then report a failure, as if the
    connection broke before the answer arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.break_next: dict[Status, int] = {}

    def apply(self, batch_id: str, transition: Transition) -> TransitionResult:
        result = super().apply(batch_id, transition)
        if self.break_next.get(transition.target, 0) > 0:
            self.break_next[transition.target] -= 1
            raise StoreError("connection lost")
        return result


def test_store_failures_are_retried_without_counting_twice(eager_app: Any) -> None:
    """Lost answers of start and complete are retried; the item is processed and counted once."""
    store = FlakyStore()
    calls = Calls()
    tracker, _, runner = _eager(eager_app, calls, store=store, max_retries=0)
    store.break_next = {Status.PROCESSING: 1, Status.COMPLETED: 2}
    snap = runner.submit(["/in/a.png", "/in/b.png"])
    final = tracker.get(snap.batch_id)
    assert final.progress.completed == 2
    assert final.progress.total == 2
    assert len(calls.items) == 2  # a lost answer of complete does not run the processor again


def test_heartbeats_keep_a_long_item_leased(eager_app: Any) -> None:
    """While the processor runs past its lease, heartbeats keep reclaim() away from it."""
    reclaimed: list[int] = []

    def slow(item: Item) -> None:
        time.sleep(1.0)
        reclaimed.append(tracker.reclaim())

    tracker, _, runner = _eager(eager_app, slow, lease=0.6)
    snap = runner.submit(["/in/a.png"])
    assert reclaimed == [0]
    assert tracker.get(snap.batch_id).progress.completed == 1


def test_resume_sends_only_pending_items(eager_app: Any) -> None:
    """After a retry, resume processes the failed items again and nothing else."""
    calls = Calls({"b.png": 1})
    tracker, _, runner = _eager(eager_app, calls, max_retries=0)
    snap = runner.submit(["/in/a.png", "/in/b.png", "/in/c.png"])
    assert tracker.get(snap.batch_id).progress.failed == 1
    assert tracker.retry(snap.batch_id) == 1
    calls.items.clear()
    runner.resume(snap.batch_id)
    assert [i.filename for i in calls.items] == ["b.png"]
    assert tracker.get(snap.batch_id).progress.completed == 3


def test_reclaim_sends_lost_items_again(eager_app: Any) -> None:
    """runner.reclaim() puts lost items back to pending and sends them to the workers."""
    clock = FakeClock()
    calls = Calls()
    tracker = BatchTracker(MemoryStore(), clock=clock, lease=10.0)
    runner = CeleryRunner(tracker, tracked_task(eager_app, tracker, calls))
    snap = tracker.create_batch([Item("a.png", source="/in/a.png"), Item("b.png")])
    tracker.start_item(snap.batch_id, snap.items[0].id)  # its worker died, its message lost
    clock.advance(11)
    assert runner.reclaim() == 1
    assert [i.filename for i in calls.items] == ["a.png"]
    final = tracker.get(snap.batch_id)
    assert [i.status for i in final.items] == [Status.COMPLETED, Status.PENDING]
    assert final.items[0].attempts == 2


def test_reclaim_sends_the_pending_items_of_a_stalled_batch_again(eager_app: Any) -> None:
    """A batch with items pending, none running and no change for ``stalled_after``
    seconds gets new messages (its own were lost), once per ``stalled_after``."""
    clock = FakeClock()
    calls = Calls()
    tracker = BatchTracker(MemoryStore(), clock=clock)
    runner = CeleryRunner(tracker, tracked_task(eager_app, tracker, calls), stalled_after=30)
    lost = tracker.create_batch([Item("a.png"), Item("b.png")])  # messages never arrived
    busy = tracker.create_batch([Item("c.png"), Item("d.png")])
    tracker.start_item(busy.batch_id, busy.items[0].id)  # one running: not stalled
    clock.advance(29)
    runner.reclaim()
    assert calls.items == []
    clock.advance(1)
    runner.reclaim()
    assert sorted(i.filename for i in calls.items) == ["a.png", "b.png"]
    assert tracker.get(lost.batch_id).status is Status.COMPLETED
    assert tracker.get(busy.batch_id).progress.pending == 1


def _sending_runner(eager_app: Any) -> tuple[FakeClock, BatchTracker, CeleryRunner, list[str]]:
    """A runner with ``stalled_after=30`` on a fake clock whose messages are only noted
    (the item ids, in ``sent``)."""
    clock = FakeClock()
    tracker = BatchTracker(MemoryStore(), clock=clock)
    runner = CeleryRunner(tracker, tracked_task(eager_app, tracker, Calls()), stalled_after=30)
    sent: list[str] = []
    runner.task.apply_async = lambda args, **options: sent.append(args[1])
    return clock, tracker, runner, sent


def test_a_stalled_batch_is_sent_again_once_per_stalled_after(eager_app: Any) -> None:
    """A stalled batch whose new messages are lost too is sent again only after another
    ``stalled_after`` seconds, not on every sweep."""
    clock, tracker, runner, sent = _sending_runner(eager_app)
    snap = tracker.create_batch([Item("a.png")])
    clock.advance(30)
    runner.reclaim()
    runner.reclaim()
    clock.advance(29)
    runner.reclaim()
    assert sent == [snap.items[0].id]
    clock.advance(1)
    runner.reclaim()
    assert sent == [snap.items[0].id] * 2


def test_a_paused_batch_is_not_stalled(eager_app: Any) -> None:
    """A paused batch's pending items are held on purpose: reclaim sends them no new
    messages, however long it stays paused."""
    clock, tracker, runner, sent = _sending_runner(eager_app)
    snap = tracker.create_batch([Item("a.png")])
    tracker.pause(snap.batch_id)
    clock.advance(300)
    runner.reclaim()
    assert sent == []
    tracker.unpause(snap.batch_id)
    clock.advance(30)
    runner.reclaim()
    assert sent == [snap.items[0].id]


@pytest.mark.parametrize("bad", [0, -1, True, "30", float("nan")])
def test_stalled_after_must_be_positive_seconds(eager_app: Any, bad: Any) -> None:
    """A bad ``stalled_after`` is a clear ValidationError."""
    tracker = BatchTracker()
    with pytest.raises(ValidationError, match="stalled_after"):
        CeleryRunner(tracker, tracked_task(eager_app, tracker, Calls()), stalled_after=bad)


def test_broker_refusing_a_message_cancels_the_batch(
    eager_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a message cannot be sent, submit raises and no item waits for it forever."""
    calls = Calls()
    tracker, task, runner = _eager(eager_app, calls)
    sent: list[tuple[str, str]] = []
    send = task.apply_async

    def refuse_second(args: tuple[str, str], **options: Any) -> Any:
        sent.append(args)
        if len(sent) == 2:
            raise ConnectionError("broker down")
        return send(args, **options)

    monkeypatch.setattr(task, "apply_async", refuse_second)
    with pytest.raises(ConnectionError):
        runner.submit(["/in/a.png", "/in/b.png", "/in/c.png"])
    final = tracker.get(sent[0][0])
    assert final.status.is_final
    assert [(i.status, i.error) for i in final.items] == [
        (Status.COMPLETED, None),
        (Status.CANCELLED, None),
        (Status.CANCELLED, None),
    ]


def test_retry_delay_doubles_with_jitter_up_to_the_cap() -> None:
    """Waits double from retry_backoff, stay within the upper half, and stop at 60 s."""
    assert retry_delay(1.0, 0, rng=lambda: 0.999999) == pytest.approx(1.0, abs=1e-5)
    assert retry_delay(1.0, 0, rng=lambda: 0.0) == 0.5
    assert retry_delay(1.0, 3, rng=lambda: 0.0) == 4.0
    assert retry_delay(1.0, 20, rng=lambda: 0.999999) <= MAX_BACKOFF
    assert retry_delay(1.0, 10_000, rng=lambda: 0.0) == MAX_BACKOFF / 2
    assert retry_delay(0.0, 5) == 0.0
    for retries in range(8):
        wait = retry_delay(2.0, retries)
        assert min(60.0, 2.0 * 2**retries) / 2 <= wait <= min(60.0, 2.0 * 2**retries)


def test_the_task_is_late_acked_and_rejected_on_worker_loss(eager_app: Any) -> None:
    """The registered task keeps its message until done and requeues it if its worker dies."""
    _, task, runner = _eager(eager_app, Calls())
    assert task.name == DEFAULT_TASK_NAME
    assert task.acks_late is True
    assert task.reject_on_worker_lost is True
    assert eager_app.tasks[DEFAULT_TASK_NAME] is task
    assert runner.processor.__class__ is Calls


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"celery_app": object()}, "celery.Celery"),
        ({"tracker": object()}, "BatchTracker"),
        ({"processor": "not callable"}, "callable"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": True}, "max_retries"),
        ({"max_retries": 1.5}, "max_retries"),
        ({"retry_backoff": -1}, "retry_backoff"),
        ({"retry_backoff": float("nan")}, "retry_backoff"),
        ({"lease": 0}, "lease"),
        ({"name": ""}, "name"),
    ],
)
def test_tracked_task_rejects_bad_arguments(
    eager_app: Any, options: dict[str, Any], message: str
) -> None:
    """Every bad argument of tracked_task is a ValidationError that names it."""
    arguments: dict[str, Any] = {
        "celery_app": eager_app,
        "tracker": BatchTracker(),
        "processor": Calls(),
        **options,
    }
    with pytest.raises(ValidationError, match=message):
        tracked_task(
            arguments.pop("celery_app"),
            arguments.pop("tracker"),
            arguments.pop("processor"),
            **arguments,
        )


def test_tracked_task_refuses_a_name_taken_in_the_app(eager_app: Any) -> None:
    """A second task under the same name would replace the first: refused."""
    tracked_task(eager_app, BatchTracker(), Calls())
    with pytest.raises(ValidationError, match="another name"):
        tracked_task(eager_app, BatchTracker(), Calls())
    assert tracked_task(eager_app, BatchTracker(), Calls(), name="second").name == "second"


def test_runner_wants_a_tracker_and_a_tracked_task(eager_app: Any) -> None:
    """CeleryRunner refuses a plain Celery task and anything but a BatchTracker."""
    tracker, task, _ = _eager(eager_app, Calls())

    def nothing() -> None:
        """A plain Celery task, not made by tracked_task."""

    plain = eager_app.task(name="plain")(nothing)
    with pytest.raises(ValidationError, match="tracked_task"):
        CeleryRunner(tracker, plain)
    with pytest.raises(ValidationError, match="BatchTracker"):
        CeleryRunner(object(), task)  # type: ignore[arg-type]


def test_submit_refuses_items_workers_could_not_read(eager_app: Any) -> None:
    """A lone string, an empty batch or a source that cannot be stored is refused."""
    calls = Calls()
    _, _, runner = _eager(eager_app, calls)
    with pytest.raises(ValidationError, match="iterable"):
        runner.submit("/in/a.png")
    with pytest.raises(ValidationError, match="source"):
        runner.submit([Item("a.png", source=b"bytes cannot be stored")])
    with pytest.raises(ValidationError):
        runner.submit([])
    assert calls.items == []


def test_import_batchtrack_does_not_import_celery() -> None:
    """Celery is only imported with batchtrack.celery, which names the extra when missing."""
    code = (
        "import sys, batchtrack\n"
        "assert 'celery' not in sys.modules\n"
        "sys.modules['celery'] = None\n"
        "try:\n"
        "    import batchtrack.celery\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert install_command("celery") in result.stdout


# -- real workers -------------------------------------------------------------------------


class Cluster:
    """A redis-server (broker and store) and Celery workers in a folder, all stopped after.

    The test process imports the same modules as the workers (the docs example and the
    test worker app), fresh, so its runners send exactly the messages the workers take.
    """

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch, *, persistent: bool) -> None:
        if not IN_CI:
            pytest.importorskip("redis")
            pytest.importorskip("PIL")
        self.root = root
        self.persistent = persistent
        self.inputs = root / "inputs"
        self.out = root / "out"
        self.data = root / "data"
        for folder in (self.inputs, self.out / "results", self.out / "tmp", root / "redis"):
            folder.mkdir(parents=True)
        self.redis, self.port = start_redis(root / "redis", persistent=persistent)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        try:
            self._connect(monkeypatch)
        except BaseException:
            self.redis.terminate()
            self.redis.wait(10)
            raise

    def _connect(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Configure workers and this process alike; import the modules the workers run."""
        settings = {
            "REDIS_URL": self.url,
            "FILES_URL": str(self.data),
            "BATCHTRACK_TEST_OUT": str(self.out),
        }
        path = [str(TESTS), str(EXAMPLES), os.environ.get("PYTHONPATH", "")]
        self.env = {**os.environ, **settings, "PYTHONPATH": os.pathsep.join(filter(None, path))}
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        monkeypatch.syspath_prepend(str(EXAMPLES))
        self.example = self._fresh("celery_app")
        self.worker_app = self._fresh("celery_worker_app")
        self.tracker: BatchTracker = self.example.tracker
        self.images: CeleryRunner = self.example.runner
        self.records = CeleryRunner(self.tracker, self.worker_app.record_task)

    @staticmethod
    def _fresh(module: str) -> ModuleType:
        sys.modules.pop(module, None)
        return importlib.import_module(module)

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        """Start ``celery worker`` (prefork, 2 processes) in its own process group."""
        with open(self.root / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                celery_worker_command(name),
                cwd=self.root,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.workers[name] = proc
        return proc

    def kill(self, name: str) -> None:
        """kill -9 a worker and its pool processes, like a machine that is gone."""
        proc = self.workers[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def restart_redis(self, down: float) -> None:
        """Stop redis-server, leave it down for ``down`` seconds, start it on the same port."""
        self.redis.terminate()
        self.redis.wait(10)
        time.sleep(down)
        self.redis, _ = start_redis(self.root / "redis", persistent=self.persistent, port=self.port)

    def stop(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.terminate()  # warm shutdown: running tasks finish
        deadline = time.monotonic() + 10
        for proc in self.workers.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
            proc.wait(10)
        with contextlib.suppress(Exception):
            self.example.app.close()
        self.images.stop_sweeper()  # web_app() starts one
        with contextlib.suppress(Exception):
            self.tracker.store.close()
        self.redis.terminate()
        self.redis.wait(10)
        for module in ("celery_worker_app", "celery_app"):
            sys.modules.pop(module, None)

    # -- inputs and what the workers did --------------------------------------------------

    def sources(self, *instructions: str) -> list[Path]:
        """One input file per instruction (``"ok 0.2"``, ``"fail 0"``) for tests.record."""
        paths = []
        for n, text in enumerate(instructions):
            path = self.inputs / f"{len(list(self.inputs.iterdir()))}-{n}.txt"
            path.write_text(text)
            paths.append(path)
        return paths

    def log(self) -> list[tuple[str, str, int]]:
        """The processor's ``(event, item id, process group)`` lines, in order."""
        path = self.out / "log.txt"
        if not path.exists():
            return []
        lines = [line.split() for line in path.read_text().splitlines()]
        return [(event, item, int(group)) for event, item, group in lines]

    def worker_logs(self, tail: int = 6000) -> str:
        """The end of every worker's log, for failure messages."""
        return "\n".join(
            f"--- {name} ---\n{(self.root / f'{name}.log').read_text(errors='replace')[-tail:]}"
            for name in self.workers
        )

    def wait(
        self, batch_id: str, until: Callable[[BatchSnapshot], bool], timeout: float = 30
    ) -> BatchSnapshot:
        """Poll the batch until ``until(snapshot)``; fail with the workers' logs if never."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                snap = self.tracker.get(batch_id)
            except StoreError:  # Redis restarting
                snap = None
            if snap is not None and until(snap):
                return snap
            if time.monotonic() > deadline:
                pytest.fail(f"batch did not get there in {timeout} s: {snap}\n{self.worker_logs()}")
            time.sleep(0.1)

    def finished(self, batch_id: str, timeout: float = 30) -> BatchSnapshot:
        return self.wait(batch_id, lambda s: s.status.is_final, timeout)

    def queue_drained(self, timeout: float = 15) -> None:
        """Wait until no message is queued or held unacknowledged by a worker."""
        import redis

        client = redis.Redis.from_url(self.url)
        try:
            deadline = time.monotonic() + timeout
            while client.llen("celery") or client.hlen("unacked"):
                if time.monotonic() > deadline:
                    pytest.fail(f"messages still queued after {timeout} s\n{self.worker_logs()}")
                time.sleep(0.1)
        finally:
            client.close()


@contextlib.contextmanager
def _cluster(root: Path, *, workers: int, persistent: bool = False) -> Iterator[Cluster]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        cluster = Cluster(root, monkeypatch, persistent=persistent)
        try:
            for n in range(workers):
                cluster.start_worker(f"w{n + 1}")
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two workers for the tests that leave them running."""
    with _cluster(tmp_path_factory.mktemp("celery"), workers=2) as cluster:
        yield cluster


def _png(path: Path, n: int) -> Path:
    from PIL import Image

    Image.new("RGB", (64 + n, 48), (n * 5 % 256, 80, 160)).save(path, "PNG")
    return path


def _results(folder: Path) -> dict[str, str]:
    """File stem -> content of every file in the folder (hidden leftovers included)."""
    return {p.name: p.read_text(errors="replace") for p in folder.iterdir()}


def test_batch_of_40_images_finishes_on_two_workers_with_exact_counts(shared: Cluster) -> None:
    """40 images on 2 workers x 2 processes, via the docs example: 40 completed, 40 results."""
    paths = [_png(shared.inputs / f"img{n}.png", n) for n in range(40)]
    snap = shared.images.submit(paths)
    final = shared.finished(snap.batch_id)
    assert final.status is Status.COMPLETED
    progress = final.progress
    assert (progress.total, progress.completed, progress.failed) == (40, 40, 0)
    assert progress.processing == progress.pending == 0
    assert all(i.attempts == 1 for i in final.items)
    written = {p.name for p in (shared.data / "results").iterdir()}
    assert {f"{i.id}.png" for i in final.items} <= written
    assert not [name for name in written if name.startswith(".")]  # nothing half-written


def test_web_tier_runs_a_batch_on_the_workers(shared: Cluster) -> None:
    """create_app(tracker, CeleryRunner, uploads) from the docs example: upload, process,
    poll and download, with the work done by the Celery workers."""
    from http_support import SyncASGIClient, jpeg

    client = SyncASGIClient(shared.example.web_app())
    try:
        files = [("files", (f"photo{n}.jpg", jpeg((320, 240)), "image/jpeg")) for n in range(3)]
        uploaded = client.post("/api/upload", files=files)
        assert uploaded.status_code == 201, uploaded.text
        ids = [f["id"] for f in uploaded.json()["files"]]
        started = client.post("/api/process-batch", json={"fileIds": ids})
        assert started.status_code == 202, started.text
        batch_id = started.json()["batchId"]
        shared.finished(batch_id)
        body = client.get(f"/api/batch-status/{batch_id}").json()
        assert body["status"] == "completed"
        assert body["progress"]["completed"] == 3
        image = body["images"][0]
        result = client.get(f"/api/batch-results/{batch_id}/{image['id']}")
        assert result.status_code == 200
        assert result.content[:3] == b"\xff\xd8\xff"  # a JPEG, made by a worker
    finally:
        client.close()


@pytest.mark.slow
def test_cancel_from_the_web_tier_stops_pending_items(shared: Cluster) -> None:
    """Cancelled items end cancelled, and no processor ever runs for them."""
    snap = shared.records.submit(shared.sources(*["ok 0.25"] * 40))
    shared.wait(snap.batch_id, lambda s: s.progress.completed >= 4)
    assert shared.records.cancel(snap.batch_id) is True
    final = shared.finished(snap.batch_id)
    shared.queue_drained()  # every message of a cancelled item was taken, and skipped
    cancelled = {i.id for i in final.items if i.status is Status.CANCELLED}
    ran = {item for _, item, _ in shared.log()}
    assert cancelled
    assert not cancelled & ran
    assert final.progress.completed + len(cancelled) == 40
    assert {i.id for i in final.items if i.status is Status.COMPLETED} <= ran


@pytest.mark.slow
def test_retry_after_injected_failures_reprocesses_only_those(shared: Cluster) -> None:
    """Items that failed run again after retry + resume; the others are left alone."""
    sources = shared.sources(*(["ok 0.05"] * 9), "fail 0.05", "fail 0.05", "fail 0.05")
    snap = shared.records.submit(sources)
    first = shared.finished(snap.batch_id)
    failed = {i.id: i for i in first.items if i.status is Status.FAILED}
    assert len(failed) == 3
    assert {i.error for i in failed.values()} == {"RuntimeError: injected failure"}
    by_source = {i.id: i.source for i in first.items}
    for item_id in failed:
        Path(str(by_source[item_id])).write_text("ok 0.05")
    seen = len(shared.log())

    assert shared.tracker.retry(snap.batch_id) == 3
    shared.records.resume(snap.batch_id)
    final = shared.finished(snap.batch_id)

    assert final.progress.completed == 12
    again = shared.log()[seen:]
    assert {item for _, item, _ in again} == set(failed)
    assert sorted(event for event, _, _ in again) == ["done"] * 3 + ["start"] * 3


@pytest.mark.slow
def test_killed_worker_loses_no_item_and_counts_none_twice(tmp_path: Path) -> None:
    """kill -9 of a worker mid-batch: its items come back, each is counted once and has
    exactly one result."""
    with _cluster(tmp_path, workers=2) as cluster:
        victim = cluster.workers["w1"].pid
        snap = cluster.records.submit(cluster.sources(*["ok 0.3"] * 40))

        def victim_is_busy(s: BatchSnapshot) -> bool:
            if s.progress.completed < 8:
                return False
            log = cluster.log()
            started = {item for event, item, group in log if event == "start" and group == victim}
            done = {item for event, item, group in log if event == "done" and group == victim}
            return bool(started - done)

        cluster.wait(snap.batch_id, victim_is_busy)
        cluster.kill("w1")
        log = cluster.log()
        begun = {i for e, i, g in log if e == "start" and g == victim}
        held = begun - {i for e, i, g in log if e == "done" and g == victim}
        cluster.start_worker("w3")
        final = cluster.finished(snap.batch_id, timeout=40)

        progress = final.progress
        assert (progress.total, progress.completed, progress.failed) == (40, 40, 0)
        assert progress.processing == progress.pending == 0
        assert held  # the killed worker had items in hand ...
        done_elsewhere = {i for e, i, g in cluster.log() if e == "done" and g != victim}
        assert held <= done_elsewhere  # ... which other workers finished
        results = _results(cluster.out / "results")
        assert results == {f"{i.id}.txt": f"{i.filename}\n" for i in final.items}
        # Only items the dead worker had begun were processed twice (at-least-once).
        starts: dict[str, int] = {}
        for event, item, _ in cluster.log():
            if event == "start":
                starts[item] = starts.get(item, 0) + 1
        assert {item for item, n in starts.items() if n > 1} <= begun


@pytest.mark.slow
def test_messages_lost_from_the_broker_are_sent_again_by_the_sweeper(tmp_path: Path) -> None:
    """Messages gone from Redis before any worker took them (a broker that lost them):
    the runner's sweeper finds the batch stalled and sends them again; it completes once."""
    import redis

    with _cluster(tmp_path, workers=0) as cluster:
        runner = CeleryRunner(cluster.tracker, cluster.worker_app.record_task, stalled_after=2)
        snap = runner.submit(cluster.sources(*["ok 0"] * 5))
        client = redis.Redis.from_url(cluster.url)
        try:
            assert client.delete("celery") == 1  # every message of the batch, gone
        finally:
            client.close()
        cluster.start_worker("w1")
        runner.start_sweeper(interval=0.5)
        try:
            final = cluster.finished(snap.batch_id, timeout=30)
        finally:
            runner.stop_sweeper()
        assert (final.progress.completed, final.progress.failed) == (5, 0)
        assert all(item.attempts == 1 for item in final.items)


def test_redis_restart_mid_batch_is_waited_out(tmp_path: Path) -> None:
    """Redis (broker and store) restarts mid-batch: workers retry, the batch completes,
    and no item is counted twice."""
    with _cluster(tmp_path, workers=2, persistent=True) as cluster:
        # A message a worker took off the queue just as Redis went down is lost (kombu
        # cannot put it back); the runner's sweeper sends a stalled batch's items again.
        runner = CeleryRunner(cluster.tracker, cluster.worker_app.record_task, stalled_after=4)
        snap = runner.submit(cluster.sources(*["ok 0.2"] * 30))
        cluster.wait(snap.batch_id, lambda s: s.progress.completed >= 6)
        runner.start_sweeper(interval=1.0)
        try:
            cluster.restart_redis(down=3.0)
            final = cluster.finished(snap.batch_id, timeout=45)
        finally:
            runner.stop_sweeper()

        progress = final.progress
        assert (progress.total, progress.completed, progress.failed) == (30, 30, 0)
        assert progress.processing == progress.pending == 0
        results = _results(cluster.out / "results")
        assert results == {f"{i.id}.txt": f"{i.filename}\n" for i in final.items}
        # The outage did reach the tasks: they met a failing store and came back.
        assert "the store failed" in cluster.worker_logs(tail=10**7)
