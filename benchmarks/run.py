"""Run every benchmark and print ratios measured side by side in one run.

Usage: ``python benchmarks/run.py [--quick] [SUITE ...]``; suites: core, sqlite, eta, images,
http, redis, postgres, leases, big, fast, serve, files, watch.
Exit status 0 even when a goal is missed: these are figures, not tests.
"""

from __future__ import annotations

import argparse
import importlib
import platform
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
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="*", metavar="SUITE", help=f"any of {', '.join(SUITES)}")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.suites) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite(s): {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    print(f"# batchtrack benchmarks, Python {platform.python_version()}, {platform.machine()}")
    for suite in args.suites or list(SUITES):
        module = importlib.import_module(SUITES[suite])
        print(f"\n## {suite}")
        for result in module.run(quick=args.quick):
            print(result.line(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
