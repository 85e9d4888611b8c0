"""The README opens with the two commands, and CI runs the second one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands() -> list[str]:
    return re.findall(r"```sh\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_opens_with_exactly_two_commands() -> None:
    """The first two code blocks are one-line commands: the demo, then the tests."""
    first, second = _commands()[:2]
    assert "\n" not in first
    assert "\n" not in second
    assert "pip install" in first
    assert "pip install" in second
    assert "pytest" in second


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run contains the README's test command, character for character."""
    assert _commands()[1] in (ROOT / ".ci" / "run").read_text()
