"""The batchtrack command through real subprocesses, a real server and a real browser."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from http_support import free_port, jpeg, stop_serve, wait_until_serving


def batchtrack(
    *args: str, timeout: float = 120, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchtrack", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        env=None if env is None else {**os.environ, **env},
    )


def _color(path: Path) -> tuple[int, ...]:
    with Image.open(path) as image:
        return tuple(image.convert("RGB").getpixel((5, 5)))


def _close(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return all(abs(x - y) <= 12 for x, y in zip(a, b, strict=True))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two good images (one in a subfolder), a truncated JPEG, a text file named .png,
    a text file and a hidden file."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "one.jpg").write_bytes(jpeg((1200, 900)))
    Image.new("RGBA", (300, 300), (0, 0, 255, 255)).save(root / "sub" / "two.png")
    whole = jpeg((1200, 900))
    (root / "sub" / "broken.jpg").write_bytes(whole[: len(whole) // 3])
    (root / "sub" / "fake.PNG").write_text("not an image either")
    (root / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return root


# -- process ---------------------------------------------------------------------------------


def test_process_folder_takes_image_files_by_extension_and_fails_unreadable_ones(
    folder: Path, tmp_path: Path
) -> None:
    """In a folder every file with an image extension is an item (an unreadable one fails
    with its reason, exit 1); other files are skipped, counted and named on stderr."""
    out = tmp_path / "out" / "nested"
    result = batchtrack("process", str(folder), "--out", str(out), "--json", "--max-size", "300")
    assert result.returncode == 1, result.stderr
    body = json.loads(result.stdout)  # stdout is exactly the status body
    assert body["progress"] == {
        "total": 4,
        "completed": 2,
        "failed": 2,
        "processing": 0,
        "pending": 0,
        "cancelled": 0,
    }
    images = {i["filename"]: i for i in body["images"]}
    assert list(images) == ["one.jpg", "sub/broken.jpg", "sub/fake.PNG", "sub/two.png"]
    assert images["sub/broken.jpg"]["error"] == "truncated image: the file ends early"
    assert images["sub/fake.PNG"]["error"] == "not an image"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "one.jpg",
        "sub",
        "sub/two.png",
    ]
    with Image.open(out / "one.jpg") as image:
        assert max(image.size) == 300
    assert "2 of 4 images processed, 2 failed" in result.stderr
    assert f"Skipped 2 files (no image extension, or hidden): {folder / '.DS_Store'}, " in (
        result.stderr
    )
    assert str(folder / "notes.txt") in result.stderr
    assert str(folder / "sub" / "broken.jpg") in result.stderr
    assert "truncated image" in result.stderr
    assert "Traceback" not in result.stderr


def test_process_names_a_few_skipped_files_and_counts_the_rest(tmp_path: Path) -> None:
    """Many skipped files: the summary gives their number and the first five names."""
    root = tmp_path / "in"
    root.mkdir()
    (root / "photo.jpg").write_bytes(jpeg((200, 100)))
    for n in range(8):
        (root / f"data{n}.csv").write_text("a,b\n")
    result = batchtrack("process", str(root), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "1 of 1 images processed, 0 failed" in result.stderr
    assert "Skipped 8 files (no image extension, or hidden): " in result.stderr
    assert str(root / "data4.csv") in result.stderr
    assert str(root / "data5.csv") not in result.stderr
    assert " and 3 more" in result.stderr


def test_process_only_other_files_is_a_usage_error_naming_them(tmp_path: Path) -> None:
    """A folder with no image file at all: exit 2, and the message says what was skipped."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("x")
    result = batchtrack("process", str(tmp_path / "in"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "no images found in the paths given; skipped 1 file" in result.stderr
    assert "notes.txt" in result.stderr


def test_process_file_named_explicitly_is_always_an_item(folder: Path, tmp_path: Path) -> None:
    """A file given by name is processed whatever its extension: a text file fails."""
    result = batchtrack(
        "process", str(folder / "notes.txt"), str(folder / "one.jpg"), "--out", str(tmp_path / "o")
    )
    assert result.returncode == 1
    assert "1 of 2 images processed, 1 failed" in result.stderr
    assert "not an image" in result.stderr


def test_process_keeps_the_layout_and_never_overwrites_a_result(tmp_path: Path) -> None:
    """Sub-folders are kept under --out; sources that would share a result name in one
    folder (a.png and a.jpg, A.JPG, the same name from another folder given) get -2, -3…
    in sorted order, each result is its own image, and the summary lists the renames."""
    first, second = tmp_path / "first", tmp_path / "second"
    (first / "sub").mkdir(parents=True)
    second.mkdir()
    colors = {
        first / "A.JPG": (250, 0, 0),
        first / "a.jpg": (0, 250, 0),
        first / "a.png": (0, 0, 250),
        first / "sub" / "a.jpg": (250, 250, 0),
        second / "a.jpg": (0, 250, 250),
    }
    for path, color in colors.items():
        Image.new("RGB", (64, 48), color).save(path, "PNG" if path.suffix == ".png" else "JPEG")
    out = tmp_path / "out"
    result = batchtrack(
        "process", str(first), str(second), "--out", str(out), "--format", "JPEG", "--json"
    )
    assert result.returncode == 0, result.stderr
    expected = {
        first / "A.JPG": out / "A.jpg",
        first / "a.jpg": out / "a-2.jpg",
        first / "a.png": out / "a-3.jpg",
        first / "sub" / "a.jpg": out / "sub" / "a.jpg",
        second / "a.jpg": out / "a-4.jpg",
    }
    assert sorted(p for p in out.rglob("*") if p.is_file()) == sorted(expected.values())
    for source, result_path in expected.items():
        assert _close(_color(result_path), colors[source]), (source, result_path)
    body = json.loads(result.stdout)
    assert [i["id"] for i in body["images"]] == ["A", "a-2", "a-3", "sub/a", "a-4"]
    assert "Renamed, so that no result overwrites another:" in result.stderr
    assert f"{first / 'a.png'} -> {out / 'a-3.jpg'}" in result.stderr
    assert f"{second / 'a.jpg'} -> {out / 'a-4.jpg'}" in result.stderr
    assert str(out / "sub" / "a.jpg") not in result.stderr  # not renamed: not listed


def test_process_takes_file_names_no_tracker_would(tmp_path: Path) -> None:
    """Names with a line break, bytes that are not UTF-8, a leading dot (given by name):
    processed, shown with ``_``, and their results written; no traceback."""
    root = tmp_path / "in"
    root.mkdir()
    odd = [b"line\nbreak.jpg", b"caf\xe9.jpg", b"tab\there.jpg"]
    for name in odd:
        (root / os.fsdecode(name)).write_bytes(jpeg((80, 60)))
    hidden = tmp_path / ".hidden.jpg"
    hidden.write_bytes(jpeg((80, 60)))
    out = tmp_path / "out"
    result = batchtrack("process", str(root), str(hidden), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert sorted(i["filename"] for i in body["images"]) == [
        ".hidden.jpg",
        "caf_.jpg",
        "line_break.jpg",
        "tab_here.jpg",
    ]
    assert len(list(out.iterdir())) == 4
    assert "Traceback" not in result.stderr


def test_process_does_not_read_its_own_results_back(folder: Path) -> None:
    """--out inside the folder being processed: a second run sees the same images."""
    out = folder / "small"
    runs = [batchtrack("process", str(folder), "--out", str(out), "--json") for _ in range(2)]
    totals = [json.loads(r.stdout)["progress"]["total"] for r in runs]
    assert totals == [4, 4]


def test_process_data_dir_keeps_the_batch_for_status(folder: Path, tmp_path: Path) -> None:
    """`process --data-dir` keeps the batch in DIR/batchtrack.db and prints its id;
    `status` reads it there, from ./batchtrack-data by default, and --failed lists only
    the failed images with the whole batch's counts."""
    result = batchtrack(
        "process",
        str(folder),
        "--out",
        str(tmp_path / "out"),
        "--data-dir",
        "batchtrack-data",
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr
    assert (tmp_path / "batchtrack-data" / "batchtrack.db").is_file()
    batch_id = result.stderr.splitlines()[0].removeprefix("batch ")
    assert f"batchtrack status {batch_id}" in result.stderr

    everything = batchtrack("status", batch_id, cwd=tmp_path)  # the default data folder
    assert everything.returncode == 0, everything.stderr
    body = json.loads(everything.stdout)
    assert body["batchId"] == batch_id
    assert body["status"] == "completed"
    assert len(body["images"]) == 4

    failed = batchtrack("status", batch_id, "--failed", cwd=tmp_path)
    assert failed.returncode == 0, failed.stderr
    body = json.loads(failed.stdout)
    assert body["progress"]["total"] == 4
    assert {(i["filename"], i["error"]) for i in body["images"]} == {
        ("sub/broken.jpg", "truncated image: the file ends early"),
        ("sub/fake.PNG", "not an image"),
    }

    elsewhere = batchtrack(
        "status", batch_id, "--failed", "--data-dir", str(tmp_path / "batchtrack-data")
    )
    assert json.loads(elsewhere.stdout) == body


def test_process_bar_shows_the_eta_range_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal the progress bar shows counts, rate and "ETA 2s (1s–3s)"."""
    import fcntl
    import pty
    import struct
    import termios

    root = tmp_path / "in"
    root.mkdir()
    for n in range(16):
        (root / f"{n:02d}.jpg").write_bytes(jpeg((2400, 1800), (n * 15, 90, 90)))
    leader, follower = pty.openpty()
    # A terminal 40 rows by 160 columns, as a person's would be (a new pty has no size).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    command = ["process", str(root), "--out", str(tmp_path / "o"), "--concurrency", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchtrack", *command, "--max-size", "2000"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=follower,
    )
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.wait(60) == 0
    text = seen.decode(errors="replace")
    assert "16/16" in text
    assert "img/s" in text
    assert re.search(r"\d+ ok, 0 failed, ETA \d+s \(\d+s–\d+s\)", text), text


def test_postfix_says_counts_eta_and_its_range() -> None:
    """The bar's postfix: counts, the ETA and its 80% range; nothing to wait for at the end."""
    from batchtrack import BatchTracker
    from batchtrack.progress import describe
    from batchtrack.testing import FakeClock

    clock = FakeClock()
    tracker = BatchTracker(clock=clock)
    batch = tracker.create_batch([f"{n}.jpg" for n in range(200)])
    event = None
    for item in batch.items[:20]:
        tracker.start_item(batch.batch_id, item.id)
        clock.advance(3.0)
        event = tracker.complete_item(batch.batch_id, item.id)
    assert event is not None
    assert event.eta_range is not None
    text = describe(event.progress, event.estimated_time_remaining, event.eta_range)
    assert re.fullmatch(r"20 ok, 0 failed, ETA \d+m \(\d+m–\d+m\)", text), text
    for item in batch.items[20:]:
        event = tracker.fail_item(batch.batch_id, item.id, "cancelled")
    assert describe(event.progress, event.estimated_time_remaining) == "20 ok, 180 failed"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (59, "59s"),
        (60, "1m"),
        (89, "1m"),
        (90, "2m"),
        (3599, "60m"),
        (5400, "1h 30m"),
        (7260, "2h 01m"),
    ],
)
def test_durations_read_like_a_person_would_say_them(seconds: int, text: str) -> None:
    """Seconds under a minute, then minutes, then hours and minutes."""
    from batchtrack.progress import duration

    assert duration(seconds) == text


@pytest.mark.parametrize(
    ("eta", "eta_range", "text"),
    [
        (5, (5, 5), "ETA 5s (5s–6s)"),
        (45, (40, 50), "ETA 45s (40s–50s)"),
        (50, (50, 70), "ETA 50s (50s–2m)"),
        (89, (80, 95), "ETA 1m (1m–2m)"),
        (150, (130, 170), "ETA 2m (2m–3m)"),
        (120, (120, 120), "ETA 2m (2m–3m)"),
        (100, (110, 130), "ETA 2m (1m–3m)"),
    ],
)
def test_the_bar_shows_a_range_that_holds_its_eta_and_is_never_a_point(
    eta: int, eta_range: tuple[int, int], text: str
) -> None:
    """The shown range holds the shown ETA, rounds its ends outwards and never reads n–n."""
    from batchtrack import Progress
    from batchtrack.progress import describe

    progress = Progress(total=10, pending=5, processing=1, completed=4, failed=0)
    assert describe(progress, eta, eta_range) == f"4 ok, 0 failed, {text}"


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
        (["process", ".", "--out", "o", "--max-size", "70000"], "--max-size"),
        (["process", ".", "--out", "a-file"], "--out 'a-file' is not a folder"),
        (["process", ".", "--out", "o", "--data-dir", "a-file"], "--data-dir 'a-file'"),
        (["status"], "BATCH_ID"),
        (["status", "x", "--data-dir", "no/such/dir"], "no batchtrack database"),
        (["status", "x"], "no batchtrack database in 'batchtrack-data' (the default"),
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--host", "192.0.2.1"], "cannot listen on 192.0.2.1:8000"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    """Usage errors: exit 2, one line on stderr naming the problem, no traceback."""
    (tmp_path / "a-file").write_text("in the way")
    (tmp_path / "photo.jpg").write_bytes(jpeg((50, 50)))
    result = subprocess.run(
        [sys.executable, "-m", "batchtrack", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert message in lines[-1]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert (tmp_path / "a-file").read_text() == "in the way"


def test_every_option_shows_its_default_in_help() -> None:
    """Each option that takes a value says its default in --help; --format lists each
    choice once."""
    import argparse

    from batchtrack.cli import _parser

    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        for action in command._actions:
            if not action.option_strings or action.nargs == 0 or action.required:
                continue
            assert action.help is not None, (name, action.option_strings)
            assert "(default: " in action.help, (name, action.option_strings)
    help_text = batchtrack("process", "--help").stdout
    assert "--format {jpeg,png,webp}" in help_text
    assert "JPEG" not in help_text.split("--format")[1].split("\n")[0]
    assert "(default: the number of CPUs" in help_text
    assert "(default: 2048)" in help_text
    assert "(default: ./batchtrack-data" in batchtrack("status", "--help").stdout


def test_version_and_help() -> None:
    """--version prints the version; every command has --help."""
    assert batchtrack("--version").stdout.startswith("batchtrack ")
    for command in ("serve", "process", "status"):
        result = batchtrack(command, "--help")
        assert result.returncode == 0
        assert "usage: batchtrack " + command in result.stdout


def test_cli_page_documents_every_option_and_exit_status() -> None:
    """docs/cli.rst names every option of every command and the exit statuses 0, 1, 2."""
    import argparse

    from batchtrack.cli import _parser

    page = (Path(__file__).resolve().parent.parent / "docs" / "cli.rst").read_text()
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    headings = re.findall(r"^batchtrack ([a-z, ]+)\n-{3,}$", page, re.MULTILINE)
    for name, command in commands.choices.items():
        # A section may cover several commands: "batchtrack pause, unpause, cancel".
        heading = next(h for h in headings if name in h.split(", "))
        section = page.split(f"batchtrack {heading}\n---")[1].split("\n---")[0]
        for action in command._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option in section, (name, option)
    for status in ("``0``", "``1``", "``2``"):
        assert status in page
    assert "the port is in use" in page


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
    # The log: one line per request, and the batch's start and end (read from the store).
    log = data.parent / "serve.log"
    batch = started["batchId"]
    finished = f"batch {batch} finished (completed) in "
    deadline = time.monotonic() + 10
    while finished not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    lines = log.read_text().splitlines()
    assert re.search(r"^GET / 200 \d+\.\d ms$", lines[1]), lines
    assert any(re.fullmatch(r"POST /api/upload 201 \d+\.\d ms", line) for line in lines), lines
    assert any(re.fullmatch(r"POST /api/process-batch 202 [\d.]+ ms", line) for line in lines)
    polls = [line for line in lines if line.startswith(f"GET /api/batch-status/{batch} 200 ")]
    assert len(polls) >= 2
    assert f"batch {batch} started: 6 images" in lines
    assert lines.index(f"batch {batch} started: 6 images") < next(
        n for n, line in enumerate(lines) if line.startswith(finished)
    )
    assert any(
        line.startswith(finished) and line.endswith(": 6 of 6 images processed, 0 failed")
        for line in lines
    )
    final = batchtrack("status", started["batchId"], "--data-dir", str(data))
    assert json.loads(final.stdout)["progress"]["completed"] == 6
    unknown = batchtrack("status", "00000000-0000-4000-8000-000000000000", "--data-dir", str(data))
    assert unknown.returncode == 1
    assert "not found" in unknown.stderr


def test_serve_quiet_logs_no_requests(tmp_path: Path) -> None:
    """--quiet: the line saying where it listens, and no request or batch lines."""
    data = tmp_path / "data"
    log = tmp_path / "quiet.log"
    base, proc = start_serve(data, log, "--quiet")
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            assert client.get("/").status_code == 200
            files = [("files", ("a.jpg", jpeg((200, 100)), "image/jpeg"))]
            ids = [f["id"] for f in client.post("/api/upload", files=files).json()["files"]]
            started = client.post("/api/process-batch", json={"fileIds": ids}).json()
            while client.get(started["statusUrl"]).json()["status"] in ("pending", "processing"):
                time.sleep(0.1)
        time.sleep(1.0)  # twice the batch log's interval: it would have spoken by now
    finally:
        stop_serve(proc)
    lines = log.read_text().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("batchtrack serving on ")


def test_serve_on_a_busy_port_says_so_and_exits_2(tmp_path: Path) -> None:
    """Another server on the port: one plain line, exit 2, before anything starts (no
    "serving on", no data folder)."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        result = batchtrack("serve", "--port", str(port), "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"batchtrack serve: error: cannot listen on 127.0.0.1:{port}: "
        "the port is in use (another server?); choose another --port"
    ]
    assert result.stdout == ""
    assert not (tmp_path / "data").exists()


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


# -- --store ---------------------------------------------------------------------------------


def test_status_reads_a_store_url(folder: Path, tmp_path: Path) -> None:
    """`status --store sqlite:///...` reads the database named by the URL, not --data-dir;
    an empty memory:// store knows no batch (exit 1)."""
    data = tmp_path / "data"
    result = batchtrack(
        "process", str(folder), "--out", str(tmp_path / "out"), "--data-dir", str(data)
    )
    batch_id = result.stderr.splitlines()[0].removeprefix("batch ")
    url = f"sqlite://{(data / 'batchtrack.db').resolve()}"
    found = batchtrack("status", batch_id, "--store", url, cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["progress"]["total"] == 4
    missing = batchtrack("status", batch_id, "--store", "memory://")
    assert missing.returncode == 1
    assert missing.stderr == f"batchtrack status: batch {batch_id} not found\n"


@pytest.mark.parametrize("command", ["status", "serve"])
@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://example.org/db", "unknown scheme 'http'"),
        ("sqlite://relative.db", "absolute file path"),
        ("nothing", "no scheme"),
        ("postgresql://%zz", "not a usable PostgreSQL URL"),
        ("postgresql://nobody@127.0.0.1:{port}/db", "cannot connect to PostgreSQL"),
        ("redis://127.0.0.1:{port}/0", "cannot reach Redis at 127.0.0.1"),
    ],
)
def test_a_bad_or_unreachable_store_url_is_one_line_and_exit_2(
    command: str, url: str, says: str, tmp_path: Path
) -> None:
    """A --store URL of another form, malformed, or whose server is not there: one line
    naming the problem, exit 2, nothing started and no data folder made."""
    if url.startswith("postgresql://nobody"):
        pytest.importorskip("psycopg")
    if url.startswith("redis"):
        pytest.importorskip("redis")
    url = url.format(port=free_port())
    args = ["status", "00000000-0000-4000-8000-000000000000"] if command == "status" else ["serve"]
    data = tmp_path / "data"
    result = (
        batchtrack(*args, "--store", url, "--data-dir", str(data), "--port", str(free_port()))
        if command == "serve"
        else batchtrack(*args, "--store", url)
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"batchtrack {command}: error: "), lines
    assert says in lines[0]
    assert result.stdout == ""
    assert not data.exists()


