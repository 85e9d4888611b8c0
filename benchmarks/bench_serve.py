"""Status polls under real servers: our ``GET /api/batch-status/{id}`` against a raw app
answering the very same bytes and headers (the floor), loaded by ``wrk -t1 -c32``.

- ASGI under uvicorn (one worker), with ``--http httptools --loop uvloop`` (when
  ``uvicorn[standard]`` is installed) and with ``--http h11 --loop asyncio``: ours with
  the default session cookie (the inline fast path of a memory store), ours with an
  ``owner=`` function (every request through the app's thread pool) and ours with an
  ``async def`` owner (awaited on the loop: the inline path again). Goals: ours >= 0.5x
  raw's requests/s and p99 <= 2x raw's; 304 answers (``If-None-Match`` = the current
  ETag) at least as many per second as the 200s.
- The same on a SQLite store and on a Redis store (reads in the app's threads):
  reported; Redis against the peer below (goal: >= 2x its requests/s under uvicorn)
  and, with ``--before REV``, against the code of git revision REV (goal: >= 2x).
- WSGI under gunicorn (one ``gthread`` worker, 4 threads: the sync worker closes every
  connection, which would measure connection setup): reported.
- The peer: Django + celery-progress's ``get_progress`` view for one Celery task in
  state PROGRESS in the same Redis (``peers/celery_progress_site.py``), under gunicorn
  with ours's gunicorn workers and threads, measured in every server's rounds. It needs
  packages that are peers, not dependencies of batchtrack:
  ``pip install celery-progress django gunicorn`` (with celery and redis, from the
  ``test`` extra); skipped, saying so, without them.

Every app runs in its own server process on 127.0.0.1 (a free port), started here and
stopped by process id; Redis is a ``redis-server`` started by the tests' helper. All of
one server's processes are up at once (idle ones cost nothing) and each round runs every
target once, the order reversed every other round (A B ... B A), so ours, raw, the peer
and BEFORE see the same conditions; medians are reported. The batch is 10 items
(4 completed, 1 running) with a stopped clock, so its ETag does not move (with a running
clock a poll also rebuilds the body once per whole second: the ETA moves).
Needs ``wrk``; skips (and says so) what is not installed.

``python benchmarks/bench_serve.py [--quick] [--before REV] [--only STORE_OR_APP]`` runs
it alone (``--only redis``: the raw floor and the Redis targets; ``--only memory``...).
``python benchmarks/bench_serve.py --profile [SECONDS]`` instead samples our uvicorn
server under load with py-spy and prints where the time goes.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from harness import Comparison

HERE = Path(__file__).resolve().parent
SESSION = "0123456789abcdef0123456789abcdef"  # as in serve_apps
COOKIE = f"batchtrack_session={SESSION}"
CONNECTIONS = 32


class Server(NamedTuple):
    label: str
    short: str  # for the comparison lines
    kind: str  # "asgi" or "wsgi"
    command: list[str]  # "PORT" is replaced by the port
    goals: bool  # whether the memory-store goals apply here


class Target(NamedTuple):
    app: str  # raw, ours, owner, async, peer
    store: str  # memory, sqlite, redis
    status: int  # 200 or 304
    tree: str = "after"  # "before": batchtrack from the --before tree

    @property
    def process(self) -> tuple[str, str, str]:
        return self.app, self.store, self.tree

    @property
    def label(self) -> str:
        name = _NAMES[self.app] + (" BEFORE" if self.tree == "before" else "")
        return f"{name}, {self.store}, {self.status}"


_NAMES = {
    "raw": "raw",
    "ours": "ours (cookie)",
    "owner": "ours (owner=)",
    "async": "ours (async owner=)",
    "peer": "Django+celery-progress",
}
PEER_COMMAND = [
    sys.executable, "-m", "gunicorn", "serve_apps:wsgi()", "--chdir", str(HERE),
    "-b", "127.0.0.1:PORT", "-w", "1", "-k", "gthread", "--threads", "4",
    "--log-level", "warning",
]  # fmt: skip
"""The peer's server: gunicorn with the workers and threads of ours under gunicorn."""


class Load(NamedTuple):
    rate: float  # requests/s
    p99: float  # seconds
    bytes_per_request: float
    errors: str  # wrk's error lines, if any


