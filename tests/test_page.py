"""The demo page in a real browser (headless Chromium) against a real `batchtrack serve`.

Every step leaves a screenshot in the test's ``tmp_path / "screenshots"`` (and, when the
environment variable ``BATCHTRACK_SCREENSHOTS`` names a folder, a copy there).
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from http_support import jpeg
from test_cli import start_serve, stop_serve

pytest.importorskip("python_multipart")

DELAY = 1.0
"""Seconds each image waits before it is processed (BATCHTRACK_TEST_ITEM_DELAY)."""


@pytest.fixture
def slow_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, Path, subprocess.Popen[str]]]:
    """`batchtrack serve` (one image at a time, each DELAY seconds late) on a free port."""
    monkeypatch.setenv("BATCHTRACK_TEST_ITEM_DELAY", str(DELAY))
    data = tmp_path / "data"
    base, proc = start_serve(data, tmp_path / "serve.log")
    yield base, data, proc
    stop_serve(proc)


def noise_jpeg(path: Path, seed: int) -> Path:
    """A JPEG of random pixels (about 1 MB: it does not compress), for a visible upload."""
    pixels = random.Random(seed).randbytes(640 * 480 * 3)
    Image.frombytes("RGB", (640, 480), pixels).save(path, "JPEG", quality=95)
    return path


def wait(condition: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
    """The first true value of ``condition()``, polled every 50 ms."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.05)


class Page:
    """The page in the browser, as the test sees it."""

    def __init__(self, browser: Any, base: str, shots: Path) -> None:
        self.browser, self.base, self.shots = browser, base, shots
        self.count = 0

    def el(self, element_id: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.browser.find_element(By.ID, element_id)

    def text(self, element_id: str) -> str:
        return str(self.el(element_id).text)

    def shown(self, element_id: str) -> bool:
        return bool(self.el(element_id).is_displayed())

    def js(self, script: str, *args: Any) -> Any:
        return self.browser.execute_script(script, *args)

    def choose(self, *paths: Path) -> None:
        """Choose these files in the file input (a new choice, not added to the last)."""
        picker = self.el("files")
        self.js("arguments[0].value = '';", picker)
        picker.send_keys("\n".join(str(p) for p in paths))

    def shot(self, name: str) -> Path:
        """A screenshot of the whole page, numbered in the order taken."""
        self.count += 1
        path = self.shots / f"{self.count:02d}-{name}.png"
        height = self.js("return document.documentElement.scrollHeight")
        width = self.js("return window.innerWidth")
        size = self.browser.get_window_size()
        self.browser.set_window_size(size["width"], max(size["height"], height + 120))
        self.browser.save_screenshot(str(path))
        self.browser.set_window_size(size["width"], size["height"])
        assert width > 0
        assert path.stat().st_size > 5_000
        copy = os.environ.get("BATCHTRACK_SCREENSHOTS")
        if copy:
            Path(copy).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(copy) / path.name)
        return path

    def counts(self) -> dict[str, int]:
        return {k: int(self.text(k)) for k in ("done", "failed", "running", "waiting")}

    def finished(self) -> bool:
        return self.js("return document.getElementById('progress').dataset.status") in (
            "completed",
            "failed",
        )

    def cookies(self) -> str:
        return "; ".join(f"{c['name']}={c['value']}" for c in self.browser.get_cookies())

    def get(self, url: str) -> tuple[int, dict[str, str], bytes]:
        """GET ``url`` (relative to the page) with urllib, in the browser's session."""
        absolute = url if url.startswith("http") else self.base + url
        request = urllib.request.Request(absolute, headers={"Cookie": self.cookies()})
        with urllib.request.urlopen(request, timeout=30) as response:
            headers = {k.lower(): v for k, v in response.headers.items()}
            return response.status, headers, response.read()