def test_serve_and_status_on_postgresql(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """`serve --store postgresql://...` keeps its batches in PostgreSQL (uploads and
    results in --data-dir); `status --store` reads them from another process."""
    pytest.importorskip("psycopg")
    import psycopg

    server_url = request.getfixturevalue("postgres_url")
    database = f"cli_{os.getpid()}_{int(time.time() * 1000)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")
    url = server_url.rsplit("/", 1)[0] + f"/{database}"
    log = tmp_path / "serve.log"
    base, proc = start_serve(tmp_path / "data", log, "--store", url)
    try:
        assert f"batches in '{url}'" in log.read_text().splitlines()[0]
        with httpx.Client(base_url=base, timeout=30) as client:
            files = [("files", (f"{n}.jpg", jpeg((400, 300)), "image/jpeg")) for n in range(3)]
            ids = [f["id"] for f in client.post("/api/upload", files=files).json()["files"]]
            started = client.post("/api/process-batch", json={"fileIds": ids}).json()
            deadline = time.monotonic() + 60
            while client.get(started["statusUrl"]).json()["status"] != "completed":
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        stop_serve(proc)
    status = batchtrack("status", started["batchId"], "--store", url)
    assert status.returncode == 0, status.stderr
    body = json.loads(status.stdout)
    assert (body["status"], body["progress"]["completed"]) == ("completed", 3)
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT batch_id, completed FROM batchtrack_batches").fetchall()
    assert rows == [(started["batchId"], 3)]
    assert not (tmp_path / "data" / "batchtrack.db").exists()


