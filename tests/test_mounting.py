"""The framework-mounting examples in docs/examples run for real."""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from http_support import SyncASGIClient, jpeg

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


@pytest.fixture(autouse=True)
def _examples_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))


def _asgi(app: Any) -> Any:
    return SyncASGIClient(app)


def _wsgi(app: Any) -> Any:
    return httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://testserver")


def _example(module: str, factory: str) -> Callable[[Path], Any]:
    pytest.importorskip(module.removeprefix("mount_"))
    return getattr(importlib.import_module(module), factory)  # type: ignore[no-any-return]


CASES = {
    "starlette": ("mount_starlette", "create", _asgi),
    "flask": ("mount_flask", "create", _wsgi),
    "django-asgi": ("mount_django", "create_asgi", _asgi),
    "django-wsgi": ("mount_django", "create_wsgi", _wsgi),
}


@pytest.fixture(params=sorted(CASES))
def mounted(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    module, factory, connect = CASES[request.param]
    client = connect(_example(module, factory)(tmp_path))
    yield client
    client.close()
    sys.modules.pop(module, None)


def test_framework_keeps_its_own_routes_and_serves_the_api_under_batch(mounted: Any) -> None:
    """The framework still answers /; batchtrack answers under /batch, end to end."""
    assert mounted.get("/").text == "my app"
    doc = mounted.get("/batch/api/openapi.json").json()
    assert doc["servers"] == [{"url": "/batch/api"}]
    up = mounted.post("/batch/api/upload", files=[("files", ("a.jpg", jpeg(), "image/jpeg"))])
    assert up.status_code == 201, up.text
    started = mounted.post(
        "/batch/api/process-batch", json={"fileIds": [up.json()["files"][0]["id"]]}
    ).json()
    assert started["statusUrl"].startswith("/batch/api/batch-status/")
    deadline = time.monotonic() + 30
    while (body := mounted.get(started["statusUrl"]).json())["status"] != "completed":
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    assert body["progress"]["completed"] == 1
