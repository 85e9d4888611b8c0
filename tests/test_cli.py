"""The batchtrack command through real subprocesses, a real server and a real browser."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from http_support import free_port, jpeg, wait_until_serving

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def batchtrack(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchtrack", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two good images (one in a subfolder), a truncated JPEG and a text file."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "one.jpg").write_bytes(jpeg((1200, 900)))
    Image.new("RGBA", (300, 300), (0, 0, 255, 255)).save(root / "sub" / "two.png")
    whole = jpeg((1200, 900))
    (root / "sub" / "broken.jpg").write_bytes(whole[: len(whole) // 3])
    (root / "notes.txt").write_text("not an image")
    return root


# -- process ---------------------------------------------------------------------------------


def test_process_folder_with_a_broken_file(folder: Path, tmp_path: Path) -> None:
    """Images by content, recursively; a broken one fails: exit 1, JSON counts on stdout."""
    out = tmp_path / "out" / "nested"
    result = batchtrack("process", str(folder), "--out", str(out), "--json", "--max-size", "300")
    assert result.returncode == 1, result.stderr
    body = json.loads(result.stdout)  # stdout is exactly the status body
    assert body["progress"] == {
        "total": 3,
        "completed": 2,
        "failed": 1,
        "processing": 0,
        "pending": 0,
    }
    assert [i["filename"] for i in body["images"]] == ["one.jpg", "broken.jpg", "two.png"]
    assert body["images"][1]["error"] == "truncated image"
    assert sorted(p.name for p in out.iterdir()) == ["one.jpg", "two.png"]
    with Image.open(out / "one.jpg") as image:
        assert max(image.size) == 300
    assert "broken.jpg" in result.stderr
    assert "truncated image" in result.stderr
    assert "Traceback" not in result.stderr


def test_process_all_good_exits_zero(folder: Path, tmp_path: Path) -> None:
    """Only good files given: exit 0; --format converts."""
    result = batchtrack(
        "process",
        str(folder / "one.jpg"),
        str(folder / "sub" / "two.png"),
        "--out",
        str(tmp_path / "o"),
        "--format",
        "webp",
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["one.webp", "two.webp"]
    assert "2 of 2 images processed, 0 failed" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["process", "no/such/path", "--out", "o"], "no such file or folder"),
        (["process", "."], "--out"),
        (["process", ".", "--out", "o", "--concurrency", "0"], "--concurrency"),
        (["process", ".", "--out", "o", "--format", "gif"], "--format"),
        (["status"], "BATCH_ID"),
        (["status", "x", "--data-dir", "no/such/dir"], "no batchtrack database"),
        (["serve", "--port", "70000"], "--port"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    """Usage errors: exit 2, one line on stderr naming the problem, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "batchtrack", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert message in lines[-1]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_version_and_help() -> None:
    """--version prints the version; every command has --help."""
    assert batchtrack("--version").stdout.startswith("batchtrack ")
    for command in ("serve", "process", "status"):
        result = batchtrack(command, "--help")
        assert result.returncode == 0
        assert "usage: batchtrack " + command in result.stdout


# -- serve -------------------------------------------------------------------------------------


def start_serve(data: Path, log: Path, *options: str) -> tuple[str, subprocess.Popen[str]]:
    """Start `batchtrack serve` on a free port over ``data``; return its URL and process."""
    port = free_port()
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "batchtrack",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(data),
                "--concurrency",
                "1",
                *options,
            ],
            stderr=sink,
            text=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base + "/", proc)
    except RuntimeError:
        proc.kill()
        pytest.fail(log.read_text())
    first = log.read_text().splitlines()[0]
    assert f"batchtrack serving on {base}/" in first, first
    return base, proc