@pytest.mark.parametrize(
    ("options", "env", "message"),
    [
        (
            ["--files", "ftp://host/x"],
            {},
            "cannot use --files ftp://host/x: unknown file storage 'ftp://host/x': "
            "use file:///absolute/path or s3://bucket[/prefix]",
        ),
        (
            ["--files", "file://relative/x"],
            {},
            "cannot use --files file://relative/x: 'file://relative/x': "
            "a file URL must be file:///absolute/path",
        ),
        (
            [],
            {"BATCHTRACK_SECRET": "short"},
            "BATCHTRACK_SECRET must be at least 16 characters (a long random string)",
        ),
    ],
)
def test_serve_with_unusable_files_or_secret_says_so_and_exits_2(
    tmp_path: Path, options: list[str], env: dict[str, str], message: str
) -> None:
    """A --files URL of an unknown form, or a BATCHTRACK_SECRET too short to sign with: one
    plain line, exit 2, before anything starts."""
    result = batchtrack(
        "serve", "--port", "1", "--data-dir", str(tmp_path / "data"), *options, env=env
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"batchtrack serve: error: {message}"]
    assert not (tmp_path / "data").exists()


# -- Ctrl-C in process ---------------------------------------------------------------------


def start_process(
    tmp_path: Path, count: int, delay: float, *options: str
) -> tuple[subprocess.Popen[str], str]:
    """`batchtrack process --data-dir` over ``count`` real images, each waiting ``delay``
    seconds first; return the process and its batch id (its first line on stderr)."""
    root = tmp_path / "in"
    root.mkdir()
    for n in range(count):
        Image.new("RGB", (64, 48), (n * 10, 90, 90)).save(root / f"{n:02d}.jpg")
    out, data = str(tmp_path / "out"), str(tmp_path / "data")
    command = ["process", str(root), "--out", out, "--data-dir", data, "--concurrency", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchtrack", *command, *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "BATCHTRACK_TEST_ITEM_DELAY": str(delay)},
    )
    assert proc.stderr is not None
    first = proc.stderr.readline()
    assert first.startswith("batch "), first
    return proc, first.split()[1]


