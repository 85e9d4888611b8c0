"""Shared fixtures: a fake clock, every store, and the Hypothesis profiles."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from batchtrack import BatchTracker, MemoryStore, SQLiteStore
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

STORE_NAMES = [*sorted(ALL_STORES), "redis"]


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


@pytest.fixture(params=STORE_NAMES)
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """A factory for fresh stores of each kind in turn; every store made is closed after."""
    made: list[Store] = []
    if request.param == "redis":
        from batchtrack.stores.redis import RedisStore

        url = request.getfixturevalue("redis_url")

        def make() -> Store:
            return RedisStore(url, prefix=f"test-{uuid.uuid4()}:")

    else:
        make = ALL_STORES[request.param](tmp_path)

    def factory() -> Store:
        store = make()
        made.append(store)
        return store

    yield factory
    for store in made:
        store.close()


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
