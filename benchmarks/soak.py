"""A soak of ``batchtrack serve``: minutes of mixed traffic, and the server's RSS curve.

``python benchmarks/soak.py --minutes 30`` starts ``python -m batchtrack serve`` on a free
port of 127.0.0.1 (a temporary data folder, removed afterwards) and runs, until the time is
up, ``--clients`` users who each, in a loop, upload a few small JPEGs, start a batch,
follow it on its SSE stream while polling its status (with ``If-None-Match``), then
download its ZIP and one result; plus ``--pollers`` clients that only poll. Every
``--every`` seconds it reads the server's ``VmRSS`` from ``/proc/PID/status`` (Linux) and
prints a line of the curve; at the end a summary: RSS at each tenth of the run and the
growth over its second half (MB/min). Traffic goes only to 127.0.0.1; the server is stopped
by its process id.

``--inspect FILE`` writes to FILE, every minute, where the server's memory is: glibc's
heap (``mallinfo2``: in use, free in its arenas, mapped), SQLite's allocations and, with
``--tracemalloc``, Python's heap and its top allocation sites (growth since the first
minute). Against the RSS, that tells whether memory goes to Python objects, to SQLite's
page caches or to the allocator's free lists.
``--env NAME=VALUE`` (repeatable) sets the server's environment, e.g.
``--env MALLOC_ARENA_MAX=8`` to compare allocator settings.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from PIL import Image

BOUNDARY = "soakXyZ"

# Runs the server, writing where its memory is every minute: glibc's heap (mallinfo2),
# SQLite's own allocations and, with tracemalloc (argv[2] == "trace"), Python's top sites.
INSPECTED_SERVER = """
import ctypes, ctypes.util, sys, threading, time, tracemalloc
out, trace = sys.argv.pop(1), sys.argv.pop(1) == "trace"
if trace:
    tracemalloc.start(4)
libc = ctypes.CDLL(None)
names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
fields = [(n, ctypes.c_size_t) for n in names.split()]
libc.mallinfo2.restype = type("Info", (ctypes.Structure,), {"_fields_": fields})
sqlite = ctypes.CDLL(ctypes.util.find_library("sqlite3"))
sqlite.sqlite3_memory_used.restype = ctypes.c_int64
def dump():
    base = None
    while True:
        time.sleep(60)
        m, used = libc.mallinfo2(), sqlite.sqlite3_memory_used()
        with open(out, "a") as f:
            f.write(
                f"--- {time.strftime('%H:%M:%S')} malloc: arenas {m.arena / 2**20:.1f} MB "
                f"(in use {m.uordblks / 2**20:.1f}, free {m.fordblks / 2**20:.1f}), "
                f"mapped {m.hblkhd / 2**20:.1f} MB; sqlite {used / 2**20:.1f} MB"
            )
            if trace:
                f.write(f"; python {tracemalloc.get_traced_memory()[0] / 2**20:.1f} MB\\n")
                snap = tracemalloc.take_snapshot()
                for stat in snap.compare_to(base, "traceback")[:8] if base else []:
                    f.write(f"{stat}\\n")
                    for line in stat.traceback.format()[-6:]:
                        f.write(f"    {line}\\n")
                base = base or snap
            else:
                f.write("\\n")
threading.Thread(target=dump, daemon=True).start()
from batchtrack.cli import main
sys.exit(main(sys.argv[1:]))
"""


def jpeg(rng: random.Random) -> bytes:
    size = (rng.randrange(200, 1200), rng.randrange(200, 900))
    color = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "JPEG", quality=80)
    return out.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> tuple[float, int]:
    """The process's resident set size (MB) and thread count."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def add(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def total(self) -> int:
        with self.lock:
            return sum(self.counts.values())