# -- wrk ---------------------------------------------------------------------------------

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
_SIZES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def parse_wrk(out: str) -> Load:
    """Requests/s, p99, bytes per request and error lines of ``wrk --latency`` output."""
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.MULTILINE)
    total = re.search(r"(\d+) requests in [\d.]+\w+, ([\d.]+)([KMGT]?B) read", out)
    if rate is None or p99 is None or total is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    count = int(total.group(1))
    read = float(total.group(2)) * _SIZES[total.group(3)]
    errors = [
        line.strip()
        for line in out.splitlines()
        if line.strip().startswith(("Socket errors", "Non-2xx"))
    ]
    return Load(
        float(rate.group(1)),
        float(p99.group(1)) * _UNITS[p99.group(2)],
        read / count if count else 0.0,
        "; ".join(errors),
    )


def _wrk(url: str, seconds: int, headers: list[str]) -> Load:
    args = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency"]
    for header in headers:
        args += ["-H", header]
    done = subprocess.run([*args, url], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


# -- servers -----------------------------------------------------------------------------


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Running(NamedTuple):
    proc: subprocess.Popen[bytes]
    port: int
    info: dict[str, object]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.info['path']}"


class Setting(NamedTuple):
    """What every server of a run shares: the Redis server, the tree to compare with."""

    redis_url: str | None = None
    before: Path | None = None  # a folder holding the batchtrack package of before


def _launch(
    server: Server, process: tuple[str, str, str], folder: Path, setting: Setting
) -> Running:
    app, store, tree = process
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "info.json").unlink(missing_ok=True)
    port = _port()
    source = str(setting.before) if tree == "before" else os.environ.get("PYTHONPATH")
    env = {
        **os.environ,
        "BENCH_APP": app,
        "BENCH_STORE": store,
        "BENCH_DIR": str(folder),
        "BENCH_REDIS_URL": setting.redis_url or "",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), source])),
    }
    template = PEER_COMMAND if app == "peer" else server.command
    command = [part.replace("PORT", str(port)) for part in template]
    log = folder / "server.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=sink)
    return Running(proc, port, {}, log)


def _ready(running: Running, folder: Path, timeout: float = 60) -> Running:
    """Wait until the server listens and its app is built (gunicorn builds it after)."""
    deadline = time.monotonic() + timeout
    info_file = folder / "info.json"
    while time.monotonic() < deadline:
        if running.proc.poll() is not None:
            break
        if info_file.exists():
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", running.port), timeout=0.2).close()
                return running._replace(info=json.loads(info_file.read_text()))
        time.sleep(0.05)
    _stop(running)
    tail = running.log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"server did not start: {running.proc.args}\n{tail}")


def _stop(running: Running) -> None:
    proc = running.proc
    if proc.poll() is None:
        proc.terminate()  # SIGTERM to its own pid: uvicorn and gunicorn shut down cleanly
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def _servers(
    server: Server,
    processes: list[tuple[str, str, str]],
    folder: Path,
    setting: Setting = Setting(),  # noqa: B008 - an immutable tuple
) -> Iterator[dict[tuple[str, str, str], Running]]:
    started: dict[tuple[str, str, str], Running] = {}
    try:
        slug = server.short
        for process in processes:
            started[process] = _launch(
                server, process, folder / f"{slug}-{'-'.join(process)}", setting
            )
        for process, running in started.items():
            started[process] = _ready(running, folder / f"{slug}-{'-'.join(process)}")
        yield started
    finally:
        for running in started.values():
            _stop(running)


def _headers(target: Target, running: Running) -> list[str]:
    headers = [f"Cookie: {COOKIE}"]
    if target.app == "peer":
        return []
    if target.status == 304:
        headers.append(f"If-None-Match: {running.info['etag']}")
    return headers


def _check(target: Target, running: Running) -> None:
    """One request by hand: the status, and the ETag, are what the target expects."""
    names = dict(h.split(": ", 1) for h in _headers(target, running))
    request = urllib.request.Request(running.url, headers=names)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            status, etag = answer.status, answer.headers["ETag"]
    except urllib.error.HTTPError as exc:  # 304 arrives as an "error"
        status, etag = exc.code, exc.headers["ETag"]
    if status != target.status or (target.app != "peer" and etag != running.info["etag"]):
        raise RuntimeError(
            f"{target.label}: got {status} with ETag {etag}, "
            f"expected {target.status} with {running.info['etag']}"
        )