def test_a_person_uses_the_page_from_upload_to_zip(
    browser: Any, slow_server: tuple[str, Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    """Choose, upload (with progress), reload mid-batch, cancel, retry, download the ZIP,
    go back and forward, and read the failure on a phone: what a person does."""
    base, data, _ = slow_server
    shots = tmp_path / "screenshots"
    shots.mkdir()
    page = Page(browser, base, shots)
    photos = [noise_jpeg(tmp_path / f"photo{n}.jpg", n) for n in range(8)]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not really a picture")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    huge = tmp_path / "huge.jpg"
    huge.write_bytes(jpeg((64, 64)) + bytes(21 * 2**20))  # 21 MB, over the 20 MB limit
    many = [tmp_path / f"small{n}.jpg" for n in range(11)]
    for path in many:
        path.write_bytes(jpeg((32, 32)))

    browser.get(base + "/")
    assert browser.title.startswith("batchtrack")
    assert page.text("max-files") == "10"  # the limits come from the server
    assert page.text("max-size") == "20 MB"
    assert not page.el("start").is_enabled()

    # A text file and a file over the limit: named, refused before any upload.
    page.choose(notes, huge)
    message = page.text("message")
    assert "notes.txt is not an image" in message
    assert "huge.jpg is too large (21.0 MB, the limit is 20 MB per image)" in message
    assert not page.el("start").is_enabled()
    page.shot("refused-before-upload")
    assert not list((data / "uploads").glob("*")), "nothing may have been uploaded"

    # More than 10 images: refused as a whole, Start stays disabled.
    page.choose(*many)
    assert "at most 10" in page.text("message")
    assert not page.el("start").is_enabled()

    # The real choice, the refused file named among them.
    page.choose(photos[0], broken, *photos[1:], notes)
    assert "notes.txt is not an image" in page.text("message")
    assert page.el("start").text == "Upload and start (9 images)"
    page.shot("chosen")

    # Upload over a throttled link, so that its progress can be seen.
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": 3e6},
    )
    page.el("start").click()
    percent = wait(
        lambda: (
            0 < int(page.el("upload-bar").get_attribute("value") or 0) < 100
            and page.text("upload-text")
        ),
        what="the upload progress",
    )
    assert percent.startswith("Uploading: ")
    assert " MB of " in percent or " of " in percent
    page.shot("upload-progress")
    wait(lambda: "?batch=" in browser.current_url, what="the batch in the URL")
    browser.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    batch_id = browser.current_url.rpartition("?batch=")[2]
    assert page.text("batch-id") == batch_id
    assert not page.shown("picker")

    # Reload mid-batch: the page picks the batch up from its URL.
    wait(
        lambda: page.counts()["done"] >= 1 and page.counts()["failed"] >= 1,
        what="the first image processed and broken.jpg failed",
    )
    browser.refresh()
    wait(
        lambda: page.text("batch-id") == batch_id and page.text("headline") != "Loading…",
        what="the batch after the reload",
    )
    counts = page.counts()
    assert counts["waiting"] > 0, "the batch should still be running after the reload"
    assert counts["failed"] == 1  # broken.jpg went second
    headline = page.text("headline")
    assert headline.startswith("Processing: ")
    assert f"{counts['done'] + counts['failed']} of 9 finished" in headline
    page.shot("reloaded-mid-batch")

    # Cancel: what had not started fails "cancelled"; the words match the bar.
    assert page.shown("cancel")
    page.el("cancel").click()
    wait(lambda: "Cancelled" in page.text("message"), what="the cancel")
    wait(page.finished, what="the cancelled batch to finish")
    counts = page.counts()
    assert counts["failed"] >= 2
    headline = page.text("headline")
    assert headline == f"Finished: {counts['done']} processed, {counts['failed']} failed."
    assert "cancelled" in page.text("rows")
    bar = page.el("bar").rect["width"]
    expected = [bar * counts["done"] / 9, bar * counts["failed"] / 9, 0]
    # The segments' widths animate: wait for them to settle where the counts say.
    wait(
        lambda: all(
            abs(w - e) < 2
            for w, e in zip(
                page.js(
                    "return ['seg-done', 'seg-failed', 'seg-running'].map("
                    "(id) => document.getElementById(id).getBoundingClientRect().width)"
                ),
                expected,
                strict=True,
            )
        ),
        5,
        "the stacked bar to show processed, failed and running",
    )
    assert not page.shown("cancel")
    page.shot("cancelled")

    # Retry the failed ones: the cancelled images are processed, broken.jpg fails again.
    page.el("retry").click()
    wait(lambda: "again" in page.text("message"), what="the retry")
    wait(lambda: page.finished() and page.counts()["done"] == 8, 60, "the retried batch")
    assert page.counts() == {"done": 8, "failed": 1, "running": 0, "waiting": 0}
    assert page.text("headline") == "Finished: 8 processed, 1 failed."
    assert page.text("eta") == "none: finished"
    broken_row = page.text("rows").split("\n")
    assert any("not an image" in line for line in broken_row), broken_row
    # Thumbnails of the results, loaded for real.
    loaded = page.js(
        "return Array.from(document.querySelectorAll('#rows img.thumb[src]'))"
        ".map((img) => img.complete && img.naturalWidth)"
    )
    assert len(loaded) == 8
    assert all(w == 640 for w in loaded), loaded
    page.shot("retried-and-finished")

    # Download all as ZIP: the link the page shows, fetched in the browser's session.
    href = page.el("zip").get_attribute("href")
    assert href.endswith(f"/api/batch-results/{batch_id}.zip")
    status, headers, body = page.get(href)
    assert status == 200
    assert headers["content-type"] == "application/zip"
    assert headers["content-disposition"].startswith("attachment")
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert sorted(archive.namelist()) == [f"photo{n}.jpg" for n in range(8)]
        for name in archive.namelist():
            with Image.open(io.BytesIO(archive.read(name))) as image:
                assert image.format == "JPEG"
                assert image.size == (640, 480)

    # Back to the empty form, forward to the finished batch.
    browser.back()
    wait(lambda: page.shown("picker"), what="the form after going back")
    assert "batch=" not in browser.current_url
    browser.forward()
    wait(lambda: page.finished() and page.text("batch-id") == batch_id, what="forward")
    assert page.text("headline") == "Finished: 8 processed, 1 failed."

    # A phone (390 px): the failure reason is on screen, nothing scrolls sideways.
    browser.set_window_size(390, 844)
    wait(lambda: page.js("return window.innerWidth") <= 390, what="the narrow window")
    reason = page.js(
        "return Array.from(document.querySelectorAll('#rows .reason'))"
        ".find((e) => e.textContent.includes('not an image'))"
    )
    assert reason is not None
    assert reason.is_displayed()
    box = reason.rect
    assert box["x"] >= 0
    assert box["x"] + box["width"] <= 390
    assert page.js("return document.documentElement.scrollWidth") <= page.js(
        "return window.innerWidth"
    )
    page.shot("phone-390px")
    browser.set_window_size(1100, 1000)

    # A new batch: the form again, at the page's own address.
    page.el("new").click()
    assert page.shown("picker")
    assert "batch=" not in browser.current_url
    assert page.text("chosen") == "No images chosen yet."
    page.shot("new-batch")

    severe = [
        entry
        for entry in browser.get_log("browser")
        if entry["level"] == "SEVERE" and "favicon" not in entry["message"]
    ]
    assert not [e for e in severe if "Content Security Policy" in e["message"]], severe
    assert not [e for e in severe if "Uncaught" in e["message"]], severe


def test_the_page_shows_the_eta_and_its_range_in_words(
    browser: Any, slow_server: tuple[str, Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    """The ETA reads "about 2 min (1–3 min)" with a range, "about 2 min" without one."""
    base, _, _ = slow_server
    browser.get(base + "/")
    page = Page(browser, base, tmp_path)

    def left(eta: Any, eta_range: Any = "absent") -> str:
        body: dict[str, Any] = {"status": "processing", "estimatedTimeRemaining": eta}
        if eta_range != "absent":
            body["estimatedTimeRemainingRange"] = eta_range
        return str(page.js("return timeLeft(arguments[0])", body))

    assert left(120, [60, 180]) == "about 2 min (1–3 min)"
    assert left(120, None) == "about 2 min"
    assert left(120) == "about 2 min"
    assert left(25, [10, 40]) == "about 25 s (10–40 s)"
    assert left(None, None) == "estimating…"
    assert left(4000, [3000, 7200]) == "about 1 h 7 min (50 min–2 h)"
    assert page.js(
        "return timeLeft({status: 'completed', estimatedTimeRemaining: 0,"
        " estimatedTimeRemainingRange: [0, 0]})"
    ) == ("none: finished")


def test_an_unknown_batch_in_the_url_says_so(
    browser: Any, slow_server: tuple[str, Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    """A batch id that the server does not know (expired, another browser's) is explained."""
    base, _, _ = slow_server
    browser.get(base + "/?batch=00000000-0000-4000-8000-000000000000")
    page = Page(browser, base, tmp_path)
    wait(lambda: "no longer exists" in page.text("message"), what="the explanation")
    assert page.shown("new")
    browser.get(base + "/?batch=not-a-batch")
    wait(lambda: "names no batch" in page.text("message"), what="the explanation")
    assert page.shown("picker")


@pytest.mark.parametrize(("ci", "outcome"), [("true", "1 error"), ("", "1 skipped")])
def test_a_missing_browser_fails_in_ci_and_is_skipped_elsewhere(
    tmp_path: Path, ci: str, outcome: str
) -> None:
    """Without Chromium on the PATH the page tests are skipped, but with CI=true they fail."""
    import sys

    env = {**os.environ, "PATH": str(tmp_path), "CI": ci}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"{Path(__file__)}::test_an_unknown_batch_in_the_url_says_so",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    assert outcome in result.stdout, result.stdout + result.stderr
    if ci:
        assert "CI needs chromium and chromium-driver" in result.stdout
        assert result.returncode == 1
    else:
        assert result.returncode == 0
