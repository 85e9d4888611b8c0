"""One log line when the store or the file storage goes away, one when it is back.

With Redis down every request fails the same way; :class:`Outages` turns the failures
of one outage into one warning, and the first request served again into another.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Iterable

import attrs

__all__ = ["Outages", "disk_full"]

log = logging.getLogger("batchtrack")

# What a kind of outage is called in the log: when it starts, when it ends.
_WORDS = {
    "store": ("store unreachable", "store reachable again"),
    "files": ("file storage unreachable", "file storage reachable again"),
    "full": ("storage full", "storage has room again"),
}


@attrs.define(eq=False)
class Outages:
    """The outages an app is in: for one log line when each starts and one when it ends,
    and silence for the failed requests in between. Safe from any thread.

    The kinds are ``"store"`` (the batch store), ``"files"`` (the file storage) and
    ``"full"`` (a disk with no room left).
    """

    _since: dict[str, tuple[float, int]] = attrs.field(factory=dict)  # first failure, count
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def failed(self, kind: str, what: str, exc: BaseException) -> None:
        """A request (``what``) found ``kind`` away: logged when it is the first one."""
        with self._lock:
            since, count = self._since.get(kind, (time.monotonic(), 0))
            self._since[kind] = since, count + 1
        if not count:
            log.warning(
                "batchtrack: %s: %s (%s); later failures are not logged until it answers",
                _WORDS[kind][0],
                exc,
                what,
            )

    def answered(self, kinds: Iterable[str]) -> None:
        """A request was served by ``kinds``: the end of their outages, if any."""
        if not self._since:  # the usual case, without taking the lock
            return
        for kind in kinds:
            with self._lock:
                ended = self._since.pop(kind, None)
            if ended is not None:
                since, count = ended
                log.warning(
                    "batchtrack: %s after %.1f s (%d failed requests)",
                    _WORDS[kind][1],
                    time.monotonic() - since,
                    count,
                )


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that found no room (a full disk, or over a quota)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))
