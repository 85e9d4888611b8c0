"""``GET {prefix}/batch-results/{batchId}.zip``: every completed item's result in one ZIP.

The archive is written by the standard library's :mod:`zipfile` as it is sent: the
response is a :class:`~batchtrack._wire.Stream` that the shell polls, and each poll adds
at most :data:`PART` bytes of input, so neither the archive nor a result is ever held
whole in memory and no thread is held between polls.
"""

from __future__ import annotations

import logging
import re
import time
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO
from urllib.parse import quote

import attrs

from ._models import Status
from ._tracker import BatchTracker
from ._wire import Request, Response, batch_not_found, check_uuid, reject
from .exceptions import BatchNotFound
from .files.base import FileStorage
from .files.results import ResultFiles

__all__ = ["PART", "ResultsZip", "ZipStream"]

log = logging.getLogger("batchtrack")

_PACKED = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".avif", ".heic", ".zip"})
"""Suffixes of files stored in the archive as they are, not deflated again."""

PART = 1 << 20
"""The most bytes of results one poll of a :class:`ZipStream` reads (and so sends)."""

_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]+')
_RESERVED = re.compile(r"(?:CON|PRN|AUX|NUL|(?:COM|LPT)[0-9\u00b9\u00b2\u00b3])\Z", re.IGNORECASE)
"""Names Windows keeps for devices, whatever the extension (``CON.jpg`` is the console)."""


def _member_name(filename: str, suffix: str, taken: set[str]) -> str:
    """The name of a result in the archive: the upload's stem and the result's extension.

    Never a path (separators and control characters become ``_``; no leading dots), never
    a name Windows cannot extract (a device name such as ``CON`` or ``lpt1`` before the
    first dot gets a ``_``: ``CON_.jpg``; no trailing dots or spaces), and unique in the
    archive (``photo (2).jpg`` for the second ``photo.jpg``).
    """
    stem = _UNSAFE.sub("_", Path(filename.replace("\\", "/")).stem).lstrip(".").strip()
    stem = stem[:150].rstrip(". ") or "image"
    first, dot, rest = stem.partition(".")
    if _RESERVED.match(first.rstrip(" ")):
        stem = f"{first.rstrip(' ')}_{dot}{rest}"
    name, n = f"{stem}{suffix}", 1
    while name.lower() in taken:
        n += 1
        name = f"{stem} ({n}){suffix}"
    taken.add(name.lower())
    return name


class _Sink:
    """A write-only, unseekable file for :class:`zipfile.ZipFile`: it keeps what is written
    until :meth:`take` hands it on (zipfile then writes sizes after each member)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._position = 0

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> list[bytes]:
        parts, self._parts = self._parts, []
        return [p for p in parts if p]


@attrs.define(eq=False)
class ZipStream:
    """The ZIP of ``members`` (name in the archive, key in ``storage``), made as it is
    polled.

    A file that cannot be read any more (removed with its batch meanwhile) is left out
    and logged: the archive stays valid. A storage that fails mid-archive ends it there
    (logged): the client sees a cut download, never a wrong file.
    """

    storage: FileStorage
    members: list[tuple[str, str]]
    interval: float = 0.0
    _sink: _Sink = attrs.field(init=False, factory=_Sink)
    _zip: zipfile.ZipFile | None = attrs.field(init=False, default=None)
    _source: IO[bytes] | None = attrs.field(init=False, default=None)
    _target: IO[bytes] | None = attrs.field(init=False, default=None)
    _done: bool = attrs.field(init=False, default=False)

    def open(self, wake: Callable[[], None]) -> None:
        """Nothing to wait for: each poll sends the next part at once."""

    def close(self) -> None:
        """The response is over: a result file still open (the client left) is closed."""
        if self._source is not None:
            self._source.close()

    def poll(self) -> list[bytes] | None:
        """The next part of the archive; None once all of it was sent."""
        if self._done:
            return None
        if self._zip is None:
            # Results are compressed images already: deflate's cheapest level is enough.
            self._zip = zipfile.ZipFile(
                self._sink,
                "w",
                compression=zipfile.ZIP_DEFLATED,
                compresslevel=1,
            )
        budget = PART
        while budget > 0:
            if self._source is None and not self._open_next():
                self._zip.close()  # the central directory
                self._done = True
                break
            source, target = self._source, self._target
            assert source is not None
            assert target is not None
            data = source.read(min(budget, 1 << 16))
            if not data:
                self._close_member()
                continue
            target.write(data)
            budget -= len(data)
        return self._sink.take()

    def _open_next(self) -> bool:
        """Open the next member's file and its entry; False when none is left."""
        assert self._zip is not None
        while self.members:
            name, key = self.members.pop(0)
            try:
                size = self.storage.size(key)
                source = self.storage.open(key)
            except FileNotFoundError:
                size = None
            if size is None:
                log.warning("batchtrack: result %s is gone; left out of the ZIP", key)
                continue
            self._source = source
            member: zipfile.ZipInfo | str = name  # deflated at the archive's level 1
            if PurePosixPath(name).suffix.lower() in _PACKED:
                # Compressed already: deflate would spend ~15x the time of storing them
                # for an archive no smaller.
                member = zipfile.ZipInfo(name, time.localtime()[:6])
                member.compress_type = zipfile.ZIP_STORED
                member.external_attr = 0o644 << 16
            self._target = self._zip.open(
                member, "w", force_zip64=size * 1.05 > zipfile.ZIP64_LIMIT
            )
            return True
        return False

    def _close_member(self) -> None:
        if self._source is not None:
            self._source.close()
        if self._target is not None:
            self._target.close()
        self._source = self._target = None


@attrs.frozen
class ResultsZip:
    """The ZIP endpoint, over the tracker and the folder of results.

    Attributes:
        tracker: Where the batch and its completed items are read.
        results: Where results are, ``<item id>.<ext>`` (None: none are served).
    """

    tracker: BatchTracker
    results: ResultFiles | None

    def download(self, request: Request, owner: str, batch: str) -> Response:
        """``GET /batch-results/{batchId}.zip``: 200 the ZIP of every completed item.

        400 ``invalid_id``, 404 ``batch_not_found`` as for the batch's status; 409
        ``nothing_completed`` when no item has completed (yet); 404 ``result_not_found``
        when items completed but none of their results can be found.
        """
        batch_id = check_uuid(batch, "batchId")
        try:
            snap = self.tracker.get(batch_id, owner=owner, status=Status.COMPLETED)
        except BatchNotFound:
            batch_not_found()
        if not snap.items:
            reject(409, "nothing_completed", "no item of this batch has completed (yet)")
        results = self.results
        if results is None:
            reject(404, "result_not_found", "the processed files are not available")
        taken: set[str] = set()
        members = []
        for item in snap.items:
            key = results.find(item.id)
            if key is not None:
                suffix = PurePosixPath(key).suffix
                members.append((_member_name(item.filename, suffix, taken), key))
        if not members:
            reject(404, "result_not_found", "the processed files are not available")
        name = f"batch-{snap.batch_id[:8]}-results.zip"
        return Response(
            200,
            [
                ("Content-Type", "application/zip"),
                ("Content-Disposition", f"attachment; filename*=UTF-8''{quote(name)}"),
                ("Cache-Control", "no-store"),
            ],
            stream=ZipStream(results.storage, members),
        )
