"""The documentation builds without warnings, its examples run, and so do the examples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("builder", ["html", "doctest"])
def test_docs_build_without_warnings(builder: str, tmp_path: Path) -> None:
    """sphinx-build -W succeeds for the HTML pages and for every doctest in them."""
    pytest.importorskip("sphinx")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            builder,
            str(ROOT / "docs"),
            str(tmp_path / builder),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_progress_example_runs_to_the_end() -> None:
    """examples/progress.py runs a batch to completion and prints its progress and ETA."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "progress.py"),
            "--items",
            "8",
            "--seconds",
            "0.05",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("batch ")
    assert lines[0].endswith(": 8 images")
    assert any(line.startswith("completed") or line.startswith("failed") for line in lines)
    assert "8/8 done" in result.stdout
    assert lines[-1].startswith("finished: ")
    assert lines[-1].endswith("Z")


def test_progress_example_rejects_bad_arguments() -> None:
    """A bad argument gives a usage error (exit 2), not a traceback."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "progress.py"), "--items", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
