"""The framework-mounting examples in docs/examples run for real."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from http_support import SyncASGIClient, free_port, jpeg

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


def _page_in_starlette(data_dir: Path) -> Any:
    pytest.importorskip("starlette")
    from service import parts
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    import batchtrack.asgi

    async def home(request: object) -> PlainTextResponse:
        return PlainTextResponse("my app")

    app = batchtrack.asgi.create_app(*parts(data_dir), page=True)
    return _asgi(Starlette(routes=[Route("/", home), Mount("/batch", app=app)]))


def _page_in_flask(data_dir: Path) -> Any:
    pytest.importorskip("flask")
    from flask import Flask
    from service import parts
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    import batchtrack.wsgi

    flask = Flask(__name__)
    flask.add_url_rule("/", "home", lambda: "my app")
    app = batchtrack.wsgi.create_app(*parts(data_dir), page=True)
    flask.wsgi_app = DispatcherMiddleware(flask.wsgi_app, {"/batch": app})  # type: ignore[method-assign]
    return _wsgi(flask)


@pytest.mark.parametrize("make", [_page_in_starlette, _page_in_flask], ids=["starlette", "flask"])
def test_integrators_mount_the_page_with_the_api(
    make: Callable[[Path], Any], tmp_path: Path
) -> None:
    """create_app(..., page=True) under /batch: the page at /batch/ calls the API at
    /batch/api, its icon is at /batch/favicon.ico, and the framework keeps its own /."""
    client = make(tmp_path)
    try:
        assert client.get("/").text == "my app"
        page = client.get("/batch/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["content-security-policy"].startswith("default-src 'self'")
        assert '"api": "/batch/api"' in page.text
        assert 'href="/batch/favicon.ico"' in page.text
        icon = client.get("/batch/favicon.ico")
        assert icon.status_code == 200
        assert icon.headers["content-type"] == "image/x-icon"
        up = client.post("/batch/api/upload", files=[("files", ("a.jpg", jpeg(), "image/jpeg"))])
        assert up.status_code == 201, up.text
    finally:
        client.close()


DOCS_HTTP = EXAMPLES.parent / "http.rst"

# The file each command of http.rst's "Mounting into a framework" imports, and the module
# the framework needs.
SERVED = {
    "uvicorn asgi:app": ("asgi.py", "starlette"),
    "flask --app wsgi run": ("wsgi.py", "flask"),
    "uvicorn django_asgi:app": ("django_asgi.py", "django"),
}


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(SERVED))
def test_mounting_files_serve_with_the_command_the_docs_give(command: str, tmp_path: Path) -> None:
    """The docs' asgi.py / wsgi.py / django_asgi.py, copied into an empty folder beside the
    examples they import, serve the framework's / and the API under /batch when started
    with the docs' command (only the port added) in a real server process."""
    file, framework = SERVED[command]
    pytest.importorskip(framework)
    page = DOCS_HTTP.read_text()
    assert f".. literalinclude:: examples/{file}" in page
    assert f"\n    {command}" in page
    for example in EXAMPLES.glob("*.py"):
        shutil.copy(example, tmp_path)
    port = free_port()
    program, *args = command.split()
    proc = subprocess.Popen(
        [sys.executable, "-m", program, *args, "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                home = httpx.get(f"{base}/", timeout=5)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        assert home.text == "my app"
        doc = httpx.get(f"{base}/batch/api/openapi.json", timeout=5)
        assert doc.status_code == 200
        assert doc.json()["servers"] == [{"url": "/batch/api"}]
        assert (tmp_path / "batchtrack-data" / "batches.db").is_file()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
