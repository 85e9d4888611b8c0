"""schemathesis with every check against a real `batchtrack serve`: the document is true.

The schemathesis command line runs as a subprocess against the server's own
``GET /api/openapi.json``, with ``--checks all`` and a bounded number of examples per
operation, once as an anonymous client and once as the session that owns a real batch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("schemathesis")

from batchtrack._http import COOKIE
from http_support import jpeg
from test_cli import start_serve, stop_serve

MAX_EXAMPLES = 100
"""Test cases per operation and phase: enough to find a mismatch, and a run of ~10 s."""

OPERATIONS = {
    ("POST", "upload"),
    ("POST", "process-batch"),
    ("GET", "batch-status"),
    ("GET", "batch-events"),
    ("GET", "batch-results"),
    ("POST", "batch-cancel"),
    ("POST", "batch-retry"),
}
"""Every operation of the document, as (method, first path segment below /api)."""

CONFIG = """\
# Validate the first event of a stream and hang up, instead of waiting for it to close.
max-stream-events = 1

[checks.negative_data_rejection]
# schemathesis' default and 413: an id list longer than `maxItems` can be a body too large
# to read, and the server refuses such a body before it parses it.
expected-statuses = [
    "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx",
]
"""

KNOWN_IDS = """
# Known values: about half of the ids generated are the real batch's and its items'.
[dictionaries.batch]
values = {batch}

[dictionaries.items]
values = {items}

[parameters]
"path.batchId" = {{ dictionary = "batch", probability = 0.5 }}
"path.itemId" = {{ dictionary = "items", probability = 0.5 }}
"body.itemIds[*]" = {{ dictionary = "items", probability = 0.5 }}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`batchtrack serve` on a free port over a fresh data folder; yields its base URL."""
    folder = tmp_path_factory.mktemp("serve")
    base, proc = start_serve(folder / "data", folder / "serve.log")
    yield base
    stop_serve(proc)


def _real_batch(base: str) -> tuple[str, str, list[str]]:
    """A finished batch of a new session: a small JPEG completed, a truncated one failed.

    Returns the session cookie's value, the batch id and the item ids.
    """
    good = jpeg((64, 48))
    files = [("good.jpg", good), ("broken.jpg", good[: len(good) // 3])]
    with httpx.Client(base_url=base, timeout=30) as client:
        uploaded = client.post(
            "/api/upload", files=[("files", (name, data, "image/jpeg")) for name, data in files]
        )
        assert uploaded.status_code == 201, uploaded.text
        ids = [f["id"] for f in uploaded.json()["files"]]
        started = client.post("/api/process-batch", json={"fileIds": ids})
        assert started.status_code == 202, started.text
        deadline = time.monotonic() + 30
        while (body := client.get(started.json()["statusUrl"]).json())["finishedAt"] is None:
            assert time.monotonic() < deadline, body
            time.sleep(0.05)
        assert [i["status"] for i in body["images"]] == ["completed", "failed"], body
        return client.cookies[COOKIE], body["batchId"], [i["id"] for i in body["images"]]


def _schemathesis(
    base: str, folder: Path, config: str, *headers: str
) -> tuple[subprocess.CompletedProcess[str], set[tuple[str, str, int]]]:
    """Run ``schemathesis run --checks all`` against the server's document.

    Returns the finished process and every (method, first path segment, status) it saw.
    """
    folder.mkdir()
    (folder / "schemathesis.toml").write_text(config)
    har = folder / "requests.har"
    command = [
        *(sys.executable, "-m", "schemathesis.cli"),
        *("--config-file", str(folder / "schemathesis.toml")),
        *("run", f"{base}/api/openapi.json"),
        *("--checks", "all"),
        *("--max-examples", str(MAX_EXAMPLES)),
        # One worker: Python 3.11's ast.parse, which Hypothesis calls, is not thread-safe.
        *("--workers", "1"),
        *("--request-timeout", "10"),
        *("--generation-database", "none"),
        *("--report", "har", "--report-har-path", str(har)),
        *("--no-color", "--output-truncate", "true"),
        *(argument for header in headers for argument in ("--header", header)),
    ]
    result = subprocess.run(
        command, cwd=folder, capture_output=True, text=True, timeout=300, check=False
    )
    seen: set[tuple[str, str, int]] = set()
    if har.exists():
        for entry in json.loads(har.read_text())["log"]["entries"]:
            request: dict[str, Any] = entry["request"]
            below = request["url"].partition("/api/")[2]
            seen.add((request["method"], below.split("/")[0], entry["response"]["status"]))
    return result, seen


def _report(result: subprocess.CompletedProcess[str]) -> str:
    """What schemathesis found, from its failures on (its whole output if it found none)."""
    output = result.stdout + result.stderr
    for heading in ("= FAILURES =", "= ERRORS ="):
        if heading in output:
            output = output[output.rfind("\n", 0, output.index(heading)) + 1 :]
            break
    return output[:20_000]


def _assert_every_operation_called(seen: set[tuple[str, str, int]]) -> None:
    called = {(method, segment) for method, segment, _ in seen}
    assert called >= OPERATIONS, f"not called: {sorted(OPERATIONS - called)}"


def test_document_agrees_with_the_server_for_anonymous_clients(server: str, tmp_path: Path) -> None:
    """Every schemathesis check passes for every operation, requests without a session."""
    result, seen = _schemathesis(server, tmp_path / "anonymous", CONFIG)
    assert result.returncode == 0, _report(result)
    _assert_every_operation_called(seen)


def test_document_agrees_with_the_server_for_the_owner_of_a_real_batch(
    server: str, tmp_path: Path
) -> None:
    """Every schemathesis check passes for every operation, requests in the session that
    owns a finished batch, whose ids they use about half of the time."""
    session, batch_id, item_ids = _real_batch(server)
    known = KNOWN_IDS.format(batch=json.dumps([batch_id]), items=json.dumps(item_ids))
    result, seen = _schemathesis(
        server, tmp_path / "owner", CONFIG + known, f"Cookie: {COOKIE}={session}"
    )
    assert result.returncode == 0, _report(result)
    _assert_every_operation_called(seen)
    # The real batch was reached: its status, its events and its completed item's result.
    assert {
        ("GET", "batch-status", 200),
        ("GET", "batch-events", 200),
        ("GET", "batch-results", 200),
    } <= seen
