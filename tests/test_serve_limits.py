"""`batchtrack serve` under slow clients: stalled request headers and running out of fds
(issue 23, point 1)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from http_support import free_port, jpeg, read_response, stop_serve, wait_until_serving

pytest.importorskip("uvicorn")
resource = pytest.importorskip("resource")

if not Path("/proc/self/limits").exists():
    pytest.skip("needs Linux (/proc)", allow_module_level=True)

STALLED = 1_100
FD_LIMIT = 1_024  # the server's, soft and hard: fewer than STALLED
STALL = b"GET /api/batch-sta"  # a request line that never ends
_SERVED: dict[str, int] = {}  # the pid of the server at each URL


def _limit_fds(soft: int, hard: int) -> Callable[[], None]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return limit


@contextlib.contextmanager
def _serve(tmp_path: Path, *options: str, fds: tuple[int, int] | None = None) -> Iterator[str]:
    """`python -m batchtrack serve` on a free port (its open files limited to ``fds``);
    yields its URL and stops it by its pid."""
    port = free_port()
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "batchtrack", "serve", "--port", str(port)]
    command += ["--data-dir", str(tmp_path / "data"), "--quiet", *options]
    with log.open("w") as sink:
        proc = subprocess.Popen(command, stderr=sink, preexec_fn=_limit_fds(*fds) if fds else None)
    try:
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until_serving(base + "/api/openapi.json", proc)
        except RuntimeError:
            pytest.fail(log.read_text())
        _SERVED[base] = proc.pid
        yield base
    finally:
        _SERVED.pop(f"http://127.0.0.1:{port}", None)
        stop_serve(proc)


@contextlib.contextmanager
def _stalled(base: str, n: int) -> Iterator[list[socket.socket]]:
    """``n`` connections that sent the start of a request line and stop; all closed after."""
    port = int(base.rsplit(":", 1)[1])
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(sock)
            sock.sendall(STALL)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def _open(sock: socket.socket) -> bool:
    """Whether the server still holds ``sock``'s connection (nothing to read, no EOF)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def _batch(client: httpx.Client) -> str:
    """A batch of one image, started; its status URL."""
    files = [("files", ("a.jpg", jpeg((64, 48)), "image/jpeg"))]
    ids = [f["id"] for f in client.post("/api/upload", files=files).json()["files"]]
    started = client.post("/api/process-batch", json={"fileIds": ids})
    assert started.status_code == 202, started.text
    return str(started.json()["statusUrl"])


@pytest.fixture
def fds_for_the_test() -> None:
    """This process may hold the stalled sockets (its soft limit raised if need be)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = STALLED + 200
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"needs {wanted} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest.mark.usefixtures("fds_for_the_test")
def test_status_polls_are_answered_while_more_stalled_headers_than_fds_are_open(
    tmp_path: Path,
) -> None:
    """With 1,100 stalled request lines and 1,024 fds, status polls still get their answer."""
    with _serve(tmp_path, "--header-timeout", "60", fds=(FD_LIMIT, FD_LIMIT)) as base:
        with httpx.Client(base_url=base, timeout=10) as client:
            status_url = _batch(client)
            cookies = client.cookies
        with _stalled(base, STALLED) as socks:
            for _ in range(10):
                # A new connection each time, as a browser's poll after an idle spell.
                answer = httpx.get(base + status_url, cookies=cookies, timeout=1)
                assert answer.status_code == 200
                assert answer.json()["progress"]["total"] == 1
            # The stalled ones are mostly still held: the header timeout did not clear them.
            assert sum(_open(s) for s in socks) > FD_LIMIT // 2


def test_a_connection_over_the_cap_closes_the_oldest_one_without_a_request(
    tmp_path: Path,
) -> None:
    """Past --max-connections, the oldest stalled connection is closed and the new one served."""
    options = ("--max-connections", "2", "--header-timeout", "60")
    with _serve(tmp_path, *options) as base, _stalled(base, 2) as (oldest, newer):
        time.sleep(0.2)  # both are accepted, in this order
        answer = httpx.get(base + "/api/openapi.json", timeout=10)
        assert answer.status_code == 200
        oldest.settimeout(10)
        assert oldest.recv(1) == b""  # closed, with nothing said
        assert _open(newer)


def test_stalled_request_headers_are_answered_408_and_closed_after_the_header_timeout(
    tmp_path: Path,
) -> None:
    """A request line that never ends gets a JSON 408 and is closed after --header-timeout."""
    with _serve(tmp_path, "--header-timeout", "1") as base, _stalled(base, 1) as (sock,):
        opened = time.monotonic()
        status, headers, body = read_response(sock, timeout=30)
        waited = time.monotonic() - opened
        assert status == 408
        assert headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert sock.recv(1) == b""
        assert waited >= 0.9  # not before the timeout


def test_a_kept_alive_connection_has_the_header_timeout_for_its_next_request(
    tmp_path: Path,
) -> None:
    """After one answered request, a second request's stalled headers also get 408."""
    with _serve(tmp_path, "--header-timeout", "1") as base, _stalled(base, 1) as (sock,):
        sock.sendall(b"/x HTTP/1.1\r\nHost: a\r\n\r\n")  # completes the stalled request: 404
        status, _, _ = read_response(sock, timeout=10)
        assert status == 404
        sock.sendall(b"GET /api/openapi.json HTTP/1.1\r\nHost: a\r\n")  # no blank line
        status, _, body = read_response(sock, timeout=30)
        assert status == 408
        assert json.loads(body)["error"]["code"] == "request_timeout"


def test_serve_raises_its_soft_open_files_limit_to_the_hard_limit(tmp_path: Path) -> None:
    """Started with a soft limit of 256 open files, serve raises it to the hard limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY:
        hard = min(hard, 4096)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"needs a finite hard limit above 256, got {hard}")
    with _serve(tmp_path, fds=(256, hard)) as base:
        limits = Path(f"/proc/{_SERVED[base]}/limits").read_text().splitlines()
        line = next(x for x in limits if x.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)]


MALLOC_PROBE = """
import ctypes, sys
from batchtrack._serve_limits import settle_malloc

assert settle_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
info = type("Info", (ctypes.Structure,), {"_fields_": [(n, ctypes.c_int) for n in names.split()]})
libc.mallinfo.restype = info
size = 4 * 2**20  # an image buffer of Pillow's
libc.free(libc.malloc(size))
before = libc.mallinfo().hblks
libc.malloc(size)
print(libc.mallinfo().hblks - before)
"""


def test_serve_has_glibc_map_every_image_sized_block_even_after_one_was_freed() -> None:
    """After settle_malloc, a 4 MiB block freed does not make the next one come from an arena."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's malloc only")
    probe = subprocess.run(
        [sys.executable, "-c", MALLOC_PROBE], capture_output=True, text=True, timeout=60
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "1"  # mapped: freed, it goes back to the system