def _measure(
    server: Server,
    targets: list[Target],
    *,
    rounds: int,
    seconds: int,
    warmup: int,
    folder: Path,
    setting: Setting = Setting(),  # noqa: B008 - an immutable tuple
) -> dict[Target, Load]:
    """The median load figures of every target, rounds alternating in order."""
    processes = list(dict.fromkeys(t.process for t in targets))
    found: dict[Target, list[Load]] = {t: [] for t in targets}
    with _servers(server, processes, folder, setting) as running:
        for target in targets:
            _check(target, running[target.process])
            if warmup:
                _wrk(running[target.process].url, warmup, _headers(target, running[target.process]))
        for n in range(rounds):
            for target in targets if n % 2 == 0 else targets[::-1]:
                proc = running[target.process]
                found[target].append(_wrk(proc.url, seconds, _headers(target, proc)))
        for target in targets:  # nothing moved while loaded
            _check(target, running[target.process])
    return {
        t: Load(
            statistics.median(x.rate for x in loads),
            statistics.median(x.p99 for x in loads),
            statistics.median(x.bytes_per_request for x in loads),
            "; ".join(sorted({x.errors for x in loads if x.errors})),
        )
        for t, loads in found.items()
    }


# -- report ------------------------------------------------------------------------------


def _table(server: Server, got: dict[Target, Load]) -> None:
    raw = {t.status: load for t, load in got.items() if t.app == "raw"}
    print(
        f"serve: {server.label} (1 worker; the peer: gunicorn -w 1 -k gthread --threads 4)\n"
        f"serve {server.short}: {'target':<40} {'req/s':>8} {'p99 ms':>8} {'B/req':>6} "
        f"{'req/s vs raw':>12} {'p99 vs raw':>10}"
    )
    for target, load in got.items():
        floor = raw[target.status]
        print(
            f"serve {server.short}: {target.label:<40} {load.rate:8,.0f} "
            f"{load.p99 * 1e3:8.2f} {load.bytes_per_request:6.0f} "
            f"{load.rate / floor.rate:11.2f}x {load.p99 / floor.p99:9.2f}x"
            + (f"  [{load.errors}]" if load.errors else ""),
            flush=True,
        )


def _comparisons(server: Server, got: dict[Target, Load]) -> list[Comparison]:
    """Comparisons hold seconds per request (1 / req/s), so ratios read like the others:
    ours/raw 200s <= 2 means ours serves >= 0.5x raw's requests/s."""
    by = {(t.app, t.store, t.status, t.tree): load for t, load in got.items()}
    out: list[Comparison] = []

    def add(name: str, ours: float, base: float, goal: float | None) -> None:
        ok = goal is None or ours / base <= goal
        out.append(Comparison(f"serve {server.short}: {name}", ours, base, _goal(goal), ok))

    raw200, raw304 = by[("raw", "memory", 200, "after")], by.get(("raw", "memory", 304, "after"))
    mine = [t for t in got if t.app not in ("raw", "peer") and t.tree == "after"]
    for app, store in dict.fromkeys((t.app, t.store) for t in mine):
        tag = {"ours": "cookie", "owner": "owner=", "async": "async owner="}[app]
        tag += "" if store == "memory" else f" {store}"
        goals = server.goals and store == "memory"
        ok200, ok304 = by[(app, store, 200, "after")], by.get((app, store, 304, "after"))
        add(f"{tag} 200 s/req vs raw", 1 / ok200.rate, 1 / raw200.rate, 2 if goals else None)
        add(f"{tag} 200 p99 vs raw", ok200.p99, raw200.p99, 2 if goals else None)
        if ok304 is not None:
            add(f"{tag} 304 s/req vs its 200", 1 / ok304.rate, 1 / ok200.rate, 1 if goals else None)
            if raw304 is not None:
                add(f"{tag} 304 s/req vs raw 304", 1 / ok304.rate, 1 / raw304.rate, None)
        old = by.get((app, store, 200, "before"))
        if old is not None:
            goal = 0.5 if store == "redis" and server.kind == "asgi" else None
            add(f"{tag} 200 s/req vs BEFORE", 1 / ok200.rate, 1 / old.rate, goal)
            add(f"{tag} 200 p99 vs BEFORE", ok200.p99, old.p99, None)
    peer = by.get(("peer", "redis", 200, "after"))
    ours = by.get(("ours", "redis", 200, "after"))
    if peer is not None and ours is not None:
        goal = 0.5 if server.kind == "asgi" else None
        add("cookie redis 200 s/req vs Django+celery-progress", 1 / ours.rate, 1 / peer.rate, goal)
        add("cookie redis 200 p99 vs Django+celery-progress", ours.p99, peer.p99, None)
        old = by.get(("ours", "redis", 200, "before"))
        if old is not None:
            add("BEFORE cookie redis 200 s/req vs Django+celery-progress", 1 / old.rate,
                1 / peer.rate, None)  # fmt: skip
    return out


