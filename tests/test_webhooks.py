"""Signed webhooks when a batch ends: a real receiver on 127.0.0.1, real senders (in this
process and in subprocesses killed with SIGKILL), signatures checked by a verifier written
here from the Standard Webhooks specification, not by batchtrack's own code."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

from batchtrack import BatchTracker, MemoryStore, SQLiteStore, ValidationError
from batchtrack.webhooks import DEFAULT_SCHEDULE, Webhook, WebhookSender

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
FAST = (0.2,) * 30  # retry delays that make a test take seconds


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The receiver's check, as the Standard Webhooks specification describes it."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    given = [s.split(",", 1)[1] for s in headers["webhook-signature"].split() if s[:3] == "v1,"]
    fresh = abs(time.time() - int(headers["webhook-timestamp"])) < 300
    return fresh and any(hmac.compare_digest(expected, s) for s in given)


@attrs.define
class Receiver:
    """An HTTP server that records every request and answers as ``plan`` says, in turn
    (a status, "hang" until ``release`` is set, or "garbage"), then 200."""

    plan: list[Any] = attrs.Factory(list)
    got: list[tuple[dict[str, str], bytes]] = attrs.Factory(list)
    release: threading.Event = attrs.Factory(threading.Event)
    arrived: threading.Event = attrs.Factory(threading.Event)
    url: str = ""

    def wait_for(self, count: int, timeout: float = 30) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout
        while len(self.got) < count:
            assert time.monotonic() < deadline, f"{len(self.got)} of {count} requests came"
            time.sleep(0.02)
        return list(self.got)


@contextlib.contextmanager
def receiver(*plan: Any) -> Iterator[Receiver]:
    """A :class:`Receiver` serving on 127.0.0.1 for the test."""
    state = Receiver(list(plan))
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            with lock:
                state.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                answer = state.plan.pop(0) if state.plan else 200
            state.arrived.set()
            if answer == "hang":
                state.release.wait(60)
                answer = 200
            if answer == "garbage":
                self.wfile.write(b"\x00\x01 not HTTP at all\r\n\r\n")
                return
            self.send_response(answer)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_port}/hook"
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


def finish(tracker: BatchTracker, outcomes: str, owner: str | None = None) -> str:
    """A batch whose items end as ``outcomes`` says (c: completed, f: failed); its id."""
    snap = tracker.create_batch([f"{n}.jpg" for n in range(len(outcomes))], owner=owner)
    for item, outcome in zip(snap.items, outcomes, strict=True):
        tracker.start_item(snap.batch_id, item.id)
        if outcome == "c":
            tracker.complete_item(snap.batch_id, item.id)
        else:
            tracker.fail_item(snap.batch_id, item.id, "boom")
    return snap.batch_id


def drain(sender: WebhookSender, until: Callable[[], bool], timeout: float = 30) -> None:
    """Run the sender's rounds until ``until()`` holds."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the sender did not get there"
        sender.run_once()
        time.sleep(0.05)


