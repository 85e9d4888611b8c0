"""HTTP benchmark: the status endpoint under uvicorn vs a minimal raw ASGI app.

Both run under uvicorn (1 worker) on 127.0.0.1 in their own processes; a bounded load of
keep-alive connections hits each in turn for a few seconds, alternating, and the ratio of
requests per second is reported with p50/p99 latencies.
"""

from __future__ import annotations

import http.client
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness import Comparison

HERE = Path(__file__).parent
SESSION = "a" * 32


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(mode: str) -> tuple[subprocess.Popen[str], int, str]:
    port = _port()
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "http_server.py"), mode, str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    batch = line[1]
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, port, batch


def _load(
    port: int, path: str, headers: dict[str, str], seconds: float, connections: int
) -> tuple[float, list[float]]:
    """Requests per second and latencies (s) of ``connections`` keep-alive loops."""
    latencies: list[list[float]] = [[] for _ in range(connections)]
    stop = time.monotonic() + seconds

    def loop(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() < stop:
            start = time.perf_counter()
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
            latencies[n].append(time.perf_counter() - start)
        conn.close()

    threads = [threading.Thread(target=loop, args=(n,)) for n in range(connections)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [x for per in latencies for x in per]
    return len(flat) / (time.monotonic() - began), flat


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1e3


def run(quick: bool = False) -> list[Comparison]:
    seconds, rounds, connections = (1.0, 2, 4) if quick else (3.0, 4, 8)
    ours, our_port, batch = _start("ours")
    raw, raw_port, _ = _start("raw")
    cookie = {"Cookie": f"batchtrack_session={SESSION}"}
    path = f"/api/batch-status/{batch}"
    try:
        conn = http.client.HTTPConnection("127.0.0.1", our_port)
        conn.request("GET", path, headers=cookie)
        first = conn.getresponse()
        first.read()
        assert first.status == 200, first.status
        etag = first.getheader("ETag") or ""
        conn.close()
        results: dict[str, list[tuple[float, list[float]]]] = {"ours": [], "raw": [], "304": []}
        for _ in range(rounds):
            results["ours"].append(_load(our_port, path, cookie, seconds, connections))
            results["raw"].append(_load(raw_port, "/", {}, seconds, connections))
            results["304"].append(
                _load(our_port, path, {**cookie, "If-None-Match": etag}, seconds, connections)
            )
    finally:
        for proc in (ours, raw):
            proc.terminate()
            proc.wait(10)
    summary = {}
    for name, runs in results.items():
        rps = statistics.median(r for r, _ in runs)
        lat = [x for _, xs in runs for x in xs]
        summary[name] = (rps, _pct(lat, 50), _pct(lat, 99))
        p50, p99 = summary[name][1], summary[name][2]
        print(f"http: {name:>4}: {rps:8.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    out = []
    for name, goal in (("ours", 0.9), ("304", 1.0)):
        ratio = summary[name][0] / summary["raw"][0]
        # Comparison ratios are ours/base times: time per request = 1 / rps.
        out.append(
            Comparison(
                f"http: status{' (304)' if name == '304' else ''} vs raw ASGI, req/s {ratio:.3f}x",
                1 / summary[name][0],
                1 / summary["raw"][0],
                f">= {goal} rps",
                ratio >= goal,
            )
        )
    return out
