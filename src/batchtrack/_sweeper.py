"""A daemon thread that runs a few housekeeping tasks every ``interval`` seconds.

The tracker's sweeper (reclaim lost items, remove expired batches) and the Celery
runner's (the same, plus new messages for stalled batches) are both one of these.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import attrs

log = logging.getLogger("batchtrack")

Task = tuple[str, Callable[[], int]]  # what the log calls it, and the task (-> how many)


@attrs.define
class Sweeper:
    """Runs ``tasks`` every ``interval`` seconds in one daemon thread, until stopped.

    A task that raises is logged and tried again next time: the sweeper must outlive a
    passing store failure.
    """

    name: str
    _thread: threading.Thread | None = attrs.field(default=None, init=False)
    _stop: threading.Event = attrs.field(factory=threading.Event, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def start(self, interval: float, tasks: Sequence[Task]) -> None:
        """Start the thread.

        Raises:
            RuntimeError: It is already running.
        """
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("the sweeper is already running; stop_sweeper() first")
            self._stop.clear()
            thread = threading.Thread(
                target=self._run, args=(interval, tuple(tasks)), name=self.name, daemon=True
            )
            self._thread = thread
            thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it; does nothing when none runs."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop.set()
        if thread is not None:
            thread.join()

    def _run(self, interval: float, tasks: tuple[Task, ...]) -> None:
        while not self._stop.wait(interval):
            for what, task in tasks:
                try:
                    done = task()
                except Exception:
                    name = getattr(task, "__name__", what)
                    log.exception("%s: %s failed; trying again later", self.name, name)
                else:
                    if done:
                        log.debug("%s %s: %d", self.name, what, done)
