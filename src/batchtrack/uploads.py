"""Uploaded files on disk: stored under UUIDs, size-limited while streaming, owned, expiring.

Files live in one folder as ``<uuid>`` with a ``<uuid>.json`` sidecar holding the
original name, the owner, the size and the time of upload, so several processes (web
workers) sharing the folder see the same files. A filename is metadata only: it never
chooses a path.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import attrs

from .exceptions import BatchtrackError, ValidationError

__all__ = ["FileNotFound", "FileTooLarge", "StoredFile", "UploadStore", "UploadWriter"]

_CHUNK = 1 << 16
_UUID = re.compile(r"\A[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\Z")


class FileNotFound(BatchtrackError, LookupError):
    """No visible upload has this id (unknown, expired, or someone else's)."""

    def __init__(self, file_id: object) -> None:
        super().__init__(f"file {file_id!r} not found")
        self.file_id = file_id


class FileTooLarge(BatchtrackError):
    """An upload went over the size limit; nothing of it was kept."""

    def __init__(self, filename: str, limit: int) -> None:
        super().__init__(f"{filename!r} is larger than the limit of {limit:,} bytes")
        self.filename = filename
        self.limit = limit


@attrs.frozen
class StoredFile:
    """An upload as stored.

    Attributes:
        id: Its id (UUID4), also its name on disk.
        filename: The name it was uploaded with (the last path component only).
        path: Where the bytes are.
        size: Its size in bytes.
        owner: Who uploaded it, or None.
        created_at: When it was stored (seconds since the epoch).
    """

    id: str
    filename: str
    path: Path
    size: int
    owner: str | None = None
    created_at: float = 0.0


def clean_filename(name: object) -> str:
    """The last path component of an uploaded name, without control characters.

    ``"../../etc/passwd"`` becomes ``"passwd"``, ``"C:\\\\x\\\\a.jpg"`` becomes ``"a.jpg"``.
    """
    if not isinstance(name, str):
        raise ValidationError("a filename must be a string")
    base = re.split(r"[\\/]", name)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    if base in ("", ".", ".."):
        raise ValidationError(f"{name!r} is not a usable file name")
    return base[:255]


@attrs.define(eq=False)
class UploadWriter:
    """Receives one upload chunk by chunk; :meth:`commit` keeps it, :meth:`abort` drops it.

    Made by :meth:`UploadStore.begin`. Writing past the limit raises
    :class:`FileTooLarge` and drops what was written.
    """

    store: UploadStore
    filename: str
    owner: str | None
    _file: BinaryIO
    _tmp: str
    size: int = 0
    _open: bool = True

    def write(self, data: bytes) -> None:
        """Append ``data``; raises :class:`FileTooLarge` past the store's limit."""
        self.size += len(data)
        if self.size > self.store.max_bytes:
            self.abort()
            raise FileTooLarge(self.filename, self.store.max_bytes)
        self._file.write(data)

    def commit(self) -> StoredFile:
        """Store the upload under a new id and return it."""
        file_id = str(uuid.uuid4())
        self._file.close()
        self._open = False
        final = self.store.directory / file_id
        os.replace(self._tmp, final)
        stored = StoredFile(
            file_id, self.filename, final, self.size, self.owner, self.store.clock()
        )
        meta = {
            "filename": stored.filename,
            "owner": stored.owner,
            "size": stored.size,
            "created_at": stored.created_at,
        }
        fd, tmp = tempfile.mkstemp(dir=self.store.directory, prefix=".meta-", suffix=".part")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(meta, out)
        os.replace(tmp, final.with_suffix(".json"))  # the file is visible once this exists
        return stored

    def abort(self) -> None:
        """Drop what was written; safe to call more than once."""
        if self._open:
            self._open = False
            self._file.close()
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)


@attrs.define(eq=False, init=False)
class UploadStore:
    """Uploaded files in a folder, shared by every process that opens it.

    Args:
        directory: The folder (created when missing).
        max_bytes: The largest file accepted, enforced while streaming.
        ttl: Seconds an upload stays available.
        clock: Where times come from, like :func:`time.time`.
    """

    directory: Path
    max_bytes: int
    ttl: float
    clock: Callable[[], float]

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int = 20 * 2**20,
        ttl: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValidationError(f"max_bytes must be a positive whole number, not {max_bytes!r}")
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
            raise ValidationError(f"ttl must be a positive number of seconds, not {ttl!r}")
        path = Path(directory)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValidationError(f"cannot use {str(path)!r} for uploads: {exc}") from exc
        self.__attrs_init__(path, max_bytes, float(ttl), clock)

    def begin(self, filename: str, *, owner: str | None = None) -> UploadWriter:
        """Start receiving a file named ``filename`` (only its last component is kept)."""
        name = clean_filename(filename)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".upload-", suffix=".part")
        return UploadWriter(self, name, owner, os.fdopen(fd, "wb"), tmp)

    def save(self, filename: str, fileobj: BinaryIO, *, owner: str | None = None) -> StoredFile:
        """Store the contents of ``fileobj``, read in chunks, never past ``max_bytes``.

        Raises:
            ValidationError: An unusable filename.
            FileTooLarge: The file is over the limit; nothing was kept.
        """
        writer = self.begin(filename, owner=owner)
        try:
            while chunk := fileobj.read(_CHUNK):
                writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        return writer.commit()

    def get(self, file_id: str, *, owner: str | None = None) -> StoredFile:
        """The upload with this id, if visible to ``owner`` (None: trusted, no check).

        Raises:
            FileNotFound: Unknown, expired, or another owner's.
        """
        if not isinstance(file_id, str) or not _UUID.match(file_id):
            raise FileNotFound(file_id)
        stored = self._read(self.directory / f"{file_id}.json")
        if stored is None or stored.created_at + self.ttl <= self.clock():
            raise FileNotFound(file_id)
        if owner is not None and stored.owner != owner:
            raise FileNotFound(file_id)
        return stored

    def _read(self, meta_path: Path) -> StoredFile | None:
        """The upload a sidecar describes, or None when it is missing or unreadable."""
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            return StoredFile(
                meta_path.stem,
                meta["filename"],
                self.directory / meta_path.stem,
                meta["size"],
                meta["owner"],
                meta["created_at"],
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def cleanup(self) -> int:
        """Delete expired uploads (and stale partial files); return how many uploads."""
        now = self.clock()
        removed = 0
        for meta_path in self.directory.glob("*.json"):
            stored = self._read(meta_path)
            if stored is not None and stored.created_at + self.ttl <= now:
                with contextlib.suppress(OSError):
                    meta_path.unlink()
                    (self.directory / meta_path.stem).unlink()
                removed += 1
        for part in self.directory.glob(".*.part"):
            with contextlib.suppress(OSError):
                if part.stat().st_mtime + self.ttl <= time.time():
                    part.unlink()
        return removed