def stop_serve(proc: subprocess.Popen[str]) -> None:
    """Stop a serve process like Ctrl-C would, or kill it if it does not stop."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen[str]]]:
    """`batchtrack serve` as a subprocess on a free port; yields (base URL, data dir, proc)."""
    data = tmp_path / "data"
    base, proc = start_serve(data, tmp_path / "serve.log")
    yield base, data, proc
    stop_serve(proc)


def test_serve_killed_mid_batch_finishes_the_batch_when_started_again(tmp_path: Path) -> None:
    """kill -9 mid-batch, start again: the batch finishes, every image processed once."""
    data = tmp_path / "data"
    base, proc = start_serve(data, tmp_path / "first.log", "--lease", "2")
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            files = [("files", (f"{n}.jpg", jpeg((3000, 2000)), "image/jpeg")) for n in range(8)]
            ids = [f["id"] for f in client.post("/api/upload", files=files).json()["files"]]
            started = client.post("/api/process-batch", json={"fileIds": ids}).json()
            session = dict(client.cookies)
            deadline = time.monotonic() + 60
            while True:
                progress = client.get(started["statusUrl"]).json()["progress"]
                if progress["completed"] >= 1 and progress["processing"] == 1:
                    break
                assert progress["pending"] > 0, "the batch ended before the kill"
                assert time.monotonic() < deadline
                time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = json.loads(batchtrack("status", started["batchId"], "--data-dir", str(data)).stdout)
    assert left["status"] == "processing"
    assert left["progress"]["pending"] + left["progress"]["processing"] > 0

    base, proc = start_serve(data, tmp_path / "second.log", "--lease", "2")
    try:
        with httpx.Client(base_url=base, timeout=30, cookies=session) as client:
            deadline = time.monotonic() + 90
            while (body := client.get(f"/api/batch-status/{started['batchId']}").json())[
                "status"
            ] == "processing":
                assert time.monotonic() < deadline, body
                time.sleep(0.2)
    finally:
        stop_serve(proc)
    assert body["status"] == "completed"
    assert body["progress"]["completed"] == 8
    # The image the killed server was working on ran again (its second start).
    assert [i.get("attempts", 1) for i in body["images"]].count(2) == 1
    results = sorted(p.name for p in (data / "results").iterdir())
    assert results == sorted(f"{i['id']}.jpg" for i in body["images"])


def test_serve_page_upload_poll_and_status_from_another_process(
    server: tuple[str, Path, subprocess.Popen[str]],
) -> None:
    """The page is served; upload and poll over HTTP; `status` reads the same batch."""
    base, data, _ = server
    with httpx.Client(base_url=base, timeout=30) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "<title>batchtrack" in page.text
        assert "http://" not in page.text.replace("http://www.w3.org", "")  # nothing remote
        files = [("files", (f"{n}.jpg", jpeg((1600, 1200)), "image/jpeg")) for n in range(6)]
        ids = [f["id"] for f in client.post("/api/upload", files=files).json()["files"]]
        started = client.post("/api/process-batch", json={"fileIds": ids}).json()
        seen_running = False
        deadline = time.monotonic() + 60
        while (body := client.get(started["statusUrl"]).json())["status"] != "completed":
            if not seen_running and body["status"] == "processing":
                # Another process reads the batch while serve is working on it.
                status = batchtrack("status", started["batchId"], "--data-dir", str(data))
                assert status.returncode == 0, status.stderr
                assert json.loads(status.stdout)["batchId"] == started["batchId"]
                seen_running = True
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert body["progress"]["completed"] == 6
    final = batchtrack("status", started["batchId"], "--data-dir", str(data))
    assert json.loads(final.stdout)["progress"]["completed"] == 6
    unknown = batchtrack("status", "00000000-0000-4000-8000-000000000000", "--data-dir", str(data))
    assert unknown.returncode == 1
    assert "not found" in unknown.stderr


def test_ctrl_c_stops_cleanly_and_marks_unstarted_items_interrupted(
    server: tuple[str, Path, subprocess.Popen[str]],
) -> None:
    """SIGINT mid-batch: exit 0; items not started are failed 'interrupted'; no partial files."""
    base, data, proc = server
    with httpx.Client(base_url=base, timeout=30) as client:
        files = [("files", (f"{n}.jpg", jpeg((3000, 2000)), "image/jpeg")) for n in range(10)]
        ids = [f["id"] for f in client.post("/api/upload", files=files).json()["files"]]
        started = client.post("/api/process-batch", json={"fileIds": ids}).json()
        while client.get(started["statusUrl"]).json()["progress"]["processing"] == 0:
            time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    result = batchtrack("status", started["batchId"], "--data-dir", str(data))
    body = json.loads(result.stdout)
    assert body["status"] in ("completed", "failed")
    assert body["progress"]["pending"] == 0
    assert body["progress"]["processing"] == 0
    errors = {i.get("error") for i in body["images"] if i["status"] == "failed"}
    assert errors <= {"interrupted"}
    results = data / "results"
    assert not [p for p in results.iterdir() if p.name.startswith(".")]
    assert len(list(results.iterdir())) == body["progress"]["completed"]


# -- a real browser ----------------------------------------------------------------------------


def _browser() -> object:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        if IN_CI:
            pytest.fail("CI needs chromium and chromium-driver (installed by .ci/run)")
        pytest.skip("chromium and chromedriver are not installed")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1100,1000",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def test_a_person_uses_the_page_in_a_real_browser(
    server: tuple[str, Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    """Headless Chromium: pick 3 images and a broken file, start, watch it finish."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, _, _ = server
    picks = []
    for n, color in enumerate([(200, 0, 0), (0, 160, 0), (0, 0, 200)]):
        path = tmp_path / f"photo{n}.jpg"
        path.write_bytes(jpeg((1400, 1000), color))
        picks.append(str(path))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not really a picture")
    picks.append(str(broken))

    browser = _browser()
    try:
        browser.get(base + "/")  # type: ignore[attr-defined]
        assert "Process a batch of images" in browser.page_source  # type: ignore[attr-defined]
        start = browser.find_element(By.ID, "start")  # type: ignore[attr-defined]
        assert not start.is_enabled()
        browser.find_element(By.ID, "files").send_keys("\n".join(picks))  # type: ignore[attr-defined]
        assert "4 images" in browser.find_element(By.ID, "chosen").text  # type: ignore[attr-defined]
        start.click()
        WebDriverWait(browser, 60).until(
            lambda b: b.find_element(By.ID, "status").text in ("completed", "failed")
        )
        text = browser.find_element(By.TAG_NAME, "body").text  # type: ignore[attr-defined]
        assert browser.find_element(By.ID, "done").text == "4"  # type: ignore[attr-defined]
        assert browser.find_element(By.ID, "failed").text == "1"  # type: ignore[attr-defined]
        assert "not an image" in text
        assert "Finished: 3 processed, 1 failed." in text
        links = browser.find_elements(By.LINK_TEXT, "Download")  # type: ignore[attr-defined]
        assert len(links) == 3
        bar = browser.find_element(By.ID, "bar")  # type: ignore[attr-defined]
        assert bar.get_attribute("aria-valuenow") == "100"
        shot = Path(os.environ.get("BATCHTRACK_SCREENSHOT", tmp_path / "page.png"))
        browser.save_screenshot(str(shot))  # type: ignore[attr-defined]
        assert shot.stat().st_size > 10_000
        download = httpx.get(
            links[0].get_attribute("href"),
            cookies={
                c["name"]: c["value"]
                for c in browser.get_cookies()  # type: ignore[attr-defined]
            },
        )
        assert download.status_code == 200
        assert download.content[:2] == b"\xff\xd8"
    finally:
        browser.quit()  # type: ignore[attr-defined]


def test_serve_sweeps_results_a_killed_write_left_behind(tmp_path: Path) -> None:
    """Temporary result files older than an hour are gone shortly after serve starts."""
    results = tmp_path / "data" / "results"
    results.mkdir(parents=True)
    stale = results / ".batchtrack-killed.part"
    fresh = results / ".batchtrack-writing.part"
    for path in (stale, fresh):
        path.write_bytes(b"half an image")
    hours_ago = time.time() - 7200
    os.utime(stale, (hours_ago, hours_ago))
    _, proc = start_serve(tmp_path / "data", tmp_path / "serve.log")
    try:
        deadline = time.monotonic() + 20
        while stale.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert fresh.exists()
    finally:
        stop_serve(proc)
