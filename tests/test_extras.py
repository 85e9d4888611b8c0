"""The install hint of a missing optional dependency follows how batchtrack was installed."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from batchtrack._extras import install_command


class FakeDistribution:
    """A distribution whose ``direct_url.json`` is the given text (None: no such file)."""

    def __init__(self, direct_url: dict[str, object] | str | None) -> None:
        self.text = direct_url if not isinstance(direct_url, dict) else json.dumps(direct_url)

    def read_text(self, filename: str) -> str | None:
        assert filename == "direct_url.json"
        return self.text


@pytest.mark.parametrize(
    ("direct_url", "command"),
    [
        (
            {"url": "file:///home/me/batchtrack", "dir_info": {"editable": True}},
            "pip install -e '/home/me/batchtrack[images]'",
        ),
        (
            {"url": "file:///home/me/batchtrack", "dir_info": {}},
            "pip install '/home/me/batchtrack[images]'",
        ),
        (
            {"url": "file:///home/me/my%20code/batchtrack", "dir_info": {"editable": True}},
            "pip install -e '/home/me/my code/batchtrack[images]'",
        ),
        (
            {
                "url": "https://github.com/example/batchtrack.git",
                "vcs_info": {"vcs": "git", "commit_id": "0123abc", "requested_revision": "main"},
            },
            "pip install 'batchtrack[images] @ git+https://github.com/example/batchtrack.git"
            "@0123abc'",
        ),
        (
            {
                "url": "https://github.com/example/mono.git",
                "vcs_info": {"vcs": "git", "commit_id": "0123abc"},
                "subdirectory": "python",
            },
            "pip install 'batchtrack[images] @ git+https://github.com/example/mono.git"
            "@0123abc#subdirectory=python'",
        ),
        (
            {"url": "https://example.com/batchtrack-0.1.0.tar.gz", "archive_info": {}},
            "pip install 'batchtrack[images] @ https://example.com/batchtrack-0.1.0.tar.gz'",
        ),
        (None, "pip install 'batchtrack[images]'"),
        ("not json", "pip install 'batchtrack[images]'"),
    ],
    ids=[
        "editable",
        "folder",
        "folder-with-space",
        "git",
        "git-subdirectory",
        "archive",
        "index",
        "unreadable",
    ],
)
def test_install_command_follows_the_install(
    direct_url: dict[str, object] | str | None, command: str
) -> None:
    """Editable or plain folder, VCS or archive URL, or an index: each gets the command
    that adds the extra to that install."""
    assert install_command("images", FakeDistribution(direct_url)) == command


def test_the_hint_of_this_checkout_names_its_folder() -> None:
    """In this development install the hint is ``pip install -e '<the clone>[images]'``,
    a folder holding batchtrack's pyproject.toml."""
    text = importlib.metadata.distribution("batchtrack").read_text("direct_url.json")
    if not text or not json.loads(text).get("dir_info", {}).get("editable"):
        pytest.skip("batchtrack is not installed with pip install -e here")
    command = install_command("images")
    assert command.startswith("pip install -e '/"), command
    clone = Path(command.removeprefix("pip install -e '").removesuffix("[images]'"))
    assert 'name = "batchtrack"' in (clone / "pyproject.toml").read_text()


def test_a_missing_dependency_names_the_extra_and_the_command() -> None:
    """Importing batchtrack.imaging without Pillow fails with one line naming the extra
    and the command for this install."""
    code = (
        "import sys; sys.modules['PIL'] = None\n"
        "try:\n    import batchtrack.imaging\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == f"batchtrack.imaging needs Pillow: {install_command('images')}"
    assert "pip install -e '/" in out