def _goal(goal: float | None) -> str:
    return "report" if goal is None else f"<= {goal:g}"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _servers_here(skipped: list[str]) -> list[Server]:
    quiet = ["--log-level", "warning", "--no-access-log"]
    servers: list[Server] = []
    if _installed("uvicorn"):
        uvicorn = [
            sys.executable, "-m", "uvicorn", "serve_apps:asgi", "--factory",
            "--host", "127.0.0.1", "--port", "PORT", *quiet,
        ]  # fmt: skip
        if _installed("httptools") and _installed("uvloop"):
            fast = [*uvicorn, "--http", "httptools", "--loop", "uvloop"]
            servers.append(
                Server("uvicorn --http httptools --loop uvloop", "httptools", "asgi", fast, True)
            )
        else:
            skipped.append("uvicorn with httptools+uvloop (pip install 'uvicorn[standard]')")
        h11 = [*uvicorn, "--http", "h11", "--loop", "asyncio"]
        servers.append(Server("uvicorn --http h11 --loop asyncio", "h11", "asgi", h11, True))
    else:
        skipped.append("every ASGI figure: uvicorn is not installed")
    if _installed("gunicorn"):
        gunicorn = [
            sys.executable, "-m", "gunicorn", "serve_apps:wsgi()", "--chdir", str(HERE),
            "-b", "127.0.0.1:PORT", "-w", "1", "-k", "gthread", "--threads", "4",
            "--log-level", "warning",
        ]  # fmt: skip
        servers.append(
            Server("gunicorn -w 1 -k gthread --threads 4", "gunicorn", "wsgi", gunicorn, False)
        )
    else:
        skipped.append("WSGI figures: gunicorn is not installed (pip install gunicorn)")
    return servers


def _targets(server: Server, setting: Setting, peer: bool) -> list[Target]:
    """Every target of ``server``: the floor, ours on each store, the async owner (ASGI),
    the peer (with Redis), and the BEFORE tree's owner= and Redis targets (with one)."""
    apps = ["raw", "ours", "owner", "async"] if server.kind == "asgi" else ["raw", "ours"]
    stores = ["sqlite", "redis"] if setting.redis_url else ["sqlite"]
    targets = [Target(app, "memory", status) for app in apps for status in (200, 304)]
    targets += [Target("ours", store, status) for store in stores for status in (200, 304)]
    if setting.redis_url and peer:
        targets.append(Target("peer", "redis", 200))
    if setting.before is not None:
        if server.kind == "asgi":
            targets.append(Target("owner", "memory", 200, "before"))
        if setting.redis_url:
            targets.append(Target("ours", "redis", 200, "before"))
    return targets


def _before_tree(ref: str, folder: Path) -> Path:
    """The batchtrack package of git revision ``ref``, exported into ``folder``."""
    root = HERE.parent
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", ref, "src"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder / "src"


