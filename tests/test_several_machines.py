"""Several machines, no shared disk: the setup of docs/deployment.rst, end to end.

A real S3 server (SeaweedFS), a real redis-server, two web processes
(``uvicorn --factory celery_app:web_app``) and two Celery workers, each started in an
empty folder of its own (its own TMPDIR too), sharing only the object store and Redis.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import (
    IN_CI,
    S3_ACCESS_KEY,
    S3_SECRET_KEY,
    celery_worker_command,
    create_bucket,
    start_redis,
)
from http_support import free_port, jpeg, wait_until_serving

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"
TESTS = ROOT / "tests"
BATCH_TTL = 6.0  # seconds a finished batch stays; the web tier sweeps every 6 s

pytestmark = pytest.mark.slow


class Machines:
    """The processes of the test, each in its own folder; all stopped by process group."""

    def __init__(self, root: Path, s3_endpoint: str, redis_url: str, bucket: str) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        path = [str(TESTS), str(EXAMPLES), os.environ.get("PYTHONPATH", "")]
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, path)),
            "REDIS_URL": redis_url,
            "FILES_URL": f"s3://{bucket}/app",
            "AWS_ENDPOINT_URL": s3_endpoint,
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
            "BATCHTRACK_SECRET": "one-secret-for-every-web-process",
            "BATCH_TTL": str(BATCH_TTL),
        }

    def _start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        folder = self.root / name
        (folder / "tmp").mkdir(parents=True)
        with open(self.root / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                command,
                cwd=folder,
                env={**self.env, "TMPDIR": str(folder / "tmp")},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def web(self, name: str) -> str:
        port = free_port()
        proc = self._start(
            name,
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "celery_app:web_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
        )
        base = f"http://127.0.0.1:{port}"
        wait_until_serving(f"{base}/api/openapi.json", proc, timeout=60)
        return base

    def worker(self, name: str) -> None:
        # celery_worker_app is the docs example with test timings: the message of a dead
        # worker comes back after 4 s, not 15 minutes.
        self._start(name, celery_worker_command(name))

    def kill(self, name: str) -> None:
        """kill -9 a process and its children, like a machine that is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(10)

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} ---\n{(self.root / f'{name}.log').read_text(errors='replace')[-4000:]}"
            for name in self.procs
        )

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def files_left(self) -> list[Path]:
        """Every file any process left in its own folder (none should need one)."""
        return sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix != ".log")


@pytest.fixture
def machines(tmp_path: Path, s3_endpoint: str) -> Iterator[tuple[Machines, Any]]:
    if not IN_CI:
        pytest.importorskip("celery")
        pytest.importorskip("obstore")
    bucket = f"several-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    s3 = create_bucket(s3_endpoint, bucket)
    (tmp_path / "redis").mkdir()
    redis, port = start_redis(tmp_path / "redis")
    group = Machines(tmp_path / "machines", s3_endpoint, f"redis://127.0.0.1:{port}/0", bucket)
    try:
        yield group, s3
    finally:
        group.stop()
        redis.terminate()
        redis.wait(10)


def _wait(client: httpx.Client, url: str, done: Any, machines: Machines, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        answer = client.get(url)
        body = answer.json()
        if done(answer, body):
            return body
        if time.monotonic() > deadline:
            pytest.fail(f"not there in {timeout} s: {body}\n{machines.logs()}")
        time.sleep(0.2)


def test_two_webs_and_two_workers_share_only_the_object_store_and_redis(
    machines: tuple[Machines, Any],
) -> None:
    """Upload through web 1, start through web 2, kill -9 a worker mid-batch: exact counts,
    every result and the ZIP from either web, and expiry empties the bucket's results."""
    group, s3 = machines
    web1, web2 = group.web("web1"), group.web("web2")
    group.worker("worker1")
    group.worker("worker2")
    count = 20
    with (
        httpx.Client(base_url=web1, timeout=60) as one,
        httpx.Client(base_url=web2, timeout=60) as two,
    ):
        files = [
            ("files", (f"photo{n}.jpg", jpeg((2400, 1800), (n * 10, 90, 200)), "image/jpeg"))
            for n in range(count)
        ]
        ids = []
        for start in range(0, count, 10):  # at most 10 files per request
            up = one.post("/api/upload", files=files[start : start + 10])
            assert up.status_code == 201, up.text
            ids += [f["id"] for f in up.json()["files"]]
        # The same user on the other web process: its signed cookie is honoured there.
        two.cookies.update(one.cookies)
        started = two.post("/api/process-batch", json={"fileIds": ids[:10]})
        assert started.status_code == 202, started.text
        # At most 10 files per batch over HTTP: the rest go in a second batch.
        second = two.post("/api/process-batch", json={"fileIds": ids[10:20]})
        assert second.status_code == 202, second.text
        batches = [started.json()["batchId"], second.json()["batchId"]]
        status = f"/api/batch-status/{batches[0]}"
        _wait(one, status, lambda a, b: b["progress"]["completed"] >= 2, group, 60)
        group.kill("worker1")
        finals = [
            _wait(
                (one, two)[n],
                f"/api/batch-status/{batch}",
                lambda a, b: b["status"] in ("completed", "failed"),
                group,
                120,
            )
            for n, batch in enumerate(batches)
        ]
        for final in finals:
            assert final["status"] == "completed", final
            assert final["progress"] == {
                "total": 10,
                "completed": 10,
                "failed": 0,
                "processing": 0,
                "pending": 0,
                "cancelled": 0,
            }
        keys = {info["path"] for info in s3.list("app/results/")}
        items = [image for final in finals for image in final["images"]]
        assert keys == {f"app/results/{image['id']}.jpg" for image in items}
        for n, (batch, final) in enumerate(zip(batches, finals, strict=True)):
            for m, image in enumerate(final["images"]):
                web = (one, two)[(n + m) % 2]
                result = web.get(f"/api/batch-results/{batch}/{image['id']}")
                assert result.status_code == 200, result.text
                assert result.content[:3] == b"\xff\xd8\xff"
            for web in (one, two):
                archive = web.get(f"/api/batch-results/{batch}.zip")
                assert archive.status_code == 200, archive.text
                with zipfile.ZipFile(io.BytesIO(archive.content)) as z:
                    assert len(z.namelist()) == 10
                    assert z.testzip() is None
        # Nothing of the files ever touched a web or worker machine's own disk.
        assert group.files_left() == []
        # Expiry: the web tier's sweeper removes the batches and their results.
        for batch in batches:
            _wait(
                one,
                f"/api/batch-status/{batch}",
                lambda a, b: a.status_code == 404,
                group,
                BATCH_TTL * 4 + 30,
            )
        deadline = time.monotonic() + 30
        while list(s3.list("app/results/")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert list(s3.list("app/results/")) == []
