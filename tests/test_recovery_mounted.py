"""Recovery without a lifespan: a mounted ASGI app and a WSGI app take back their batches
after a restart on their first request; with a lifespan, at startup, once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchtrack import BatchSnapshot, BatchTracker, Orchestrator, SQLiteStore, Status
from batchtrack._recovery import Recovery
from batchtrack.uploads import UploadStore
from http_support import free_port, jpeg, wait_until_serving

SRC = Path(__file__).resolve().parent.parent / "src"
FINISH = 60.0  # a generous upper bound for "the batch finished"
IMAGES = 9

# The service of these tests: the docs' mounting example (docs/examples/service.py and
# mount_starlette.py) with a lease of 1 s, so that the items a killed server was running
# are lost soon, and the tests' delay before each image.
SERVICE = '''
import os
import time
from pathlib import Path

from batchtrack import BatchTracker, Orchestrator, SQLiteStore
from batchtrack._test_delay import item_delay
from batchtrack.imaging import ImagePipeline
from batchtrack.uploads import UploadStore

DATA = Path(os.environ["DATA_DIR"])


class Slow:
    def __init__(self, pipeline, delay):
        self.pipeline, self.delay, self.results = pipeline, delay, pipeline.results

    def __call__(self, item):
        time.sleep(self.delay)
        return self.pipeline(item)


def parts():
    (DATA / "results").mkdir(parents=True, exist_ok=True)
    tracker = BatchTracker(SQLiteStore(DATA / "batches.db"), lease=1.0)
    pipeline = ImagePipeline(DATA / "results")
    orchestrator = Orchestrator(tracker, Slow(pipeline, item_delay()), concurrency=2)
    return tracker, orchestrator, UploadStore(DATA / "uploads")


def starlette():
    import batchtrack.asgi
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    async def home(request):
        return PlainTextResponse("my app")

    return Starlette(
        routes=[Route("/", home), Mount("/batch", app=batchtrack.asgi.create_app(*parts()))]
    )


def plain_asgi():
    import batchtrack.asgi

    return batchtrack.asgi.create_app(*parts())


def wsgi():
    """The WSGI app under /batch of a minimal framework that answers / itself."""
    import batchtrack.wsgi

    api = batchtrack.wsgi.create_app(*parts())

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path.startswith("/batch/"):
            environ["SCRIPT_NAME"], environ["PATH_INFO"] = "/batch", path[len("/batch"):]
            return api(environ, start_response)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"my app"]

    return app


if __name__ == "__main__":  # python service.py PORT: the WSGI app under wsgiref
    import sys
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    make_server("127.0.0.1", int(sys.argv[1]), wsgi(), Server, Quiet).serve_forever()
'''


class Server:
    """The service in a subprocess (uvicorn or wsgiref) over one data folder."""

    def __init__(self, folder: Path, kind: str) -> None:
        self.folder = folder
        self.kind = kind
        (folder / "service.py").write_text(SERVICE)
        self.env = {
            **os.environ,
            "DATA_DIR": str(folder / "data"),
            "BATCHTRACK_TEST_ITEM_DELAY": "1",
            "PYTHONPATH": os.pathsep.join([str(folder), str(SRC)]),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = ""
        self.api = "/api" if kind == "lifespan" else "/batch/api"

    def start(self) -> None:
        port = free_port()
        if self.kind == "wsgi":
            command = [sys.executable, "service.py", str(port)]
        else:
            factory = "service:starlette" if self.kind == "mounted" else "service:plain_asgi"
            command = [sys.executable, "-m", "uvicorn", "--factory", factory]
            command += ["--port", str(port), "--log-level", "warning"]
        with open(self.folder / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                command, cwd=self.folder, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        self.base = f"http://127.0.0.1:{port}"
        if self.kind == "lifespan":  # the app answers every path: wait for its socket only
            _wait_for_port(port, self.proc)
        else:
            wait_until_serving(f"{self.base}/", self.proc)  # the framework's /, not batchtrack

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def tracker(self) -> BatchTracker:
        return BatchTracker(SQLiteStore(self.folder / "data" / "batches.db"))


def _wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    import socket

    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        assert proc.poll() is None, "the server exited"
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)


@pytest.fixture
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    """The service of kind ``request.param``, stopped after the test."""
    pytest.importorskip("PIL")
    if request.param != "wsgi":
        pytest.importorskip("uvicorn")
    if request.param == "mounted":
        pytest.importorskip("starlette")
    made = Server(tmp_path, request.param)
    yield made
    made.stop()


def _start_batch(server: Server) -> str:
    """Upload IMAGES images and start a batch of them through the API under /batch."""
    with httpx.Client(base_url=server.base, timeout=30) as client:
        files = [("files", (f"p{n}.jpg", jpeg((64, 48)), "image/jpeg")) for n in range(IMAGES)]
        uploaded = client.post(f"{server.api}/upload", files=files)
        assert uploaded.status_code == 201, uploaded.text
        ids = [f["id"] for f in uploaded.json()["files"]]
        started = client.post(f"{server.api}/process-batch", json={"fileIds": ids})
        assert started.status_code == 202, started.text
        return str(started.json()["batchId"])


def _until(server: Server, batch_id: str, condition: Any) -> BatchSnapshot:
    tracker = server.tracker()
    try:
        deadline = time.monotonic() + FINISH
        while True:
            snap = tracker.get(batch_id)
            if condition(snap):
                return snap
            assert time.monotonic() < deadline, f"never got there: {snap.progress}"
            time.sleep(0.1)
    finally:
        tracker.store.close()


def _kill_mid_batch(server: Server) -> str:
    server.start()
    batch_id = _start_batch(server)
    _until(server, batch_id, lambda s: s.progress.completed >= 1 and s.progress.processing)
    server.kill()
    left = _until(server, batch_id, lambda s: True)
    assert not left.status.is_final
    assert left.progress.completed < IMAGES
    return batch_id


@pytest.mark.parametrize("server", ["mounted", "wsgi"], indirect=True)
def test_a_restarted_server_finishes_the_batch_after_one_request(server: Server) -> None:
    """Starlette mounting the ASGI app under uvicorn (no lifespan reaches it), and the WSGI
    app under wsgiref: killed (-9) mid-batch and started again, one request to the API
    makes the batch finish on its own, with exact counts."""
    batch_id = _kill_mid_batch(server)
    server.start()
    time.sleep(1.5)  # the framework's own / asked, and time passing, start nothing
    assert _until(server, batch_id, lambda s: True).progress.completed < IMAGES
    assert httpx.get(f"{server.base}/batch/api/openapi.json", timeout=10).status_code == 200
    final = _until(server, batch_id, lambda s: s.status.is_final)
    assert final.status is Status.COMPLETED
    progress = final.progress
    assert (progress.total, progress.completed, progress.failed) == (IMAGES, IMAGES, 0)
    assert progress.processing == progress.pending == 0


@pytest.mark.parametrize("server", ["lifespan"], indirect=True)
def test_with_a_lifespan_the_batch_finishes_without_any_request(server: Server) -> None:
    """The ASGI app served directly by uvicorn (which sends the lifespan) resumes at
    startup: the batch a killed server left finishes with no request at all."""
    batch_id = _kill_mid_batch(server)
    server.start()
    final = _until(server, batch_id, lambda s: s.status.is_final)
    assert (final.progress.completed, final.progress.failed) == (IMAGES, 0)


def _recovery_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "batchtrack-recovery"]


def test_recovery_starts_once_with_a_lifespan_and_stops_at_its_shutdown(tmp_path: Path) -> None:
    """Lifespan startup starts one recovery thread, requests start no other, and lifespan
    shutdown stops it."""
    import batchtrack.asgi

    tracker = BatchTracker(SQLiteStore(tmp_path / "b.db"))
    with Orchestrator(tracker, str) as orch:
        app = batchtrack.asgi.create_app(tracker, orch, UploadStore(tmp_path / "uploads"))
        before = len(_recovery_threads())
        sent: list[str] = []

        async def drive() -> None:
            startup = asyncio.Event()
            shutdown = asyncio.Event()
            messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

            async def receive() -> dict[str, Any]:
                message = messages.pop(0)
                if message["type"] == "lifespan.shutdown":
                    await shutdown.wait()
                return message

            async def send(message: dict[str, Any]) -> None:
                sent.append(message["type"])
                if message["type"] == "lifespan.startup.complete":
                    startup.set()

            life = asyncio.ensure_future(app({"type": "lifespan"}, receive, send))
            await startup.wait()
            assert len(_recovery_threads()) == before + 1
            for _ in range(3):
                await _get(app, "/api/openapi.json")
            assert len(_recovery_threads()) == before + 1
            shutdown.set()
            await life

        asyncio.run(drive())
        assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        assert len(_recovery_threads()) == before


async def _get(app: Any, path: str) -> int:
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    scope = {"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b""}
    await app(scope, receive, send)
    return status[0]


def test_first_requests_from_many_threads_start_one_recovery(tmp_path: Path) -> None:
    """A WSGI app's first requests, arriving together from several threads, start one
    recovery thread."""
    import batchtrack.wsgi

    tracker = BatchTracker(SQLiteStore(tmp_path / "b.db"))
    with Orchestrator(tracker, str) as orch:
        app = batchtrack.wsgi.create_app(tracker, orch, UploadStore(tmp_path / "uploads"))
        before = len(_recovery_threads())
        gate = threading.Barrier(8)

        def call() -> None:
            with httpx.Client(
                transport=httpx.WSGITransport(app=app), base_url="http://t"
            ) as client:
                gate.wait()
                client.get("/api/openapi.json")

        threads = [threading.Thread(target=call) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(_recovery_threads()) == before + 1
        app._recovery.stop()
        assert len(_recovery_threads()) == before


def test_only_batches_of_the_apps_own_uploads_are_resumed(tmp_path: Path) -> None:
    """A pending batch whose items are no uploads of this app (made in code, with paths)
    is left alone; one made of the app's uploads is resumed."""
    tracker = BatchTracker(SQLiteStore(tmp_path / "b.db"))
    uploads = UploadStore(tmp_path / "uploads")
    stored = uploads.save("a.jpg", __import__("io").BytesIO(b"x"))
    theirs = tracker.create_batch(["x.jpg"])
    from batchtrack import Item

    ours = tracker.create_batch([Item("a.jpg", source=stored.location)])
    with Orchestrator(tracker, str) as orch:
        assert Recovery(tracker, orch, uploads).recover() == 1
        assert orch.wait(ours.batch_id, timeout=FINISH).status is Status.COMPLETED
    assert tracker.get(theirs.batch_id).progress.pending == 1


EXITING = """
import logging, sys
from pathlib import Path
import httpx
import batchtrack.wsgi
from batchtrack import BatchTracker, Orchestrator, SQLiteStore
from batchtrack.uploads import UploadStore

logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
folder = Path(sys.argv[1])
tracker = BatchTracker(SQLiteStore(folder / "b.db"))
orch = Orchestrator(tracker, str)
app = batchtrack.wsgi.create_app(tracker, orch, UploadStore(folder / "uploads"))
with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as client:
    assert client.get("/api/openapi.json").status_code == 200
print("served", flush=True)
"""


def test_recovery_stops_cleanly_at_interpreter_exit(tmp_path: Path) -> None:
    """A WSGI app's recovery, started by a request, is stopped when the interpreter exits:
    the process ends at once and says so in its log."""
    result = subprocess.run(
        [sys.executable, "-c", EXITING, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "served"
    assert "batchtrack: recovery stopped" in result.stderr