@contextlib.contextmanager
def _redis(folder: Path, skipped: list[str]) -> Iterator[str | None]:
    """A redis-server for the Redis targets (the tests' helper starts it); None when
    redis-server or redis-py is missing."""
    needs = ("redis", "pytest", "hypothesis")  # the tests' helper imports the last two
    if shutil.which("redis-server") is None or not all(_installed(m) for m in needs):
        skipped.append(
            "Redis targets and the Django peer: needs redis-server, redis-py and the "
            "tests' helpers (pip install -e '.[test]')"
        )
        yield None
        return
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import start_redis

    proc, port = start_redis(folder)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def run(
    quick: bool = False, before: str | None = None, only: str | None = None
) -> list[Comparison]:
    """Our status endpoint under uvicorn and gunicorn, against the raw floor, the peer
    and (``before``: a git revision) the code of another revision; ``only``: just the
    targets on that store or of that app (and the raw floor)."""
    if shutil.which("wrk") is None:
        print("serve: SKIPPED: wrk is not installed (apt-get install wrk)")
        return []
    rounds, seconds, warmup = (2, 1, 0) if quick else (5, 2, 1)
    skipped: list[str] = []
    servers = _servers_here(skipped)
    peer = all(_installed(m) for m in ("django", "celery_progress", "gunicorn", "celery"))
    if not peer:
        skipped.append(
            "the Django + celery-progress peer: pip install celery-progress django gunicorn"
        )
    results: list[Comparison] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp,
        _redis(Path(tmp), skipped) as redis_url,
    ):
        for what in skipped:
            print(f"serve: SKIPPED: {what}")
        tree = None if before is None else _before_tree(before, Path(tmp))
        setting = Setting(redis_url, tree)
        print(
            f"serve: wrk -t1 -c{CONNECTIONS} -d{seconds}s --latency, {rounds} rounds per "
            f"target (order reversed every other round), medians; {os.cpu_count()} CPUs"
            + (f"; BEFORE = {before}" if before else "")
        )
        for server in servers:
            targets = [
                t
                for t in _targets(server, setting, peer)
                if only is None or t.app == "raw" or only in (t.app, t.store)
            ]
            got = _measure(
                server,
                targets,
                rounds=rounds,
                seconds=seconds,
                warmup=warmup,
                folder=Path(tmp),
                setting=setting,
            )
            _table(server, got)
            results += _comparisons(server, got)
    return results


# -- profile ---------------------------------------------------------------------------