# -- the test: kill -9 between the last item and the delivery, and mid-retry --------

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from batchtrack import BatchTracker, SQLiteStore
    from batchtrack.webhooks import Webhook, WebhookSender

    path, url, mode = sys.argv[1:4]
    tracker = BatchTracker(SQLiteStore(path))
    if mode == "finish":
        snap = tracker.create_batch(["a.jpg", "b.jpg"], owner="alice")
        for item in snap.items:
            tracker.start_item(snap.batch_id, item.id)
            tracker.complete_item(snap.batch_id, item.id)
        print(snap.batch_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # after the last item, before any delivery
    hook = Webhook(url, os.environ["SECRET"])
    # A killed sender's claim is free again after 2 * timeout + 5 = 7 s.
    WebhookSender(tracker, [hook], schedule=[0.3] * 20, timeout=1, poll=0.1).start()
    time.sleep(600)
    """
)


def test_a_delivery_survives_kill_9_after_the_last_item_and_mid_retry(tmp_path: Path) -> None:
    """A batch finished by a process killed at once, then a sender killed mid-retry: the
    next sender delivers it, signed, with the same webhook-id on every attempt."""
    script = tmp_path / "sender.py"
    script.write_text(SCRIPT)
    db = str(tmp_path / "hooks.db")
    env = {**os.environ, "SECRET": SECRET}

    def run(mode: str, url: str) -> subprocess.Popen[str]:
        command = [sys.executable, str(script), db, url, mode]
        out = subprocess.PIPE if mode == "finish" else subprocess.DEVNULL
        return subprocess.Popen(command, env=env, stdout=out, text=True)

    with receiver(500, 500, 500) as hook:
        first = run("finish", hook.url)
        assert first.stdout is not None
        batch_id = first.stdout.readline().strip()
        first.stdout.close()
        assert first.wait(30) == -signal.SIGKILL
        assert hook.got == []
        second = run("send", hook.url)
        try:
            hook.wait_for(2)
        finally:
            second.kill()  # kill -9 while the delivery waits for its next attempt
            second.wait(30)
        time.sleep(0.8)  # what a live sender would have retried by now
        assert len(hook.got) in (2, 3)  # a third may have been on the wire already
        third = run("send", hook.url)
        try:
            got = hook.wait_for(4)
            time.sleep(0.8)  # a settled delivery is not sent again
        finally:
            third.kill()
            third.wait(30)
    assert len(hook.got) == 4
    assert len({headers["webhook-id"] for headers, _ in got}) == 1
    assert all(verify(SECRET, headers, body) for headers, body in got)
    headers, body = got[-1]
    assert headers["content-type"] == "application/json"
    assert headers["webhook-id"].startswith(f"msg_{batch_id}_")
    assert json.loads(body) == {
        "type": "batch.completed",
        "batchId": batch_id,
        "status": "completed",
        "progress": {
            "total": 2,
            "completed": 2,
            "failed": 0,
            "processing": 0,
            "pending": 0,
            "cancelled": 0,
        },
        "metadata": {},
    }
    assert not verify(SECRET, headers, body + b" ")  # the verifier does check


# -- what ends a batch, and for whom ------------------------------------------------------------


def test_cancelled_failed_and_mixed_batches_send_their_types() -> None:
    """A cancelled batch sends batch.cancelled, an all-failed one batch.failed, one with
    some failures batch.completed; open batches send nothing."""
    tracker = BatchTracker(MemoryStore())
    with receiver() as hook:
        sender = WebhookSender(tracker, [Webhook(hook.url, SECRET)], schedule=FAST)
        cancelled = tracker.create_batch(["a.jpg", "b.jpg"]).batch_id
        tracker.cancel(cancelled)
        failed = finish(tracker, "ff")
        mixed = finish(tracker, "cf")
        tracker.create_batch(["open.jpg"])
        drain(sender, lambda: len(hook.got) >= 3)
        sender.run_once()
    bodies = {json.loads(b)["batchId"]: json.loads(b) for _, b in hook.got}
    assert len(hook.got) == 3
    assert {k: (v["type"], v["status"]) for k, v in bodies.items()} == {
        cancelled: ("batch.cancelled", "cancelled"),
        failed: ("batch.failed", "failed"),
        mixed: ("batch.completed", "completed"),
    }
    assert bodies[mixed]["progress"]["failed"] == 1


def test_a_retried_batch_that_ends_again_sends_a_new_event() -> None:
    """Each end of a batch is its own event, with its own webhook-id."""
    tracker = BatchTracker(MemoryStore())
    with receiver() as hook:
        sender = WebhookSender(tracker, [Webhook(hook.url, SECRET)], schedule=FAST)
        batch_id = finish(tracker, "f")
        drain(sender, lambda: len(hook.got) >= 1)
        tracker.retry(batch_id)
        item = tracker.get(batch_id).items[0].id
        tracker.start_item(batch_id, item)
        tracker.complete_item(batch_id, item)
        drain(sender, lambda: len(hook.got) >= 2)
    (first_headers, first), (second_headers, second) = hook.got
    assert (json.loads(first)["type"], json.loads(second)["type"]) == (
        "batch.failed",
        "batch.completed",
    )
    assert first_headers["webhook-id"] != second_headers["webhook-id"]


def test_owner_scoped_hooks_get_only_their_owners_batches() -> None:
    """A hook with an owner hears of that owner's batches only; a global one of all."""
    tracker = BatchTracker(MemoryStore())
    with receiver() as alice, receiver() as everyone:
        hooks = [Webhook(alice.url, SECRET, owner="alice"), Webhook(everyone.url, SECRET)]
        sender = WebhookSender(tracker, hooks, schedule=FAST)
        mine = finish(tracker, "c", owner="alice")
        finish(tracker, "c", owner="bob")
        finish(tracker, "c")
        drain(sender, lambda: len(everyone.got) >= 3)
        sender.run_once()
    assert [json.loads(b)["batchId"] for _, b in alice.got] == [mine]


def test_hooks_of_one_url_for_several_owners_each_hear_of_their_owners_batches() -> None:
    """Two owner-scoped hooks on the same URL both count: each owner's batch is sent."""
    tracker = BatchTracker(MemoryStore())
    with receiver() as shared:
        hooks = [
            Webhook(shared.url, SECRET, owner="alice"),
            Webhook(shared.url, SECRET, owner="bob"),
        ]
        sender = WebhookSender(tracker, hooks, schedule=FAST)
        ann = finish(tracker, "c", owner="alice")
        bob = finish(tracker, "c", owner="bob")
        finish(tracker, "c", owner="carol")
        drain(sender, lambda: len(shared.got) >= 2)
        sender.run_once()
    assert sorted(json.loads(b)["batchId"] for _, b in shared.got) == sorted([ann, bob])


def test_one_url_with_two_secrets_is_refused() -> None:
    """The same URL registered with two secrets is a ValidationError, not a silent pick."""
    other = "whsec_" + base64.b64encode(b"abcdef0123456789abcdef0123456789").decode()
    hooks = [Webhook("http://h/x", SECRET), Webhook("http://h/x", other, owner="bob")]
    with pytest.raises(ValidationError, match="two secrets"):
        WebhookSender(BatchTracker(MemoryStore()), hooks)


# -- answers: 410, garbage, giving up -----------------------------------------------------------


def test_410_unsubscribes_the_url_for_every_later_sender(tmp_path: Path) -> None:
    """A receiver answering 410 gets nothing more, from this sender or one started later
    on the same database; the other URLs still do."""
    path = tmp_path / "gone.db"
    tracker = BatchTracker(SQLiteStore(path))
    with receiver(410) as gone, receiver() as kept:
        hooks = [Webhook(gone.url, SECRET), Webhook(kept.url, SECRET)]
        sender = WebhookSender(tracker, hooks, schedule=FAST)
        finish(tracker, "c")
        drain(sender, lambda: len(gone.got) >= 1 and len(kept.got) >= 1)
        finish(tracker, "c")
        drain(sender, lambda: len(kept.got) >= 2)
        tracker.store.close()
        again = BatchTracker(SQLiteStore(path))
        later = WebhookSender(again, hooks, schedule=FAST)
        finish(again, "c")
        drain(later, lambda: len(kept.got) >= 3)
        later.run_once()
        again.store.close()
    assert len(gone.got) == 1


def test_a_sender_started_with_an_unsubscribed_url_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sender that starts with a URL that answered 410 before logs a warning naming
    it, so an operator restarting serve with that URL learns why nothing arrives."""
    path = tmp_path / "gone.db"
    tracker = BatchTracker(SQLiteStore(path))
    with receiver(410) as gone:
        sender = WebhookSender(tracker, [Webhook(gone.url, SECRET)], schedule=FAST)
        finish(tracker, "c")
        drain(sender, lambda: tracker.store.outbox_unsubscribed() == {gone.url})
    tracker.store.close()
    again = BatchTracker(SQLiteStore(path))
    later = WebhookSender(again, [Webhook(gone.url, SECRET)], schedule=FAST, poll=0.05)
    with caplog.at_level("WARNING", logger="batchtrack"):
        later.start()
        deadline = time.monotonic() + 10
        while gone.url not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
        later.stop()
    again.store.close()
    assert f"webhook {gone.url} answered 410 before" in caplog.text


def test_a_receiver_that_trickles_its_answer_does_not_hold_up_other_urls() -> None:
    """A receiver sending its answer a byte at a time (each socket read within the timeout)
    is cut off after ``timeout`` in all, so the next URL's delivery goes out meanwhile."""
    stop = threading.Event()

    class Trickle(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            with contextlib.suppress(OSError):
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                while not stop.wait(0.3):
                    self.wfile.write(b"x")
                    self.wfile.flush()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        assert_not_held_up_by(f"http://127.0.0.1:{server.server_port}/hook")
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


def assert_not_held_up_by(stuck: str) -> None:
    """With a sender (timeout 1 s) stuck on a delivery to ``stuck``, a delivery to
    another receiver still goes out."""
    tracker = BatchTracker(MemoryStore())
    with receiver() as good:
        hooks = [Webhook(stuck, SECRET, owner="a"), Webhook(good.url, SECRET, owner="b")]
        sender = WebhookSender(tracker, hooks, schedule=(60.0,), timeout=1, poll=0.05)
        sender.start()
        finish(tracker, "c", owner="a")
        time.sleep(0.5)  # the sender is stuck on the first delivery by now
        mine = finish(tracker, "c", owner="b")
        got = good.wait_for(1, timeout=20)
        sender.stop()
    assert json.loads(got[0][1])["batchId"] == mine


def test_a_receiver_whose_name_lookup_hangs_does_not_hold_up_other_urls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A URL whose DNS lookup never answers is given up after ``timeout`` like a receiver
    that never answers, so the next URL's delivery goes out meanwhile."""
    stop = threading.Event()
    lookup = socket.getaddrinfo

    def hanging(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "hangs.invalid":
            stop.wait(60)
            raise socket.gaierror("no answer")
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    try:
        assert_not_held_up_by("http://hangs.invalid/hook")
    finally:
        stop.set()


def test_deliveries_go_through_the_proxy_the_environment_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With HTTP_PROXY set (and the host not in NO_PROXY), a delivery is sent to the
    proxy with the absolute URL, as urllib-based clients do."""
    with receiver() as proxy:
        address = proxy.url.removesuffix("/hook")
        monkeypatch.setenv("HTTP_PROXY", address)
        monkeypatch.setenv("http_proxy", address)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        tracker = BatchTracker(MemoryStore())
        sender = WebhookSender(tracker, [Webhook("http://hooks.invalid/x", SECRET)])
        mine = finish(tracker, "c")
        drain(sender, lambda: len(proxy.got) >= 1)
        headers, body = proxy.got[0]
    assert headers["host"] == "hooks.invalid"
    assert json.loads(body)["batchId"] == mine
    assert verify(SECRET, headers, body)


def test_errors_garbage_and_silence_are_retried_with_the_same_id() -> None:
    """A 500, a 302, an answer that is not HTTP and a receiver that hangs past the timeout
    are each retried; the 2xx after them settles the delivery."""
    tracker = BatchTracker(MemoryStore())
    with receiver(500, 302, "garbage", "hang") as hook:
        sender = WebhookSender(tracker, [Webhook(hook.url, SECRET)], schedule=FAST, timeout=0.5)
        finish(tracker, "c")
        drain(sender, lambda: len(hook.got) >= 5)
        time.sleep(0.5)
        sender.run_once()
    assert len(hook.got) == 5
    assert len({headers["webhook-id"] for headers, _ in hook.got}) == 1
    assert all(verify(SECRET, headers, body) for headers, body in hook.got)


def test_a_delivery_is_given_up_after_its_schedule() -> None:
    """After the last delay of the schedule a failing delivery is dropped (and logged)."""
    tracker = BatchTracker(MemoryStore())
    with receiver(*[500] * 10) as hook:
        sender = WebhookSender(tracker, [Webhook(hook.url, SECRET)], schedule=(0.05, 0.05))
        finish(tracker, "c")
        drain(sender, lambda: len(hook.got) >= 3)
        time.sleep(0.3)
        sender.run_once()
    assert len(hook.got) == 3


def test_the_default_schedule_starts_within_seconds_and_lasts_about_a_day() -> None:
    """5 s first, doubling, at most 3 h apart, 24 h in all at most."""
    assert DEFAULT_SCHEDULE[:4] == (5.0, 10.0, 20.0, 40.0)
    assert max(DEFAULT_SCHEDULE) == 3 * 3600
    assert 20 * 3600 < sum(DEFAULT_SCHEDULE) <= 24 * 3600


# -- apart from batches and requests ------------------------------------------------------------


def test_a_hanging_receiver_holds_up_neither_items_nor_status_requests(tmp_path: Path) -> None:
    """While a receiver holds a delivery open, items complete and the app (which started
    its sender with the first request) answers status requests."""
    from batchtrack import wsgi
    from batchtrack.uploads import UploadStore
    from http_support import RecordingRunner

    tracker = BatchTracker(MemoryStore())
    runner = RecordingRunner(tracker, None)  # runs nothing here: items move by hand
    with receiver("hang") as hook:
        app = wsgi.create_app(
            tracker,
            runner,
            UploadStore(tmp_path / "uploads"),
            owner=lambda headers: headers.get("x-user"),
            webhooks=[Webhook(hook.url, SECRET)],
        )
        with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as client:
            first = finish(tracker, "c", owner="u")
            assert client.get(f"/api/batch-status/{first}", headers={"x-user": "u"}).is_success
            assert hook.arrived.wait(30)
            second = finish(tracker, "cc", owner="u")
            answer = client.get(f"/api/batch-status/{second}", headers={"x-user": "u"})
            assert answer.json()["status"] == "completed"
            assert not hook.release.is_set()
            assert len(hook.got) == 1  # the sender is still in the first delivery
            hook.release.set()
            hook.wait_for(2)
        app._recovery.stop()


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "secret", "message"),
    [
        ("ftp://h/x", SECRET, "http"),
        ("http:///x", SECRET, "http"),
        ("http://h:99999/x", SECRET, "port"),
        ("http://h:x/x", SECRET, "port"),
        ("http://h:0/x", SECRET, "port"),
        ("http://h/x y", SECRET, "percent-encoded"),
        ("http://h/caf\u00e9", SECRET, "percent-encoded"),
        ("http://h/x\x7f", SECRET, "percent-encoded"),
        ("http://h/x", "secret", "whsec_"),
        ("http://h/x", "whsec_not base64!", "base64"),
        ("http://h/x", "whsec_" + base64.b64encode(b"short").decode(), "24 to 64 bytes"),
    ],
)
def test_bad_urls_and_secrets_are_refused(url: str, secret: str, message: str) -> None:
    """A URL that is not http(s) with a host and a port of 1 to 65535 in printable ASCII,
    or a secret not whsec_<base64 of 24 to 64 bytes>, raises ValidationError saying so
    (never echoing the secret)."""
    with pytest.raises(ValidationError, match=message) as caught:
        Webhook(url, secret)
    assert "not base64!" not in str(caught.value)


def test_a_store_without_an_outbox_is_refused() -> None:
    """A sender over a store that keeps no outbox (Store's defaults) raises
    ValidationError at once, without a call to the store."""
    from batchtrack.stores.base import Store

    class Plain(MemoryStore):
        outbox_claim = Store.outbox_claim

    with pytest.raises(ValidationError, match="Plain has no outbox"):
        WebhookSender(BatchTracker(Plain()), [Webhook("http://h/", SECRET)])


# -- batchtrack serve ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--webhook", "http://h/x"], {}, "--webhook needs a secret"),
        (["--webhook", "ftp://h/x", "--webhook-secret", SECRET], {}, "--webhook ftp://h/x:"),
        (["--webhook", "http://h/x", "--webhook-secret", "whsec_???"], {}, "base64"),
        (["--webhook", "http://h/x"], {"BATCHTRACK_WEBHOOK_SECRET": "nope"}, "whsec_"),
        (["--webhook-secret", SECRET], {}, "needs at least one --webhook"),
    ],
)
def test_serve_webhook_usage_errors_are_one_line(
    args: list[str], env: dict[str, str], message: str, tmp_path: Path
) -> None:
    """Bad --webhook/--webhook-secret combinations exit 2 with one line naming them."""
    from http_support import free_port

    plain = {k: v for k, v in os.environ.items() if k != "BATCHTRACK_WEBHOOK_SECRET"}
    result = subprocess.run(
        [sys.executable, "-m", "batchtrack", "serve", "--port", str(free_port()), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={**plain, **env},
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr
    assert "???" not in result.stderr


def test_serve_with_a_webhook_posts_when_a_batch_ends(tmp_path: Path) -> None:
    """`serve --webhook URL` with the secret in BATCHTRACK_WEBHOOK_SECRET: a batch run
    through the API ends with one signed batch.completed POST."""
    from http_support import free_port, jpeg, stop_serve, wait_until_serving

    port = free_port()
    with receiver() as hook:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "batchtrack",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(tmp_path / "data"),
                "--webhook",
                hook.url,
                "--quiet",
            ],
            env={**os.environ, "BATCHTRACK_WEBHOOK_SECRET": SECRET},
            stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until_serving(base + "/", proc)
            with httpx.Client(base_url=base, timeout=30) as client:
                files = [("files", ("a.jpg", jpeg((40, 30)), "image/jpeg"))]
                ids = [f["id"] for f in client.post("/api/upload", files=files).json()["files"]]
                batch_id = client.post("/api/process-batch", json={"fileIds": ids}).json()[
                    "batchId"
                ]
            [(headers, body)] = hook.wait_for(1)
        finally:
            stop_serve(proc)
    assert verify(SECRET, headers, body)
    assert json.loads(body)["batchId"] == batch_id
    assert json.loads(body)["type"] == "batch.completed"


def test_the_docs_verifier_accepts_a_real_delivery_and_nothing_tampered() -> None:
    """operating.rst's verification snippet accepts what a sender POSTs, and refuses it
    with another body, id or secret."""
    from test_docs_and_examples import _snippet

    namespace: dict[str, Any] = {}
    exec(_snippet("operating.rst", "tested-webhook-verify"), namespace)
    check = namespace["verify"]
    tracker = BatchTracker(MemoryStore())
    with receiver() as hook:
        sender = WebhookSender(tracker, [Webhook(hook.url, SECRET)], schedule=FAST)
        finish(tracker, "c")
        drain(sender, lambda: len(hook.got) >= 1)
    [(headers, body)] = hook.got
    assert check(SECRET, headers, body)
    assert not check(SECRET, headers, body.replace(b"completed", b"cancelled"))
    assert not check(SECRET, {**headers, "webhook-id": "msg_other"}, body)
    other = "whsec_" + base64.b64encode(b"x" * 32).decode()
    assert not check(other, headers, body)


# -- schema migrations ----------------------------------------------------------------------------


def test_schema_3_postgres_tables_gain_the_outbox(postgres_url: str) -> None:
    """PostgreSQL tables of schema 3 (no outbox) migrate to the current schema: their batch
    stays, and its end writes an end marker that a sender delivers."""
    pytest.importorskip("psycopg")
    import uuid

    import psycopg

    from batchtrack.stores.postgres import SCHEMA_VERSION, PostgresStore
    from conftest import drop_postgres_tables

    prefix = f"w{uuid.uuid4().hex[:12]}_"
    try:
        with PostgresStore(postgres_url, table_prefix=prefix) as store:
            batch_id = BatchTracker(store).create_batch([("a", "a.jpg")]).batch_id
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(
                f'DROP TABLE "{prefix}outbox", "{prefix}webhooks_gone", "{prefix}metadata"'
            )
            conn.execute(f'DROP INDEX "{prefix}batches_by_owner", "{prefix}batches_by_time"')
            conn.execute(f'UPDATE "{prefix}schema" SET version = 3')
        with PostgresStore(postgres_url, table_prefix=prefix) as store, receiver() as hook:
            tracker = BatchTracker(store)
            sender = WebhookSender(tracker, [Webhook(hook.url, SECRET)], schedule=FAST)
            tracker.start_item(batch_id, "a")
            tracker.complete_item(batch_id, "a")
            drain(sender, lambda: len(hook.got) >= 1)
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            row = conn.execute(f'SELECT version FROM "{prefix}schema"').fetchone()
        assert row == (SCHEMA_VERSION,) == (5,)
        assert json.loads(hook.got[0][1])["batchId"] == batch_id
    finally:
        drop_postgres_tables(postgres_url, f"{prefix}%")


def test_every_store_delivers_a_cancelled_batch_once(store_factory: Any) -> None:
    """On each store a batch cancelled through apply_many and one finished item by item
    are each delivered once, and the outbox is empty afterwards."""
    store = store_factory()
    tracker = BatchTracker(store)
    with receiver() as hook:
        sender = WebhookSender(tracker, [Webhook(hook.url, SECRET)], schedule=FAST)
        cancelled = tracker.create_batch(["a.jpg"]).batch_id
        tracker.cancel(cancelled)
        completed = finish(tracker, "cc")
        drain(sender, lambda: len(hook.got) >= 2)
        sender.run_once()
    assert sorted(json.loads(b)["batchId"] for _, b in hook.got) == sorted([cancelled, completed])
    assert store.outbox_claim(tracker.clock() + 1e6, 10, tracker.clock() + 2e6) == []


def test_the_openapi_document_describes_what_a_receiver_gets() -> None:
    """The document's ``webhooks`` entry names the signature headers, and a real delivery
    (with metadata) of each type validates against its body schema."""
    jsonschema = pytest.importorskip("jsonschema")
    from batchtrack._openapi import document

    doc = document("/api", max_files=10)
    post = doc["webhooks"]["batchEnded"]["post"]
    assert {p["name"] for p in post["parameters"]} == {
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
    schema = {"$ref": "#/components/schemas/BatchEnded", "components": doc["components"]}
    tracker = BatchTracker(MemoryStore())
    with receiver() as hook:
        sender = WebhookSender(tracker, [Webhook(hook.url, SECRET)], schedule=FAST)
        done = tracker.create_batch(["a.jpg"], metadata={"order": "A-17"}).batch_id
        tracker.start_item(done, tracker.get(done).items[0].id)
        tracker.complete_item(done, tracker.get(done).items[0].id)
        finish(tracker, "f")
        tracker.cancel(tracker.create_batch(["b.jpg"]).batch_id)
        drain(sender, lambda: len(hook.got) >= 3)
    bodies = [json.loads(body) for _, body in hook.got]
    assert sorted(b["type"] for b in bodies) == [
        "batch.cancelled",
        "batch.completed",
        "batch.failed",
    ]
    for body in bodies:
        jsonschema.validate(body, schema)
    assert next(b for b in bodies if b["batchId"] == done)["metadata"] == {"order": "A-17"}
