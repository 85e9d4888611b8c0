"""Status polls under real servers: our ``GET /api/batch-status/{id}`` against a raw app
answering the same bytes and headers (the floor), with ``wrk -t1 -c32``.

- ASGI under uvicorn, one worker, with httptools and uvloop (``uvicorn[standard]``) and
  with the pure-Python h11 parser: goal ours >= 0.5x raw requests/s, p99 <= 2x raw's.
- The same polls with a matching ``If-None-Match`` (304 answers): >= the 200s' rate.
- A SQLite store (reads block, so they run in the app's threads): reported.
- WSGI under gunicorn (one gthread worker, 4 threads): reported.

Servers are started here on 127.0.0.1 and stopped by process id; rounds alternate ours
and raw, and medians are reported. Needs ``wrk``; skips what is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from harness import Comparison

HERE = Path(__file__).resolve().parent
COOKIE = "batchtrack_session=0123456789abcdef0123456789abcdef"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(command: list[str], env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(command, cwd=HERE, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not start: {command}")


def _wrk(url: str, seconds: int, headers: list[str]) -> tuple[float, float]:
    """Requests/s and p99 latency (s) of ``wrk -t1 -c32``."""
    args = ["wrk", "-t1", "-c32", f"-d{seconds}s", "--latency"]
    for header in headers:
        args += ["-H", header]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"99%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]
    if "Non-2xx" in out and not any(h.startswith("If-None-Match") for h in headers):
        raise RuntimeError(f"non-2xx answers: {out}")
    return rate, float(value) * scale


def _measure(
    kind: str, server: list[str], store: str, *, rounds: int, seconds: int, folder: Path
) -> dict[str, tuple[float, float]]:
    """Median (req/s, p99) of ours 200, raw 200 and ours 304, alternating."""
    found: dict[str, list[tuple[float, float]]] = {"ours": [], "raw": [], "ours 304": []}
    for n in range(rounds):
        for app in ("ours", "raw") if n % 2 == 0 else ("raw", "ours"):
            data = folder / f"{kind}-{store}-{app}-{n}"
            data.mkdir()
            port = _port()
            env = {
                **os.environ,
                "BENCH_APP": app,
                "BENCH_STORE": store,
                "BENCH_DIR": str(data),
                "PYTHONPATH": str(HERE),
            }
            command = [part.replace("PORT", str(port)) for part in server]
            proc = _start(command, env, port)
            try:
                ready = data / "batch_id"  # gunicorn loads the app after it listens
                deadline = time.monotonic() + 30
                while not ready.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                batch = ready.read_text()
                url = f"http://127.0.0.1:{port}/api/batch-status/{batch}"
                found[app].append(_wrk(url, seconds, [f"Cookie: {COOKIE}"]))
                if app == "ours":
                    request = urllib.request.Request(url, headers={"Cookie": COOKIE})
                    with urllib.request.urlopen(request) as answer:
                        etag = answer.headers["ETag"]
                    headers = [f"Cookie: {COOKIE}", f"If-None-Match: {etag}"]
                    found["ours 304"].append(_wrk(url, seconds, headers))
            finally:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return {
        k: (statistics.median(r for r, _ in v), statistics.median(p for _, p in v))
        for k, v in found.items()
    }


def _report(name: str, got: dict[str, tuple[float, float]], *, goals: bool) -> list[Comparison]:
    (ours, ours_p99), (raw, raw_p99), (hits, _) = got["ours"], got["raw"], got["ours 304"]
    print(
        f"serve: {name}: ours {ours:,.0f} req/s (p99 {ours_p99 * 1e3:.2f} ms), raw {raw:,.0f} "
        f"req/s (p99 {raw_p99 * 1e3:.2f} ms), ours 304 {hits:,.0f} req/s"
    )
    # Comparisons hold seconds per request, so that the ratio reads like the others.
    return [
        Comparison(
            f"serve: {name} 200s, time per request vs raw",
            1 / ours,
            1 / raw,
            "<= 2" if goals else "figure",
            raw / ours <= 2 or not goals,
        ),
        Comparison(
            f"serve: {name} p99 vs raw",
            ours_p99,
            raw_p99,
            "<= 2" if goals else "figure",
            ours_p99 / raw_p99 <= 2 or not goals,
        ),
        Comparison(
            f"serve: {name} 304s vs 200s, time per request",
            1 / hits,
            1 / ours,
            "<= 1" if goals else "figure",
            ours / hits <= 1 or not goals,
        ),
    ]


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def run(quick: bool = False) -> list[Comparison]:
    """The fast-path issue's server figures."""
    if shutil.which("wrk") is None:
        print("serve: wrk is not installed (apt-get install wrk); skipped")
        return []
    rounds, seconds = (2, 2) if quick else (4, 4)
    uvicorn = [sys.executable, "-m", "uvicorn", "serve_apps:asgi", "--port", "PORT"]
    quiet = ["--log-level", "warning", "--no-access-log"]
    results: list[Comparison] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        variants: list[tuple[str, list[str], str, bool]] = []
        if _installed("httptools") and _installed("uvloop"):
            fast = [*uvicorn, "--http", "httptools", "--loop", "uvloop", *quiet]
            variants.append(("uvicorn httptools, memory", fast, "memory", True))
            variants.append(("uvicorn httptools, SQLite", fast, "sqlite", False))
        else:
            print("serve: httptools/uvloop not installed (uvicorn[standard]); skipped")
        h11 = [*uvicorn, "--http", "h11", "--loop", "asyncio", *quiet]
        variants.append(("uvicorn h11, memory", h11, "memory", True))
        if _installed("gunicorn"):
            gunicorn = [
                sys.executable,
                "-m",
                "gunicorn",
                "serve_apps:wsgi",
                "-b",
                "127.0.0.1:PORT",
                "-w",
                "1",
                "-k",
                "gthread",
                "--threads",
                "4",
                "--log-level",
                "warning",
            ]
            variants.append(("gunicorn gthread (WSGI), memory", gunicorn, "memory", False))
        else:
            print("serve: gunicorn not installed; WSGI figures skipped")
        for name, server, store, goals in variants:
            got = _measure(name, server, store, rounds=rounds, seconds=seconds, folder=folder)
            results += _report(name, got, goals=goals)
    return results
