"""Store reads per second of 300 events streams on one batch: polling vs woken by the store.

For each store (memory; Redis when ``redis-server`` is installed, a real one started
here), and each way of watching it:

- *polling* (before): the store wrapped as one that cannot listen, so that every stream
  reads the batch every ``events_poll`` seconds (0.5, the default), as before issue 22;
- *woken* (after): the store listens; each stream reads when the store reports a change,
  and the streams of the process share one read per change.

the ASGI app runs under uvicorn (one server, in a thread of this process) with its store
wrapped to count reads (``load``, ``load_items``, ``changed_since``), and 300 clients in
another process follow ``GET /api/batch-events/{id}`` (raw sockets, asyncio). Once every
stream has sent its first event, reads are counted for a few seconds:

- *idle*: a 10-item batch (one item running) where nothing happens;
- *busy*: a 200-item batch where one change (a start or a completion, from a tracker on
  the same store, in this process) happens 20 times a second.

Goals: idle costs ~0 reads/s; busy costs about the changes (20/s), not the streams. The
events each stream received per second are reported too, to show that the woken streams
still see the changes.

``python benchmarks/bench_watch.py --clients BASE BATCH N`` is the client process.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

from batchtrack import BatchTracker, MemoryStore, Orchestrator
from batchtrack.asgi import create_app
from batchtrack.stores.base import Store
from batchtrack.uploads import UploadStore

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from counting_store import CountingStore  # noqa: E402
from http_support import uvicorn_server  # noqa: E402

SESSION = "b" * 32
OWNER = f"session:{SESSION}"
CHANGES_PER_SECOND = 20


@attrs.frozen
class Rates:
    """Reads per second of one scenario, polling (before) vs woken (after)."""

    name: str
    before: float
    after: float
    goal: float  # the most reads/s woken streams may cost
    events_before: float  # events per stream per second, polling
    events_after: float  # ... woken

    @property
    def passed(self) -> bool:
        return self.after <= self.goal

    def line(self) -> str:
        verdict = "ok" if self.passed else "MISSED"
        return (
            f"{self.name:<44} reads/s: polling {self.before:6.1f}, woken {self.after:5.1f}  "
            f"(events/stream/s {self.events_before:5.2f}, {self.events_after:5.2f})  "
            f"goal <= {self.goal:g} {verdict}"
        )


# -- the client process ----------------------------------------------------------------------


async def _clients(base: str, batch_id: str, count: int) -> None:
    """Follow the batch's events with ``count`` connections; print READY once each has
    its first event, then the number of events received whenever a line arrives on
    stdin; end at EOF."""
    host, port = base.removeprefix("http://").split(":")
    received = [0] * count
    ready = asyncio.Event()
    started = 0

    async def follow(n: int) -> None:
        nonlocal started
        reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 22)
        writer.write(
            f"GET /api/batch-events/{batch_id} HTTP/1.1\r\nHost: {host}\r\n"
            f"Cookie: batchtrack_session={SESSION}\r\n\r\n".encode()
        )
        await writer.drain()
        while line := await reader.readline():
            if line.startswith(b"id: "):
                received[n] += 1
                if received[n] == 1:
                    started += 1
                    if started == count:
                        ready.set()

    tasks = [asyncio.ensure_future(follow(n)) for n in range(count)]
    await ready.wait()
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, sys.stdin.readline):
        print(sum(received), flush=True)
    for task in tasks:
        task.cancel()


@attrs.define
class Clients:
    """The client process, driven from here."""

    proc: subprocess.Popen[str]

    @classmethod
    def start(cls, base: str, batch_id: str, count: int) -> Clients:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--clients", base, batch_id, str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "READY":
            proc.kill()
            raise RuntimeError("the clients did not all get their first event")
        return cls(proc)

    def received(self) -> int:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# -- the server, in this process -------------------------------------------------------------


@contextlib.contextmanager
def _serving(store: Store, folder: Path) -> Iterator[str]:
    """The ASGI app over ``store`` under uvicorn in a thread; yields the base URL."""
    tracker = BatchTracker(store)
    runner = Orchestrator(tracker, lambda item: None, concurrency=1)
    app = create_app(tracker, runner, UploadStore(folder / "uploads"), events_poll=0.5)
    try:
        with uvicorn_server(app) as base:  # the tests' real server
            yield base
    finally:
        runner.close()


def _changes(tracker: BatchTracker, batch_id: str, items: list[str]) -> Iterator[Callable[[], Any]]:
    """One change after another: start an item, complete it, the next one."""
    for item_id in items:
        yield lambda item_id=item_id: tracker.start_item(batch_id, item_id)
        yield lambda item_id=item_id: tracker.complete_item(batch_id, item_id)


def _measure(
    inner: Store, listen: bool, streams: int, seconds: float, busy: bool, folder: Path
) -> tuple[float, float]:
    """(store reads per second, events per stream per second) of one scenario."""
    counting = CountingStore(inner, listen=listen)
    tracker = BatchTracker(inner)
    items = 200 if busy else 10
    snap = tracker.create_batch([f"{n}.jpg" for n in range(items)], owner=OWNER)
    ids = [item.id for item in snap.items]
    tracker.start_item(snap.batch_id, ids[-1])  # running, so that it is not final
    with _serving(counting, folder) as base:
        clients = Clients.start(base, snap.batch_id, streams)
        try:
            time.sleep(1.0)  # the listener's first wake-up and its re-reads
            received = clients.received()
            counting.take()
            began = time.monotonic()
            if busy:
                changes = _changes(tracker, snap.batch_id, ids[:-1])
                for n in range(int(seconds * CHANGES_PER_SECOND)):
                    next(changes)()
                    time.sleep(max(began + (n + 1) / CHANGES_PER_SECOND - time.monotonic(), 0))
            else:
                time.sleep(seconds)
            time.sleep(0.3)  # the last change's events
            elapsed = time.monotonic() - began
            reads = counting.take()
            events = clients.received() - received
        finally:
            clients.stop()
    return reads / elapsed, events / streams / elapsed


def _stores(folder: Path) -> Iterator[tuple[str, Callable[[], Store]]]:
    yield "memory", MemoryStore
    if shutil.which("redis-server") is None:
        print("watch: redis-server is not installed; Redis skipped")
        return
    from batchtrack.stores.redis import RedisStore
    from conftest import start_redis  # the same real server the tests use

    proc, port = start_redis(folder)
    try:
        n = 0

        def redis_store() -> Store:
            nonlocal n
            n += 1
            return RedisStore(f"redis://127.0.0.1:{port}/0", prefix=f"bench-{n}:")

        yield "redis", redis_store
    finally:
        proc.terminate()
        proc.wait(10)


def run(quick: bool = False) -> list[Rates]:
    streams = 100 if quick else 300
    seconds = 3.0 if quick else 5.0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, make in _stores(folder):
            for busy in (False, True):
                rates = []
                for listen in (False, True):
                    store = make()
                    try:
                        rates.append(_measure(store, listen, streams, seconds, busy, folder))
                    finally:
                        store.close()
                what = f"busy ({CHANGES_PER_SECOND} changes/s)" if busy else "idle"
                goal = 1.5 * CHANGES_PER_SECOND if busy else 1.0
                (before, seen_before), (after, seen_after) = rates
                name_ = f"watch: {name}, {streams} streams, {what}"
                results.append(Rates(name_, before, after, goal, seen_before, seen_after))
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["--clients"]:
        asyncio.run(_clients(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    else:
        for result in run(quick="--quick" in sys.argv):
            print(result.line())