class User:
    """One browser-like client: a session cookie of its own, one connection per request."""

    def __init__(self, port: int, images: list[bytes], stats: Stats, seed: int) -> None:
        self.port, self.images, self.stats = port, images, stats
        self.rng = random.Random(seed)
        self.cookie = ""

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            sent = dict(headers or {})
            if self.cookie:
                sent["Cookie"] = self.cookie
            conn.request(method, path, body=body or None, headers=sent)
            response = conn.getresponse()
            data = response.read()
            got = {k.lower(): v for k, v in response.getheaders()}
        finally:
            conn.close()
        if "set-cookie" in got:
            self.cookie = got["set-cookie"].split(";", 1)[0]
        self.stats.add(path.split("/")[2] if path.startswith("/api/") else path)
        return response.status, got, data

    def upload(self, count: int) -> list[str]:
        parts = []
        for _ in range(count):
            name = f"{uuid.uuid4().hex[:8]}.jpg"
            head = (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; '
                f'filename="{name}"\r\nContent-Type: image/jpeg\r\n\r\n'
            )
            parts.append(head.encode() + self.rng.choice(self.images) + b"\r\n")
        body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
        kind = f"multipart/form-data; boundary={BOUNDARY}"
        status, _, data = self.request("POST", "/api/upload", body, {"Content-Type": kind})
        if status != 201:
            raise RuntimeError(f"upload: {status} {data[:200]!r}")
        return [f["id"] for f in json.loads(data)["files"]]

    def follow(self, batch: str) -> None:
        """Read the batch's SSE stream to its end, polling its status alongside."""
        done = threading.Event()

        def poll() -> None:
            etag = ""
            while not done.wait(0.2):
                _, got, _ = self.request(
                    "GET", f"/api/batch-status/{batch}", headers={"If-None-Match": etag}
                )
                etag = got.get("etag", etag)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            try:
                conn.request("GET", f"/api/batch-events/{batch}", headers={"Cookie": self.cookie})
                response = conn.getresponse()
                while response.read(4096):
                    pass
            finally:
                conn.close()
            self.stats.add("batch-events")
        finally:
            done.set()
            poller.join()

    def round(self) -> None:
        ids = self.upload(self.rng.randrange(1, 6))
        status, _, data = self.request(
            "POST",
            "/api/process-batch",
            json.dumps({"fileIds": ids}).encode(),
            {"Content-Type": "application/json"},
        )
        if status != 202:
            raise RuntimeError(f"process-batch: {status} {data[:200]!r}")
        batch = json.loads(data)["batchId"]
        self.follow(batch)
        status, _, data = self.request("GET", f"/api/batch-status/{batch}")
        body = json.loads(data)
        status, _, data = self.request("GET", f"/api/batch-results/{batch}.zip")
        if status != 200 or not data.startswith(b"PK"):
            raise RuntimeError(f"zip: {status} {data[:200]!r}")
        done = [i for i in body["images"] if i["status"] == "completed"]
        if done:
            self.request("GET", f"/api/batch-results/{batch}/{done[0]['id']}")


def run_user(user: User, stop: threading.Event, errors: list[str]) -> None:
    while not stop.is_set():
        try:
            user.round()
        except Exception as exc:  # keep soaking; errors are counted and shown
            errors.append(f"{type(exc).__name__}: {exc}")
            stop.wait(1)


def run_poller(user: User, stop: threading.Event, errors: list[str]) -> None:
    """Polls one batch of its own (and sometimes an unknown one), 10 times a second."""
    try:
        ids = user.upload(2)
        _, _, data = user.request(
            "POST",
            "/api/process-batch",
            json.dumps({"fileIds": ids}).encode(),
            {"Content-Type": "application/json"},
        )
        batch = json.loads(data)["batchId"]
    except Exception as exc:
        errors.append(f"poller: {exc}")
        return
    while not stop.wait(0.1):
        try:
            user.request("GET", f"/api/batch-status/{batch}")
            if user.rng.random() < 0.1:
                user.request("GET", f"/api/batch-status/{uuid.uuid4()}")
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            stop.wait(1)