def profile(seconds: int = 8) -> None:
    """Where a status request's time goes: timings in-process, then py-spy samples of our
    uvicorn servers under wrk."""
    _inprocess()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists() or shutil.which("wrk") is None:
        print("profile: py-spy sampling skipped: needs py-spy (pip install py-spy) and wrk")
        return
    servers = [s for s in _servers_here([]) if s.kind == "asgi"]
    with tempfile.TemporaryDirectory(prefix="bench-serve-profile-") as tmp:
        for server in servers:
            for app in ("ours", "owner"):
                with _servers(server, [(app, "memory", "after")], Path(tmp)) as running:
                    proc = running[(app, "memory", "after")]
                    out = Path(tmp) / f"{server.short}-{app}.txt"
                    # The pool path runs --nonblocking: stopping 30-odd pool threads 250
                    # times a second would itself cost more than the request (its samples
                    # are less exact). The inline path has one thread: stopped to sample.
                    mode = ["--nonblocking"] if app == "owner" else []
                    spy_proc = subprocess.Popen(
                        [spy, "record", "--pid", str(proc.proc.pid), "--format", "raw",
                         "--rate", "250", *mode, "--threads", "--output", str(out),
                         "--duration", str(seconds)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                    time.sleep(0.5)
                    load = _wrk(proc.url, seconds - 1, [f"Cookie: {COOKIE}"])
                    spy_proc.wait()
                    print(
                        f"\n### py-spy, {server.label}, {_APPS[app]}, 200s: "
                        f"{load.rate:,.0f} req/s while sampled"
                        + (" (non-blocking sampling)" if mode else "")
                    )
                    _summarize(out)


_APPS = {"ours": "cookie (inline)", "owner": "owner= (thread pool)"}


def _inprocess() -> None:
    """Microseconds per status request and per piece of it, in this process."""
    import asyncio
    import contextvars
    import cProfile
    import pstats
    import timeit
    from concurrent.futures import ThreadPoolExecutor

    import serve_apps
    from batchtrack._eta import estimate
    from batchtrack._http import _etag, _status_answer
    from batchtrack._json import status_body
    from batchtrack._wire import Body, Request, Spool, body_length, check_uuid, fold_headers

    def per_call(fn: object, n: int = 20000) -> float:
        timer = timeit.Timer(fn)  # type: ignore[arg-type]
        return min(timer.repeat(5, n)) / n * 1e6

    with tempfile.TemporaryDirectory(prefix="bench-serve-inproc-") as tmp:
        apps = {}
        for which in ("ours", "owner"):
            os.environ.update(BENCH_APP=which, BENCH_STORE="memory", BENCH_DIR=f"{tmp}/{which}")
            apps[which] = serve_apps.asgi()
        info = json.loads(Path(f"{tmp}/ours/info.json").read_text())
        app = apps["ours"]
        api = app.api
        batch = info["batch_id"]
        path = f"/api/batch-status/{batch}"
        raw_headers = [(b"host", b"127.0.0.1:8000"), (b"cookie", COOKIE.encode())]
        raw_304 = [*raw_headers, (b"if-none-match", info["etag"].encode())]
        headers = fold_headers(raw_headers)
        owner = f"session:{SESSION}"

        def request(h: dict[str, str]) -> Request:
            return Request("GET", path, h, Body(lambda n: b"", 0), "", "127.0.0.1", "")

        r200, r304 = request(headers), request(fold_headers(raw_304))
        state = api.tracker._state(batch, owner)
        now = api.tracker.clock()
        record = api.tracker._visible(batch, owner, items=False, now=now)
        tag = _etag(*state)
        answer = api.handle(r200)
        snap = api.tracker.get(batch, owner=owner)
        print("## in-process, memory store, 10-item batch: microseconds per call (min of 5)")
        tracker, limit = api.tracker, api.body_limit(path)
        out_headers = answer.headers

        def shell_request() -> object:
            return Spool(api.uploads.directory, limit), request(headers)

        def shell_headers() -> object:
            return [(k.lower().encode(), v.encode("latin-1")) for k, v in out_headers]

        rows = [
            ("Api.handle, 200 (body cached)", lambda: api.handle(r200)),
            ("Api.handle, 304", lambda: api.handle(r304)),
            ("  _route (regex)", lambda: api._route(r200)),
            ("  _identify (cookie)", lambda: api._identify(r200)),
            ("  _identify (owner=)", lambda: apps["owner"].api._identify(r200)),
            ("  check_uuid", lambda: check_uuid(batch, "batchId")),
            ("  tracker._state (version + ETA)", lambda: tracker._state(batch, owner)),
            ("    store load + owner check (_visible)",
             lambda: tracker._visible(batch, owner, items=False, now=now)),
            ("    _eta.estimate",
             lambda: estimate(record.progress, record.created_at, record.stats, now)),
            ("  _etag", lambda: _etag(*state)),
            ("  _status_answer, 200", lambda: _status_answer(r200, tag, lambda: b"x")),
            ("  tracker.get (full snapshot, uncached path)",
             lambda: tracker.get(batch, owner=owner)),
            ("  status_body (uncached path)", lambda: status_body(snap)),
            ("ASGI shell: fold_headers", lambda: fold_headers(raw_headers)),
            ("ASGI shell: Spool + Body + Request", shell_request),
            ("ASGI shell: body_length + answers_inline",
             lambda: (body_length("GET", headers), api.answers_inline(r200))),
            ("ASGI shell: response headers to bytes", shell_headers),
        ]  # fmt: skip
        for name, fn in rows:
            print(f"  {per_call(fn):7.2f} us  {name}")

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 40000), "scheme": "http",
            "method": "GET", "root_path": "", "path": path, "raw_path": path.encode(),
            "query_string": b"", "headers": raw_headers,
        }  # fmt: skip
        scope_304 = {**scope, "headers": raw_304}

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: object) -> None:
            pass

        async def serial(a: object, sc: dict[str, object], n: int) -> float:
            began = time.perf_counter()
            for _ in range(n):
                await a(sc, receive, send)  # type: ignore[operator]
            return (time.perf_counter() - began) / n * 1e6

        async def concurrent(a: object, n: int, width: int = CONNECTIONS) -> float:
            began = time.perf_counter()
            for _ in range(n // width):
                await asyncio.gather(*(a(scope, receive, send) for _ in range(width)))  # type: ignore[operator]
            return (time.perf_counter() - began) / n * 1e6

        async def raw(sc: object, rc: object, sd: object) -> None:
            await sd({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
            await sd({"type": "http.response.body", "body": b""})  # type: ignore[operator]

        async def hop_only(n: int) -> float:
            loop = asyncio.get_running_loop()
            pool = apps["owner"]._pool or ThreadPoolExecutor(CONNECTIONS)
            began = time.perf_counter()
            for _ in range(n):
                ctx = contextvars.copy_context()
                await loop.run_in_executor(pool, ctx.run, lambda: None)
            return (time.perf_counter() - began) / n * 1e6

        async def whole() -> None:
            print("## in-process, the whole ASGI call with a no-op send (event loop: asyncio)")
            for _ in range(2):  # warm up (the pool's threads start)
                await serial(app, scope, 2000)
                await concurrent(apps["owner"], 3200)
            for name, coro in [
                ("raw ASGI app (two sends)", lambda: serial(raw, scope, 20000)),
                ("ours, cookie, 200, one at a time", lambda: serial(app, scope, 20000)),
                ("ours, cookie, 304, one at a time", lambda: serial(app, scope_304, 20000)),
                (
                    "ours, owner=, 200, one at a time (thread hop)",
                    lambda: serial(apps["owner"], scope, 5000),
                ),
                (
                    "ours, owner=, 200, 32 at a time (thread hop)",
                    lambda: concurrent(apps["owner"], 6400),
                ),
                ("  the hop alone: run_in_executor(pool, ctx.run, noop)", lambda: hop_only(5000)),
            ]:
                print(f"  {min([await coro() for _ in range(3)]):7.2f} us  {name}")

        asyncio.run(whole())

        async def many(a: object, sc: dict[str, object], n: int) -> None:
            for _ in range(n):
                await a(sc, receive, send)  # type: ignore[operator]

        for label, a in (("cookie", app), ("owner=", apps["owner"])):
            print(f"\n## cProfile, ours ({label}), 200s, 20,000 requests (tottime-sorted, top 14)")
            prof = cProfile.Profile()
            prof.enable()
            asyncio.run(many(a, scope, 20000))
            prof.disable()
            stats = pstats.Stats(prof)
            stats.sort_stats("tottime").print_stats(14)


# Buckets for a py-spy sample, by its innermost frame that one of them claims.
_BUCKETS = [
    ("json / status_body", ("batchtrack/_json.py", "json/")),
    ("ETA (_eta.py)", ("batchtrack/_eta.py",)),
    ("tracker / store", ("batchtrack/_tracker.py", "batchtrack/stores/")),
    ("_http.py: handle, route, identify, status, ETag", ("batchtrack/_http.py",)),
    ("_wire.py: fold_headers, Spool, Request, uuid", ("batchtrack/_wire.py", "<attrs gen")),
    ("asgi.py: App._http / _run (loop side)", ("batchtrack/asgi.py",)),
    ("pool thread: queue, wake-up, futures", ("concurrent/futures/", "threading.py", "queue.py")),
    ("uvicorn (protocol, send, parsing)", ("uvicorn/protocols/", "uvicorn/middleware/", "h11/")),
    (
        "asyncio (loop, futures, call_soon_threadsafe)",
        (
            "asyncio/base_",
            "asyncio/events",
            "asyncio/futures",
            "asyncio/selector",
            "asyncio/tasks",
            "selectors.py",
        ),
    ),
]


def _summarize(path: Path) -> None:
    """Where the samples of a py-spy raw (collapsed) file went."""
    counts: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    watch = (
        "App._http", "App._run", "App._handle", "Api.handle", "Api._batch_status",
        "Api._identify", "Api._route", "_status_answer", "BatchTracker._state",
        "fold_headers", "check_uuid", "RequestResponseCycle.send", "_worker",
    )  # fmt: skip
    total = outside_send = 0
    for line in path.read_text().splitlines():
        stack, _, n_text = line.rpartition(" ")
        if not n_text.isdigit():
            continue
        n = int(n_text)
        frames = stack.split(";")
        total += n
        threads["pool threads" if "batchtrack-http" in frames[0] else "event loop thread"] += n
        names = {f.split(" (")[0] for f in frames[1:]}
        if "App._http" in names and "RequestResponseCycle.send" not in names:
            outside_send += n
        for w in watch:
            if w in names:
                inclusive[w] += n
        for frame in reversed(frames[1:]):
            bucket = next((b for b, needles in _BUCKETS if any(x in frame for x in needles)), None)
            if bucket is not None:
                counts[bucket] += n
                break
        else:
            counts["event loop's own code (uvloop's C code under uvloop)"] += n
    shares = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in threads.items())
    print(f"  {total} samples: {shares}")
    print("  by innermost frame:")
    for name, n in counts.most_common():
        print(f"    {100 * n / total:5.1f}%  {name}")
    print("  inclusive (samples with the function on the stack):")
    for name in watch:
        if inclusive[name]:
            print(f"    {100 * inclusive[name] / total:5.1f}%  {name}")
    print(f"    {100 * outside_send / total:5.1f}%  App._http, outside uvicorn's send")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--profile"]:
        profile(int(sys.argv[2]) if len(sys.argv) > 2 else 8)
    else:
        ref = sys.argv[sys.argv.index("--before") + 1] if "--before" in sys.argv else None
        only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
        for result in run(quick="--quick" in sys.argv, before=ref, only=only):
            print(result.line())
