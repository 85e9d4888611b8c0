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
            "cancelled",
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

    # More than 10 images: none goes unless the first 10 are kept; Start stays disabled.
    page.choose(*many)
    assert "at most 10" in page.text("message")
    assert page.text("offer") == "Upload the first 10"
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

    # Cancel: what had not started is cancelled (not failed); the words match the bar.
    assert page.shown("cancel")
    page.el("cancel").click()
    wait(lambda: "Cancelled" in page.text("message"), what="the cancel")
    wait(page.finished, what="the cancelled batch to finish")
    counts = page.counts()
    assert counts["failed"] == 1
    cancelled = int(page.text("cancelled"))
    assert cancelled >= 1
    headline = page.text("headline")
    assert headline == (
        f"Cancelled: {counts['done']} processed, 1 failed, {cancelled} not started."
    )
    assert "cancelled" in page.text("rows")
    bar = page.el("bar").rect["width"]
    expected = [bar * counts["done"] / 9, bar / 9, bar * cancelled / 9, 0]
    # The segments' widths animate: wait for them to settle where the counts say.
    wait(
        lambda: all(
            abs(w - e) < 2
            for w, e in zip(
                page.js(
                    "return ['seg-done', 'seg-failed', 'seg-cancelled', 'seg-running'].map("
                    "(id) => document.getElementById(id).getBoundingClientRect().width)"
                ),
                expected,
                strict=True,
            )
        ),
        5,
        "the stacked bar to show processed, failed, cancelled and running",
    )
    assert not page.shown("cancel")
    page.shot("cancelled")

    # Retry the failed ones: the cancelled images are processed, broken.jpg fails again.
    page.el("retry").click()
    wait(lambda: "again" in page.text("message"), what="the retry")
    wait(lambda: page.finished() and page.counts()["done"] == 8, 60, "the retried batch")
    assert page.counts() == {"done": 8, "failed": 1, "running": 0, "waiting": 0}
    assert page.text("headline") == "Finished: 8 processed, 1 failed."
    assert page.text("eta") == "done"
    assert page.text("message") == (
        f"Retry finished: {cancelled} of {cancelled + 1} processed, 1 failed again."
    )
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


def upload_batch(page: Page, *paths: Path) -> str:
    """Choose ``paths``, press Upload and start, and return the new batch's id."""
    page.choose(*paths)
    page.el("start").click()
    wait(lambda: "?batch=" in page.browser.current_url, what="the batch in the URL")
    return str(page.browser.current_url.rpartition("?batch=")[2])


def small_jpegs(folder: Path, count: int, stem: str = "holiday-photo") -> list[Path]:
    """``count`` small valid JPEGs named ``<stem>-00.jpg``, ``<stem>-01.jpg``, ..."""
    paths = [folder / f"{stem}-{n:02d}.jpg" for n in range(count)]
    for n, path in enumerate(paths):
        path.write_bytes(jpeg((64, 48), (30 * n % 256, 120, 200)))
    return paths


BROKEN_WORDS = """
const broken = [];
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
for (let node = walker.nextNode(); node; node = walker.nextNode()) {
  const element = node.parentElement;
  // A batch id is one long word that must break; clipped text for screen readers is
  // never on screen.
  if (!element || element.closest("script, style, #batch-id")) continue;
  if (!element.getClientRects().length) continue;
  let clipped = false;
  for (let e = element; e; e = e.parentElement) {
    if (getComputedStyle(e).clip !== "auto") clipped = true;
  }
  if (clipped) continue;
  // A word: what lies between spaces and hyphens (a line may end after a hyphen).
  const words = /[^\\s\\-–]+/g;
  let word;
  while ((word = words.exec(node.textContent))) {
    const range = document.createRange();
    range.setStart(node, word.index);
    range.setEnd(node, word.index + word[0].length);
    const lines = new Set(Array.from(range.getClientRects())
      .filter((r) => r.width > 0).map((r) => Math.round(r.bottom)));
    if (lines.size > 1) broken.push(word[0] + " in " + element.tagName + "#" + element.id);
  }
}
return broken;
"""
"""A script that lists each word on screen drawn across more than one line (its parts
between hyphens are words: "meeting-" may end a line, "meet" may not)."""


