"""batchtrack.progress: a batch's live bar in a terminal, for scripts and for `process`."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from batchtrack import BatchTracker, Item, Orchestrator, SQLiteStore
from batchtrack.progress import ProgressBar, show


def slow(item: Item) -> str:
    time.sleep(0.05)
    if item.filename.startswith("bad"):
        raise ValueError("not an image")
    return item.filename


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_show_draws_a_batch_run_elsewhere_until_it_ends(store: str, tmp_path: Path) -> None:
    """show() follows a batch an Orchestrator runs in another thread — woken by a memory
    store, polling SQLite — drawing counts, rate and ETA, and returns the final snapshot."""
    tracker = BatchTracker(SQLiteStore(tmp_path / "t.db")) if store == "sqlite" else BatchTracker()
    names = [f"{n:02d}.jpg" for n in range(38)] + ["bad1.jpg", "bad2.jpg"]
    with Orchestrator(tracker, slow, concurrency=2) as orch:
        batch = tracker.create_batch([Item(name) for name in names])
        runner = threading.Thread(target=orch.resume, args=(batch.batch_id,))
        runner.start()
        out = io.StringIO()
        snap = show(tracker, batch.batch_id, file=out, interval=0.1)
        runner.join()
    assert snap.status.is_final
    assert (snap.progress.completed, snap.progress.failed) == (38, 2)
    assert len(snap.items) == 40
    text = out.getvalue()
    assert "40/40" in text
    assert "item/s" in text or "s/item" in text
    assert "38 ok, 2 failed" in text
    assert re.search(r"\d+ ok, \d+ failed, ETA \d+s", text), text


def test_show_of_a_finished_batch_returns_at_once(tmp_path: Path) -> None:
    """A batch already finished: one bar at its end, and its snapshot."""
    tracker = BatchTracker()
    with Orchestrator(tracker, slow) as orch:
        done = orch.run(["a.jpg", "b.jpg"])
    out = io.StringIO()
    snap = show(tracker, done.batch_id, file=out)
    assert snap == tracker.get(done.batch_id)
    assert "2/2" in out.getvalue()


def test_progress_bar_as_on_progress_draws_every_count() -> None:
    """ProgressBar passed as on_progress ends at the batch's total with its counts."""
    tracker = BatchTracker()
    out = io.StringIO()
    with ProgressBar(total=6, file=out, unit="img") as bar, Orchestrator(tracker, slow) as orch:
        orch.run(["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "bad.jpg"], on_progress=bar)
    text = out.getvalue()
    assert "6/6" in text
    assert "5 ok, 1 failed" in text
    assert "img/s" in text or "s/img" in text


def test_progress_bar_is_silent_by_default_when_stderr_is_no_terminal() -> None:
    """With no file, the bar is drawn on stderr only when it is a terminal: a script's
    log stays clean."""
    code = (
        "from batchtrack import BatchTracker, Orchestrator\n"
        "from batchtrack.progress import show\n"
        "tracker = BatchTracker()\n"
        "with Orchestrator(tracker, str) as orch:\n"
        "    snap = orch.submit(['a.jpg', 'b.jpg'])\n"
        "    print(show(tracker, snap.batch_id).progress.completed)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "2"
    assert result.stderr == ""


def test_progress_without_tqdm_is_a_one_line_hint() -> None:
    """Without tqdm, importing batchtrack.progress says which extra to install, and how."""
    from batchtrack._extras import install_command

    code = (
        "import sys; sys.modules['tqdm'] = None\n"
        "try:\n    import batchtrack.progress\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert out == f"batchtrack.progress needs tqdm: {install_command('cli')}"