def wait_serving(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="how long (default: 5)")
    parser.add_argument("--clients", type=int, default=4, help="uploading users (default: 4)")
    parser.add_argument("--pollers", type=int, default=4, help="polling clients (default: 4)")
    parser.add_argument("--every", type=float, default=10.0, help="RSS sampling, s (default: 10)")
    parser.add_argument("--inspect", metavar="FILE", help="write where the memory is, every minute")
    parser.add_argument("--tracemalloc", action="store_true", help="with --inspect: Python's too")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("serve_args", nargs="*", help="more options of batchtrack serve")
    args = parser.parse_args()
    if not 0 < args.minutes <= 24 * 60:
        parser.error("--minutes: between 0 and 1440")
    if not Path("/proc/self/status").exists():
        parser.error("needs Linux (/proc/PID/status)")

    rng = random.Random(1)
    images = [jpeg(rng) for _ in range(12)]
    data_dir = Path(tempfile.mkdtemp(prefix="batchtrack-soak-"))
    port = free_port()
    env = dict(os.environ)
    env.update(item.split("=", 1) for item in args.env)
    serve = ["serve", "--port", str(port), "--data-dir", str(data_dir), "--quiet"]
    serve += ["--upload-quota", "1T", "--max-upload-storage", "1T", *args.serve_args]
    if args.inspect:
        trace = "trace" if args.tracemalloc else "-"
        command = [sys.executable, "-c", INSPECTED_SERVER, args.inspect, trace, *serve]
    else:
        command = [sys.executable, "-m", "batchtrack", *serve]
    # Started in the background, this script and its children would ignore Ctrl-C's signal:
    # the server gets it back (it stops on SIGINT), and SIGTERM stops the soak cleanly.
    signal.signal(signal.SIGTERM, _interrupt)
    log = data_dir.with_suffix(".log")  # a file, not a pipe that could fill and block it
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, env=env, stderr=sink, preexec_fn=_default_sigint)
    stop = threading.Event()
    errors: list[str] = []
    stats = Stats()
    threads: list[threading.Thread] = []
    curve: list[tuple[float, float]] = []
    try:
        wait_serving(port, proc)
        for n in range(args.clients):
            user = User(port, images, stats, seed=n)
            threads.append(threading.Thread(target=run_user, args=(user, stop, errors)))
        for n in range(args.pollers):
            user = User(port, images, stats, seed=1000 + n)
            threads.append(threading.Thread(target=run_poller, args=(user, stop, errors)))
        for thread in threads:
            thread.start()
        start = time.monotonic()
        end = start + args.minutes * 60
        print(f"serve pid {proc.pid} on 127.0.0.1:{port}, {args.minutes:g} min", flush=True)
        print(f"{'min':>6} {'RSS MB':>8} {'threads':>7} {'requests':>9} {'errors':>6}")
        while True:
            elapsed = time.monotonic() - start
            rss, nthreads = rss_mb(proc.pid)
            curve.append((elapsed / 60, rss))
            print(
                f"{elapsed / 60:6.1f} {rss:8.1f} {nthreads:7d} {stats.total():9d} {len(errors):6d}",
                flush=True,
            )
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode}")
            if time.monotonic() >= end:
                break
            time.sleep(min(args.every, max(end - time.monotonic(), 0)))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=130)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        stderr = log.read_text(errors="replace")
        log.unlink()
        shutil.rmtree(data_dir, ignore_errors=True)
    tenths = [curve[round(i * (len(curve) - 1) / 10)] for i in range(11)]
    print("\nRSS over the run: " + ", ".join(f"{m:.1f} min {r:.1f} MB" for m, r in tenths))
    half = [point for point in curve if point[0] >= curve[-1][0] / 2]
    if len(half) >= 2 and half[-1][0] > half[0][0]:
        slope = (half[-1][1] - half[0][1]) / (half[-1][0] - half[0][0])
        print(f"second half: {half[0][1]:.1f} -> {half[-1][1]:.1f} MB ({slope:+.2f} MB/min)")
    print(f"requests: {dict(sorted(stats.counts.items()))}")
    if errors:
        print(f"{len(errors)} errors, e.g. {errors[:3]}")
    if stderr.strip():
        print("server stderr (last lines):\n" + "\n".join(stderr.strip().splitlines()[-10:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
