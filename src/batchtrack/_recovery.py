"""Recovery of an app's batches after a restart, with or without an ASGI lifespan.

An app whose runner is an :class:`~batchtrack.Orchestrator` (work in this process) takes
back, once started, what a process that died left: it reclaims lost items and resumes the
unfinished batches made of its own uploads, then does so again every ``min(60, lease)``
seconds, and removes expired batches every 600 s (what the tracker's sweeper does, without
taking the place of the one an integrator may start). It starts at lifespan
startup, or on the first request when no lifespan came (an app mounted in a framework
that does not forward it, any WSGI app), once; it stops at lifespan shutdown, or at
interpreter exit. The app's webhook sender (``create_app(webhooks=...)``), whatever its
runner, starts and stops with it.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any

from ._orchestrator import Orchestrator
from ._tracker import BatchTracker
from .exceptions import BatchtrackError
from .typing import Runner
from .uploads import UploadStore
from .webhooks import WebhookSender

__all__ = ["Recovery", "for_app"]

log = logging.getLogger("batchtrack")

MAX_INTERVAL = 60.0
CLEANUP_INTERVAL = 600.0
_JOIN = 10.0  # seconds to wait for a round in progress when stopping


class Recovery:
    """The recovery loop of one app (see the module); :meth:`start` and :meth:`stop` are
    thread-safe, and starting twice (or after a stop) does nothing."""

    def __init__(
        self,
        tracker: BatchTracker,
        runner: Runner,
        uploads: UploadStore,
        webhooks: WebhookSender | None = None,
    ) -> None:
        self.tracker = tracker
        self.runner = runner
        self.uploads = uploads
        self.webhooks = webhooks  # the app's webhook sender: starts and stops with it
        self._lock = threading.Lock()
        self._started = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return self._started

    def start(self, owner: object) -> None:
        """Start recovering (once per app); stop at interpreter exit unless stopped first.

        ``owner`` is the app: the loop stops too when it is garbage-collected.
        """
        if self._started:  # the common case, without the lock
            return
        with self._lock:
            if self._started:
                return
            self._started = True
            if self.webhooks is not None:
                self.webhooks.start()
                weakref.finalize(owner, self.webhooks.stop)
            if not isinstance(self.runner, Orchestrator):
                return  # other runners' workers and brokers take back their own work
            self._thread = threading.Thread(
                target=self._loop, name="batchtrack-recovery", daemon=True
            )
            self._thread.start()
        weakref.finalize(owner, self.stop)

    def stop(self) -> None:
        """Stop the loop, waiting (a while) for a round in progress."""
        with self._lock:
            self._started = True  # never started after a stop
            self._stop.set()
            thread, self._thread = self._thread, None
        if self.webhooks is not None:
            self.webhooks.stop()
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN)
        if thread is not None:
            log.debug("batchtrack: recovery stopped")

    def _loop(self) -> None:
        interval = min(MAX_INTERVAL, self.tracker.lease)
        first = True
        cleanup = time.monotonic() + CLEANUP_INTERVAL
        while not self._stop.is_set():
            if time.monotonic() >= cleanup:
                cleanup = time.monotonic() + CLEANUP_INTERVAL
                try:
                    self.tracker.cleanup()
                except Exception:
                    log.warning("batchtrack: could not remove expired batches", exc_info=True)
            try:
                resumed = self.recover()
            except Exception:  # the store may be back next round
                log.warning("batchtrack: could not recover unfinished batches", exc_info=True)
            else:
                if first and resumed:
                    log.info("batchtrack: recovery resumed %d unfinished batches", resumed)
                first = False
            self._stop.wait(interval)

    def recover(self) -> int:
        """Reclaim lost items, resume this app's unfinished batches; return how many."""
        assert isinstance(self.runner, Orchestrator)
        self.tracker.reclaim()
        resumed = 0
        for batch_id in self.tracker.open_batches():
            if self._stop.is_set():
                break
            try:
                snap = self.tracker.get(batch_id, limit=1)  # a batch of uploads is all uploads
                if not any(
                    isinstance(item.source, str) and self.uploads.file_id_of(item.source)
                    for item in snap.items
                ):
                    continue  # not made of this app's uploads: someone else's to run
                self.runner.resume(batch_id)
            except BatchtrackError:  # expired meanwhile, or the orchestrator closed
                log.debug("batchtrack: could not resume batch %s", batch_id, exc_info=True)
            else:
                resumed += 1
        return resumed


def for_app(app: Any) -> Recovery:
    """The recovery of an ASGI or WSGI app, from its API's tracker, runner and uploads."""
    return Recovery(app.api.tracker, app.api.runner, app.api.uploads, app.api.webhook_sender)