def batch_progress(tmp_path: Path, batch_id: str) -> dict[str, int]:
    """The counts of a batch in the database of ``start_process``."""
    from batchtrack import BatchTracker, SQLiteStore

    with SQLiteStore(tmp_path / "data" / "batchtrack.db") as store:
        progress = BatchTracker(store).get(batch_id, items=False).progress
    return {"completed": progress.completed, "processing": progress.processing}


def wait_for_count(tmp_path: Path, batch_id: str, key: str, at_least: int) -> None:
    """Wait (up to 60 s) until the batch's ``progress[key]`` reaches ``at_least``."""
    deadline = time.monotonic() + 60
    while batch_progress(tmp_path, batch_id)[key] < at_least:
        assert time.monotonic() < deadline, f"{key} never reached {at_least}"
        time.sleep(0.05)


def test_process_ctrl_c_stops_starting_images_and_names_the_interrupted_ones(
    tmp_path: Path,
) -> None:
    """The first Ctrl-C starts no new image, lets the running ones finish, prints the
    summary naming the images not processed, and exits 130; the batch is finished."""
    proc, batch_id = start_process(tmp_path, 20, 0.5, "--json")
    wait_for_count(tmp_path, batch_id, "completed", 2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    body = json.loads(out)  # --json: the final status, as after any run
    progress = body["progress"]
    assert progress["pending"] == progress["processing"] == 0
    assert 2 <= progress["completed"] <= 8  # stopped well before the 20
    stopped = [i["filename"] for i in body["images"] if i.get("error") == "interrupted"]
    assert len(stopped) == 20 - progress["completed"] == progress["failed"]
    assert f"{progress['completed']} of 20 images processed, 0 failed" in err
    names = ", ".join(stopped[:5])
    assert f"interrupted: {len(stopped)} images not processed: {names} and " in err
    assert len(list((tmp_path / "out").iterdir())) == progress["completed"]


def test_process_ctrl_c_abandons_images_still_running_after_the_grace(tmp_path: Path) -> None:
    """Images that do not finish within the grace after Ctrl-C are abandoned: failed as
    interrupted, no result written, the summary printed, exit 130."""
    proc, batch_id = start_process(tmp_path, 6, 10)
    wait_for_count(tmp_path, batch_id, "processing", 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "waiting up to 5s for the 2 being processed" in err
    assert "0 of 6 images processed, 0 failed" in err
    assert "interrupted: 6 images not processed: 00.jpg, 01.jpg, 02.jpg, 03.jpg, 04.jpg" in err
    assert "Traceback" not in err
    body = json.loads(batchtrack("status", batch_id, "--data-dir", str(tmp_path / "data")).stdout)
    assert {i["error"] for i in body["images"]} == {"interrupted"}
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_process_second_ctrl_c_exits_at_once_quietly(tmp_path: Path) -> None:
    """A second Ctrl-C while the running images finish exits at once with 130: no
    traceback, no summary."""
    proc, batch_id = start_process(tmp_path, 20, 10)
    deadline = time.monotonic() + 60
    while batch_progress(tmp_path, batch_id)["processing"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    assert proc.stderr.readline().startswith("stopping: no new images")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err == ""
    assert batch_progress(tmp_path, batch_id)["completed"] == 0


# -- small things --------------------------------------------------------------------------


def test_status_help_says_the_data_dir_must_exist() -> None:
    """status reads an existing database: its --help does not say the folder is created."""
    text = " ".join(batchtrack("status", "--help").stdout.split())
    assert "(default: ./batchtrack-data; it must exist)" in text
    assert "created" not in text
    assert "created when missing" in " ".join(batchtrack("serve", "--help").stdout.split())


def test_process_with_nothing_to_do_creates_nothing(tmp_path: Path) -> None:
    """An empty folder: exit 2 saying no images, and neither --out nor --data-dir made."""
    (tmp_path / "empty").mkdir()
    result = batchtrack(
        "process",
        str(tmp_path / "empty"),
        "--out",
        str(tmp_path / "out"),
        "--data-dir",
        str(tmp_path / "data"),
    )
    assert result.returncode == 2
    assert "no images found in the paths given" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_process_renames_only_on_a_real_collision(tmp_path: Path) -> None:
    """dup.jpg and dup.png stay JPEG and PNG: both keep their names (ids dup and dup.png);
    with --format png their results collide and the second becomes dup-2.png."""
    root = tmp_path / "in"
    root.mkdir()
    (root / "dup.jpg").write_bytes(jpeg((80, 60)))
    Image.new("RGB", (80, 60), (0, 0, 250)).save(root / "dup.png")
    Image.new("RGB", (80, 60), (0, 250, 0)).save(root / "other.gif")  # written as PNG
    (root / "other.png").write_bytes(jpeg((80, 60)))  # JPEG inside: written as .jpg
    result = batchtrack("process", str(root), "--out", str(tmp_path / "kept"), "--json")
    assert result.returncode == 0, result.stderr
    kept = sorted(p.name for p in (tmp_path / "kept").iterdir())
    assert kept == ["dup.jpg", "dup.png", "other.jpg", "other.png"]
    assert [i["id"] for i in json.loads(result.stdout)["images"]] == [
        "dup",
        "dup.png",
        "other",
        "other.jpg",
    ]
    assert "Renamed" not in result.stderr

    result = batchtrack("process", str(root), "--out", str(tmp_path / "png"), "--format", "png")
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert names == ["dup-2.png", "dup.png", "other-2.png", "other.png"]
    assert f"{root / 'dup.png'} -> {tmp_path / 'png' / 'dup-2.png'}" in result.stderr


@pytest.mark.parametrize("command", ["serve", "process", "status"])
def test_an_unknown_option_is_the_commands_error(command: str, tmp_path: Path) -> None:
    """An option a command does not know: "batchtrack <command>: error: unrecognized
    arguments", one line, exit 2, nothing started."""
    args = {"serve": [], "process": [str(tmp_path), "--out", "o"], "status": ["x"]}[command]
    result = batchtrack(command, *args, "--bogus", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"batchtrack {command}: error: unrecognized arguments: --bogus"
    )
    assert "Traceback" not in result.stderr


def test_serve_announces_only_the_batches_left_before_it_started(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At start the service logs "resuming 1 unfinished batch" for a batch an earlier run
    left, not counting one a user started just after it came up; both are run."""
    from batchtrack import BatchTracker, Item, SQLiteStore
    from batchtrack._demo import build

    data = tmp_path / "data"
    data.mkdir()
    image = tmp_path / "a.jpg"
    image.write_bytes(jpeg((50, 50)))
    with SQLiteStore(data / "batchtrack.db") as store:
        left = BatchTracker(store).create_batch([Item("a.jpg", source=str(image))]).batch_id
    caplog.set_level("INFO", logger="batchtrack")
    _, close = build(data, concurrency=1)
    try:
        with SQLiteStore(data / "batchtrack.db") as store:
            tracker = BatchTracker(store)
            new = tracker.create_batch([Item("b.jpg", source=str(image))]).batch_id
            deadline = time.monotonic() + 60
            while not all(tracker.get(b, items=False).status.is_final for b in (left, new)):
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        close()
    resuming = [r.getMessage() for r in caplog.records if "resuming" in r.getMessage()]
    assert resuming == ["batchtrack: resuming 1 unfinished batch"]


# -- pause, unpause, cancel ------------------------------------------------------------------


def test_pause_unpause_and_cancel_act_on_a_batch_in_the_database(tmp_path: Path) -> None:
    """`batchtrack pause|unpause|cancel BATCH_ID --data-dir DIR` change the batch in that
    database and say in one line what they did (or that there was nothing to do)."""
    from batchtrack import BatchTracker, SQLiteStore, Status

    data = tmp_path / "data"
    data.mkdir()
    store = SQLiteStore(data / "batchtrack.db")
    tracker = BatchTracker(store)
    snap = tracker.create_batch(["a.jpg", "b.jpg", "c.jpg"])
    batch = snap.batch_id
    tracker.start_item(batch, snap.items[0].id)

    def run(command: str) -> str:
        result = batchtrack(command, batch, "--data-dir", str(data))
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        return result.stdout

    assert run("pause") == f"batch {batch} paused\n"
    assert tracker.get(batch).status is Status.PAUSED
    assert run("pause") == f"batch {batch} not paused: it is already paused or has finished\n"
    assert run("unpause") == f"batch {batch} resumed\n"
    assert tracker.get(batch).status is Status.PROCESSING
    assert run("unpause") == f"batch {batch} not resumed: it is not paused\n"
    assert run("cancel") == f"batch {batch} cancelled: 2 image(s) that had not started\n"
    assert tracker.get(batch).progress.cancelled == 2
    assert run("cancel") == f"batch {batch} nothing to cancel: no image was waiting\n"
    store.close()


@pytest.mark.parametrize("command", ["pause", "unpause", "cancel"])
def test_controls_on_an_unknown_batch_or_no_database_say_so(command: str, tmp_path: Path) -> None:
    """An unknown batch is one line and exit 1; a folder without a database, exit 2."""
    from batchtrack import BatchTracker, SQLiteStore

    data = tmp_path / "data"
    data.mkdir()
    BatchTracker(SQLiteStore(data / "batchtrack.db")).store.close()
    unknown = batchtrack(command, "0" * 32, "--data-dir", str(data))
    assert unknown.returncode == 1
    assert unknown.stderr == f"batchtrack {command}: batch {'0' * 32} not found\n"
    empty = batchtrack(command, "0" * 32, "--data-dir", str(tmp_path / "nothing"))
    assert empty.returncode == 2
    assert empty.stderr.startswith(f"batchtrack {command}: error: no batchtrack database")


# -- serve --trusted-origin -----------------------------------------------------------------


def test_serve_lets_a_trusted_origin_send_state_changing_requests(tmp_path: Path) -> None:
    """`serve --trusted-origin https://app.example.com`: a POST from that origin's page
    reaches the API; one from another site is refused 403 cross_origin."""
    base, proc = start_serve(
        tmp_path / "data", tmp_path / "log.txt", "--trusted-origin", "https://app.example.com"
    )
    try:
        with httpx.Client(base_url=base) as client:
            client.get("/")  # the session cookie
            url = "/api/batch-cancel/" + str(uuid.uuid4())
            trusted = client.post(url, headers={"Origin": "https://app.example.com"})
            other = client.post(url, headers={"Origin": "https://evil.example"})
    finally:
        stop_serve(proc)
    assert trusted.status_code == 404  # through the origin check, to an unknown batch
    assert other.status_code == 403
    assert other.json()["error"]["code"] == "cross_origin"


def test_serve_refuses_a_trusted_origin_that_is_not_an_origin(tmp_path: Path) -> None:
    """A --trusted-origin with a path (or no scheme) is one line and exit 2."""
    result = batchtrack("serve", "--trusted-origin", "https://app.example.com/page", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        "batchtrack serve: error: argument --trusted-origin: 'https://app.example.com/page' "
        "is not an origin such as https://app.example.com\n"
    )


def test_the_serve_log_counts_one_image_in_the_singular(caplog: pytest.LogCaptureFixture) -> None:
    """``batch … started: 1 image`` (not "1 images") for a batch of one."""
    from batchtrack import BatchTracker
    from batchtrack._access_log import BatchWatch, _Watched

    tracker = BatchTracker()
    one = tracker.create_batch(["a.jpg"]).batch_id
    two = tracker.create_batch(["a.jpg", "b.jpg"]).batch_id
    watch = BatchWatch(lambda batch_id: tracker.get(batch_id, items=False))
    watch._started.update({one: _Watched(time.monotonic()), two: _Watched(time.monotonic())})
    with caplog.at_level("INFO", logger="batchtrack.serve"):
        watch.check()
    assert f"batch {one} started: 1 image" in caplog.messages
    assert f"batch {two} started: 2 images" in caplog.messages