def test_the_eta_range_holds_its_point_in_the_point_s_unit(
    browser: Any, slow_server: tuple[str, Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    """A range is shown in the point's unit, holds the point as shown, and only when it
    says more than the point."""
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
    assert left(40, [30, 55]) == "about 40 s (30–55 s)"
    assert left(None, None) == "estimating…"
    # Not "about 1 s (0–2 min)" nor "about 1 s (1–1 s)":
    assert left(1, [0, 120]) == "about 1 s (up to 120 s)"
    assert left(1, [1, 1]) == "about 1 s"
    assert left(61, [59, 65]) == "about 1 min"  # both ends are "1 min"
    # Rounded to minutes, the ends are widened to hold the point as shown.
    assert left(100, [95, 110]) == "about 2 min"
    assert left(100, [80, 170]) == "about 2 min (1–3 min)"
    assert left(150, [60, 150]) == "about 3 min (1–3 min)"
    assert left(4000, [3000, 7200]) == "about 1 h 7 min (1–2 h)"
    # A range that does not hold its point is not shown.
    assert left(30, [40, 60]) == "about 30 s"


def test_a_finished_batch_reads_time_left_done(
    browser: Any, slow_server: tuple[str, Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    """A finished batch (completed, failed or cancelled) reads "Time left: done"."""
    base, _, _ = slow_server
    browser.get(base + "/")
    page = Page(browser, base, tmp_path)
    for status in ("completed", "failed", "cancelled"):
        body = {
            "status": status,
            "estimatedTimeRemaining": 0,
            "estimatedTimeRemainingRange": [0, 0],
        }
        assert page.js("return timeLeft(arguments[0])", body) == "done"


def test_no_eta_says_why_when_the_server_gives_the_reason(
    browser: Any, slow_server: tuple[str, Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    """``etaUnavailable`` reads "estimating…" while starting and names lost images."""
    base, _, _ = slow_server
    browser.get(base + "/")
    page = Page(browser, base, tmp_path)

    def left(reason: str | None) -> str:
        body: dict[str, Any] = {"status": "processing", "estimatedTimeRemaining": None}
        if reason is not None:
            body["etaUnavailable"] = reason
        return str(page.js("return timeLeft(arguments[0])", body))

    assert left("starting") == "estimating…"
    assert left("waiting_for_lost_items") == "waiting for lost images to be retried"
    assert left("paused") == "paused"
    assert left(None) == "estimating…"
    assert left("some future reason") == "estimating…"


def body_at(
    seconds: float, status: str, completed: int, failed: int, pending: int = 0
) -> dict[str, Any]:
    """A status body of a 2-image batch created at 10:00:00, last changed ``seconds`` later."""
    at = f"2026-01-01T10:{int(seconds) // 60:02d}:{int(seconds) % 60:02d}Z"
    finished = status in ("completed", "failed")
    return {
        "batchId": "b",
        "status": status,
        "progress": {
            "total": 2,
            "completed": completed,
            "failed": failed,
            "processing": 2 - completed - failed - pending,
            "pending": pending,
        },
        "images": [],
        "createdAt": "2026-01-01T10:00:00Z",
        "updatedAt": at,
        "finishedAt": at if finished else None,
    }


def test_the_rate_counts_the_run_since_a_retry_not_the_batch_s_life(
    browser: Any, slow_server: tuple[str, Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    """After a retry the rate counts the images finished since the batch reopened, over
    the time since then, not over the whole life of the batch."""
    base, _, _ = slow_server
    browser.get(base + "/")
    page = Page(browser, base, tmp_path)
    seen = "let run = null; for (const b of arguments[0]) run = nextRun(run, b); "
    shown = seen + "return rate(run, arguments[0][arguments[0].length - 1]);"

    first_run = [body_at(0, "processing", 0, 0, 1), body_at(2, "completed", 1, 1)]
    assert page.js(shown, first_run) == "1.0 images/s"
    # Retried 98 s later: one image back to pending, failed again 1 s after the retry.
    retried = [*first_run, body_at(100, "processing", 1, 0, 1), body_at(101, "completed", 1, 1)]
    assert page.js(shown, retried) == "1.0 images/s"  # not 2 images in 101 s
    # The page saw only the end of the retry (finished, open, finished): the same run.
    unseen = [*first_run, body_at(100, "processing", 1, 0), body_at(101, "completed", 1, 1)]
    assert page.js(shown, unseen) == "1.0 images/s"
    # A batch first seen finished: its runs are unknown, so no rate rather than a wrong one.
    assert page.js(shown, [body_at(101, "completed", 1, 1)]) == "–"
    # Slow runs (under one image in 2 s) read as time per image.
    slow = [body_at(0, "processing", 0, 0, 1), body_at(8, "processing", 1, 0)]
    assert page.js(shown, slow) == "1 image every 8 s"
    steady = [body_at(0, "processing", 0, 0, 1), body_at(2, "processing", 1, 0)]
    assert page.js(shown, steady) == "0.5 images/s"


def test_the_retry_message_is_replaced_by_its_outcome_when_the_retry_ends(
    browser: Any, slow_server: tuple[str, Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    """ "Trying 1 failed image again." gives way to what became of it once the run ends."""
    base, _, _ = slow_server
    page = Page(browser, base, tmp_path)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not really a picture")
    browser.get(base + "/")
    upload_batch(page, broken, *small_jpegs(tmp_path, 1))
    wait(page.finished, what="the batch to finish")
    page.el("retry").click()
    wait(lambda: page.text("message") == "Trying 1 failed image again.", what="the retry")
    wait(lambda: "Retry finished" in page.text("message"), 30, "the retry to end")
    assert page.text("message") == "Retry finished: 0 of 1 processed, 1 failed again."
    assert page.text("headline") == "Finished: 1 processed, 1 failed."


def test_cancelled_images_look_cancelled_not_failed(
    browser: Any, slow_server: tuple[str, Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    """After Cancel, the images that had not started read "cancelled" in grey, apart from
    failures, and the summary counts them as not started."""
    base, _, _ = slow_server
    page = Page(browser, base, tmp_path)
    browser.get(base + "/")
    upload_batch(page, *small_jpegs(tmp_path, 8))  # 8 s: time to press Cancel
    wait(lambda: page.counts()["done"] >= 1, what="the first image processed")
    page.el("cancel").click()
    wait(page.finished, what="the cancelled batch to finish")
    done, cancelled = page.counts()["done"], int(page.text("cancelled"))
    assert done + cancelled == 8
    assert cancelled >= 1
    assert page.counts()["failed"] == 0
    assert page.text("headline") == f"Cancelled: {done} processed, {cancelled} not started."
    assert page.shown("cancelled-count")
    rows = page.js(
        "return Array.from(document.querySelectorAll('#rows .state')).map((e) => "
        "[e.textContent, getComputedStyle(e).color, e.nextElementSibling.textContent])"
    )
    grey = page.js("return getComputedStyle(document.querySelector('.batch-id')).color")
    assert sorted(state for state, _, _ in rows) == ["cancelled"] * cancelled + (
        ["processed"] * done
    )
    for state, color, reason in rows:
        if state == "cancelled":
            assert color == grey, rows
            assert reason == "", rows  # no red "cancelled" reason under it
    assert page.el("retry").text == "Process the cancelled images"
    page.shot("cancelled")


def test_pause_holds_the_waiting_images_and_resume_processes_them(
    browser: Any, slow_server: tuple[str, Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    """Pause stops new images from starting (the batch reads "Paused", no ETA, a Resume
    button); Resume processes the waiting ones and the batch completes."""
    base, _, _ = slow_server
    page = Page(browser, base, tmp_path)
    browser.get(base + "/")
    upload_batch(page, *small_jpegs(tmp_path, 6))
    wait(lambda: page.counts()["done"] >= 1, what="the first image processed")
    page.el("pause").click()
    wait(lambda: page.text("headline").startswith("Paused"), what="the batch to read paused")
    assert page.text("message") == "Paused: no new image starts; the ones running finish."
    assert page.shown("unpause")
    assert not page.shown("pause")
    wait(lambda: page.counts()["running"] == 0, what="the running image to finish")
    held = page.counts()
    time.sleep(2.5)  # more than one image's time: a paused batch starts nothing
    assert page.counts() == held
    assert held["waiting"] >= 1
    assert page.text("eta") == "paused"
    page.el("unpause").click()
    wait(page.finished, 30, "the resumed batch to finish")
    assert page.counts()["done"] == 6
    assert page.text("headline") == "Finished: all 6 images processed."
    assert not page.shown("unpause")
    assert not page.shown("pause")


def test_cancelled_items_with_their_own_status_read_the_same(
    browser: Any, slow_server: tuple[str, Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    """A body with status "cancelled" items and a ``cancelled`` count (CONTRACT §9) reads
    as one with items failed "cancelled" (the server's form today)."""
    base, _, _ = slow_server
    browser.get(base + "/")
    page = Page(browser, base, tmp_path)
    images = [{"id": f"i{n}", "filename": f"{n}.jpg", "status": "completed"} for n in range(6)]
    today = {
        "status": "completed",
        "progress": {"total": 10, "completed": 6, "failed": 4, "processing": 0, "pending": 0},
        "images": images
        + [
            {"id": f"c{n}", "filename": f"c{n}.jpg", "status": "failed", "error": "cancelled"}
            for n in range(4)
        ],
    }
    contract = {
        "status": "cancelled",
        "progress": {
            "total": 10,
            "completed": 6,
            "failed": 0,
            "cancelled": 4,
            "processing": 0,
            "pending": 0,
        },
        "images": images
        + [{"id": f"c{n}", "filename": f"c{n}.jpg", "status": "cancelled"} for n in range(4)],
    }
    for body in (today, contract):
        assert page.js("return headline(arguments[0])", body) == (
            "Cancelled: 6 processed, 4 not started."
        )
        assert page.js("return tally(arguments[0])", body) == {
            "total": 10,
            "done": 6,
            "failed": 0,
            "cancelled": 4,
            "running": 0,
            "waiting": 0,
        }


def test_a_batch_that_is_not_yours_says_so_without_a_loading_bar(
    browser: Any, slow_server: tuple[str, Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    """Another browser's batch (or an unknown one) reads "does not exist or is not yours",
    with no "Loading…" and no empty bar left under it."""
    import httpx

    base, _, _ = slow_server
    with httpx.Client(base_url=base) as other:  # another browser: its own session
        up = other.post("/api/upload", files=[("files", ("a.jpg", jpeg((32, 32)), "image/jpeg"))])
        ids = [f["id"] for f in up.json()["files"]]
        batch_id = other.post("/api/process-batch", json={"fileIds": ids}).json()["batchId"]
    page = Page(browser, base, tmp_path)
    for batch in (batch_id, "00000000-0000-4000-8000-000000000000"):
        browser.get(f"{base}/?batch={batch}")
        wait(lambda: page.text("message"), what="the explanation")
        assert page.text("message") == (
            "This batch does not exist or is not yours (finished batches are kept for an hour)."
        )
        assert page.text("batch-id") == batch
        assert page.text("progress-title") == "Batch not found"
        assert not page.shown("headline")
        assert not page.shown("bar")
        assert not page.shown("table")
        assert "Loading" not in page.text("progress")
        assert page.shown("new")
    page.shot("not-yours")
    browser.get(base + "/?batch=not-a-batch")
    wait(lambda: "names no batch" in page.text("message"), what="the explanation")
    assert page.shown("picker")


def test_no_word_breaks_in_the_middle_at_320_px(
    browser: Any, slow_server: tuple[str, Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    """At 320 px wide, buttons, labels and names wrap between words, never inside one."""
    base, _, _ = slow_server
    page = Page(browser, base, tmp_path)
    browser.set_window_size(320, 900)
    browser.get(base + "/")
    wait(lambda: page.js("return window.innerWidth") <= 320, what="the narrow window")
    broken = tmp_path / "scanned-receipt.jpg"
    broken.write_bytes(b"this is not really a picture")
    notes = tmp_path / "meeting-notes.txt"
    notes.write_text("not an image")
    photos = small_jpegs(tmp_path, 7)  # 8 s: the batch is seen running, then cancelled
    page.choose(photos[0], broken, *photos[1:], notes)
    assert page.js(BROKEN_WORDS) == []
    page.shot("chosen-320px")
    upload_batch(page, photos[0], broken, *photos[1:])
    wait(lambda: page.counts()["failed"] == 1 and page.shown("cancel"), what="mid-batch")
    assert page.js(BROKEN_WORDS) == []
    page.shot("in-progress-320px")
    page.el("cancel").click()
    wait(page.finished, what="the cancelled batch")
    assert page.js(BROKEN_WORDS) == []
    assert page.js("return document.documentElement.scrollWidth") <= 320
    page.shot("finished-320px")


def test_too_many_images_offer_to_upload_the_first_max_files(
    browser: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``serve --max-files 3``, choosing 5 images offers to upload the first 3, and a
    click on the offer starts a batch of those 3."""
    import httpx

    monkeypatch.setenv("BATCHTRACK_TEST_ITEM_DELAY", "0.2")
    base, proc = start_serve(tmp_path / "data", tmp_path / "serve.log", "--max-files", "3")
    try:
        page = Page(browser, base, tmp_path)
        browser.get(base + "/")
        assert page.text("max-files") == "3"  # the page learns the limit from the server
        photos = small_jpegs(tmp_path, 5)
        page.choose(*photos)
        assert page.text("message").startswith("You chose 5 images; at most 3 go in one batch.")
        assert not page.el("start").is_enabled()
        page.shot("too-many")
        page.el("offer").click()
        wait(lambda: "?batch=" in browser.current_url, what="the batch of the first 3")
        wait(page.finished, what="the batch to finish")
        assert page.text("headline") == "Finished: all 3 images processed."
        names = page.js(
            "return Array.from(document.querySelectorAll('#rows .name'), (e) => e.textContent)"
        )
        assert names == [p.name for p in photos[:3]]
        # The API enforces the same limit.
        four = [("files", (f"{n}.jpg", jpeg((16, 16)), "image/jpeg")) for n in range(4)]
        refused = httpx.post(base + "/api/upload", files=four)
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "too_many_files"
    finally:
        stop_serve(proc)


def test_serve_refuses_a_max_files_below_one_in_one_line(tmp_path: Path) -> None:
    """``serve --max-files 0`` is a usage error: exit 2, one line, nothing served."""
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "batchtrack", "serve", "--max-files", "0"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "batchtrack serve: error: argument --max-files: expected a number >= 1, got 0"
    )
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


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
            f"{Path(__file__)}::test_a_batch_that_is_not_yours_says_so_without_a_loading_bar",
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


def test_a_running_image_shows_a_thin_bar_with_its_percentage_and_stage(
    browser: Any, slow_server: tuple[str, Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    """While an image runs, its row shows the progress its processor reports (a thin bar,
    the percentage and the stage); the bar is gone once the image is processed."""
    from selenium.webdriver.common.by import By

    base, _, _ = slow_server
    page = Page(browser, base, tmp_path)
    browser.get(base + "/")
    # Four images: about four seconds in which one runs, for a page polled every two
    # seconds on a loaded machine to see one reporting.
    upload_batch(page, *small_jpegs(tmp_path, 4))

    def reporting() -> Any:
        for row in browser.find_elements(By.CSS_SELECTOR, "#rows tr"):
            inside = row.find_element(By.CSS_SELECTOR, ".item-progress")
            if inside.is_displayed() and inside.text.endswith("% \u00b7 test delay"):
                return row, inside
        return None

    row, inside = wait(reporting, what="a running image's progress")
    page.shot("item-progress")
    assert row.find_element(By.CSS_SELECTOR, ".state").text == "running"
    percent = int(inside.text.split("%")[0])
    assert 0 <= percent <= 100
    bar = inside.find_element(By.CSS_SELECTOR, ".item-bar")
    assert bar.get_attribute("aria-valuenow") == str(percent)
    wait(page.finished, 30, "the batch to finish")
    assert not [
        r for r in browser.find_elements(By.CSS_SELECTOR, ".item-progress") if r.is_displayed()
    ]


def test_recent_batches_lead_back_to_a_batch_whose_address_was_lost(
    browser: Any, slow_server: tuple[str, Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    """The picker lists this session's recent batches newest first (when, how many
    images, status); a click opens the batch; another session sees no list."""
    from selenium.webdriver.common.by import By

    base, _, _ = slow_server
    page = Page(browser, base, tmp_path)
    browser.get(base + "/")
    assert not page.shown("recent")
    first = upload_batch(page, *small_jpegs(tmp_path, 2, "first"))
    page.el("new").click()
    second = upload_batch(page, *small_jpegs(tmp_path, 3, "second"))
    browser.get(base + "/")  # the address of the batch is lost

    def entries() -> list[Any]:
        return list(browser.find_elements(By.CSS_SELECTOR, "#recent-list li"))

    wait(lambda: len(entries()) == 2, what="two recent batches")
    assert page.shown("recent")
    assert page.text("recent-title") == "Your recent batches"
    texts = [e.text for e in entries()]
    assert "3 images" in texts[0]
    assert "2 images" in texts[1]
    links = browser.find_elements(By.CSS_SELECTOR, "#recent-list a")
    assert [a.get_attribute("href").rpartition("?batch=")[2] for a in links] == [second, first]
    page.shot("recent-batches")
    links[1].click()
    wait(lambda: page.text("batch-id") == first, what="the first batch opened")
    assert browser.current_url.endswith("?batch=" + first)
    wait(page.finished, 30, "the first batch to finish")
    assert page.text("headline") == "Finished: all 2 images processed."
    browser.delete_all_cookies()
    browser.get(base + "/")
    time.sleep(0.5)
    assert not page.shown("recent")
