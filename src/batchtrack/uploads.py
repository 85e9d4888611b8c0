"""Uploaded files: stored under UUIDs, size-limited while streaming, owned, expiring.

Files live in a :class:`~batchtrack.files.FileStorage` (a folder, or object storage) as
``<uuid>`` with a ``<uuid>.json`` sidecar holding the original name, the owner, the size
and the time of upload, so several processes (web workers), and with object storage
several machines, sharing the storage see the same files. A filename is metadata only: it never
chooses a path.

Two quotas keep uploads from filling a disk: :class:`UploadStore` caps the folder as a
whole (``max_total_bytes``, ``min_free_bytes``: :class:`StorageFull`), and
:class:`UploadQuota` caps what one client may upload in a window of time
(:class:`QuotaExceeded`); the HTTP API answers them with 507 and 429.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import errno
import json
import math
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import attrs

from .exceptions import BatchtrackError, FileStorageError, ValidationError
from .files.base import FileStorage, FileWriter, check_key
from .files.local import LocalFiles

__all__ = [
    "FileNotFound",
    "FileTooLarge",
    "QuotaExceeded",
    "StorageFull",
    "StoredFile",
    "UploadQuota",
    "UploadStore",
    "UploadWriter",
]

_CHUNK = 1 << 16
_DISK_CHECK_BYTES = 1 << 20
"""A writer asks the disk for its free space again after writing this many bytes."""
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_QUOTA_SLOTS = 60
"""An :class:`UploadQuota` counts bytes in this many slots per window."""
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


class StorageFull(BatchtrackError):
    """No room for an upload: the folder is full, or its disk nearly is.

    Raised for ``max_total_bytes`` and ``min_free_bytes`` of :class:`UploadStore`, and when
    the disk runs out of space mid-write. The upload that met it was dropped; nothing else
    was touched.

    Attributes:
        reason: ``"total"`` (the folder's cap) or ``"disk"`` (the disk's free space).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class QuotaExceeded(BatchtrackError):
    """A client went over its :class:`UploadQuota`.

    Attributes:
        key: The client.
        limit: The bytes a client may upload per window.
        window: The window, in seconds.
        retry_after: Whole seconds (at least 1) until the client has room again for what
            it tried; the whole window when that can never fit.
    """

    def __init__(self, key: str, limit: int, window: float, retry_after: int) -> None:
        super().__init__(
            f"client {key!r} may upload at most {limit:,} bytes per {window:g} seconds; "
            f"try again in {retry_after} s"
        )
        self.key, self.limit, self.window, self.retry_after = key, limit, window, retry_after


def _check_bytes(name: str, value: object, *, minimum: int) -> int:
    """``value`` if it is a whole number of bytes >= ``minimum``.

    Raises:
        ValidationError: Anything else (including ``True``).
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValidationError(f"{name} must be a whole number of bytes >= {minimum}, not {value!r}")
    return value


@attrs.frozen
class StoredFile:
    """An upload as stored.

    Attributes:
        id: Its id (UUID4), also its name in the storage.
        filename: The name it was uploaded with (the last path component only).
        path: Where the bytes are on this machine's disk, or None when they live in
            object storage (then use ``location``).
        size: Its size in bytes.
        owner: Who uploaded it, or None.
        created_at: When it was stored (seconds since the epoch).
        location: Where the bytes are for any machine: the path for a folder, a URL such
            as ``s3://bucket/prefix/uploads/<id>`` for object storage. This is what a
            batch's :attr:`Item.source <batchtrack.Item.source>` holds.
    """

    id: str
    filename: str
    path: Path | None
    size: int
    owner: str | None = None
    created_at: float = 0.0
    location: str = ""


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

    Made by :meth:`UploadStore.begin`. The bytes stream to the store's file storage as
    they arrive (never held whole in memory). Writing past the limit raises
    :class:`FileTooLarge`, and past the store's room :class:`StorageFull`; either drops
    what was written. A storage outage raises :class:`~batchtrack.FileStorageError` and
    drops it too.
    """

    store: UploadStore
    filename: str
    owner: str | None
    file_id: str
    _out: FileWriter
    size: int = 0
    _open: bool = True
    _unchecked: int = 0  # bytes written since the disk's free space was last asked

    def write(self, data: bytes) -> None:
        """Append ``data``.

        Raises:
            FileTooLarge: Past the store's ``max_bytes``; nothing of the file is kept.
            StorageFull: No room left in the store or on its disk; nothing of it is kept.
            FileStorageError: The storage failed; nothing of it is kept.
        """
        if self.size + len(data) > self.store.max_bytes:
            self.abort()
            raise FileTooLarge(self.filename, self.store.max_bytes)
        try:
            self._unchecked += len(data)
            if self._unchecked >= _DISK_CHECK_BYTES:
                self._unchecked = 0
                self.store._check_disk(len(data))
            self.store._reserve(len(data))
        except StorageFull:
            self.abort()
            raise
        self.size += len(data)  # reserved: abort() gives it back
        try:
            self._out.write(data)
        except FileStorageError as exc:
            self.abort()
            if exc.full:
                raise self.store._disk_full() from None
            raise

    def commit(self) -> StoredFile:
        """Keep the upload under its id and return it.

        The bytes are committed first, then the sidecar that describes them: the upload
        is visible (to :meth:`UploadStore.get`) once the sidecar is there.

        Raises:
            StorageFull: The disk ran out of space while the file was being kept;
                nothing of it is kept.
            FileStorageError: The storage failed; nothing of it is kept.
        """
        store = self.store
        key = store._key(self.file_id)
        stored = StoredFile(
            self.file_id,
            self.filename,
            store.storage.local_path(key),
            self.size,
            self.owner,
            store.clock(),
            store.storage.location(key),
        )
        meta = {
            "filename": stored.filename,
            "owner": stored.owner,
            "size": stored.size,
            "created_at": stored.created_at,
        }
        try:
            self._open = False
            self._out.commit()
            store.storage.write_bytes(f"{key}.json", json.dumps(meta).encode())
        except BaseException as exc:
            self._out.abort()
            with contextlib.suppress(FileStorageError):
                store.storage.delete(key)
            store._release(self.size)
            if isinstance(exc, FileStorageError) and exc.full:
                raise store._disk_full() from None
            raise
        store._settle(stored)
        return stored

    def abort(self) -> None:
        """Drop what was written; safe to call more than once."""
        if self._open:
            self._open = False
            self._out.abort()
            self.store._release(self.size)


class _Seen:
    """Which uploads a scan found: a byte per upload of the index (no object per upload,
    however many there are), and the few the index lacks with their times and sizes."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids  # the index's ids when the scan began, sorted
        self.seen = bytearray(len(ids))
        self.extra: dict[str, tuple[float, int]] = {}

    def _at(self, file_id: str) -> int | None:
        at = bisect.bisect_left(self.ids, file_id)
        return at if at < len(self.ids) and self.ids[at] == file_id else None

    def add(self, stored: StoredFile) -> None:
        at = self._at(stored.id)
        if at is None:
            self.extra[stored.id] = (stored.created_at, stored.size)
        else:
            self.seen[at] = 1

    def saw(self, file_id: str) -> bool:
        at = self._at(file_id)
        return file_id in self.extra if at is None else bool(self.seen[at])

    def found(self) -> Iterator[str]:
        """Every id the scan found."""
        yield from (file_id for file_id, seen in zip(self.ids, self.seen, strict=True) if seen)
        yield from self.extra


def _in_order(files: collections.OrderedDict[str, tuple[float, int]]) -> bool:
    """Whether the uploads are oldest first (by creation time)."""
    last = -math.inf
    for created_at, _ in files.values():
        if created_at < last:
            return False
        last = created_at
    return True


def _storage(where: str | os.PathLike[str] | FileStorage) -> FileStorage:
    if isinstance(where, FileStorage):
        return where
    if not isinstance(where, (str, os.PathLike)):
        raise ValidationError(f"uploads go to a folder or a FileStorage, not {where!r}")
    return LocalFiles(where)


@attrs.define(eq=False, init=False)
class UploadStore:
    """Uploaded files in a folder or in object storage, shared by every process (and
    machine) that opens the same one.

    Each upload is two files in the storage, under ``prefix``: ``<uuid>`` (the bytes)
    and ``<uuid>.json`` (the original name, the owner, the size and the time of upload,
    written last: the upload exists once it is there).

    The storage as a whole has a cap: the uploads that have not expired, plus those being
    received, may hold at most ``max_total_bytes``, and a disk must keep more than
    ``min_free_bytes`` free; an upload that would break either is dropped with
    :class:`StorageFull`, before it starts or while it streams. Expired uploads never
    count: the store deletes them as soon as the next upload begins (and
    :meth:`cleanup` sweeps them too).

    The total is a running count, not a listing per upload: it is read from the storage
    when the store is made and kept current on every commit, abort, :meth:`delete`,
    expiry and :meth:`cleanup` (thread-safe). Several processes sharing the storage each
    keep their own count, which sees the others' uploads when :meth:`cleanup` (which
    lists the whole storage anyway) recounts it: run it every few minutes, as
    ``batchtrack serve`` does, or give each process its share of the cap. The free-space
    check asks the disk itself (:func:`shutil.disk_usage`: before each file and after
    every MiB written), so it sees every process; object storage has no such check.

    Args:
        directory: The folder (created when missing), or a
            :class:`~batchtrack.files.FileStorage` (:func:`batchtrack.files.from_url`
            makes one from ``s3://bucket/prefix``).
        prefix: Where in the storage uploads go (``""``: at its top; ``"uploads/"``).
        max_bytes: The largest file accepted, enforced while streaming.
        ttl: Seconds an upload stays available.
        clock: Where times come from, like :func:`time.time`.
        max_total_bytes: The most the storage may hold (uploads not yet expired plus
            those arriving), or None (the default) for no cap.
        min_free_bytes: The free space the disk must keep (100 MiB by default; 0 turns
            the check off). A disk that runs out of space mid-write is
            :class:`StorageFull` too.

    Raises:
        ValidationError: A bad option, or a folder that cannot be created.
        FileStorageError: The storage cannot be read.
    """

    storage: FileStorage
    prefix: str
    max_bytes: int
    ttl: float
    clock: Callable[[], float]
    max_total_bytes: int | None
    min_free_bytes: int
    _lock: threading.Lock
    _files: collections.OrderedDict[str, tuple[float, int]]  # id -> (created_at, size)
    _stored: int  # bytes of the uploads in _files
    _reserved: int  # bytes of uploads being received

    def __init__(
        self,
        directory: str | os.PathLike[str] | FileStorage,
        *,
        prefix: str = "",
        max_bytes: int = 20 * 2**20,
        ttl: float = 3600.0,
        clock: Callable[[], float] = time.time,
        max_total_bytes: int | None = None,
        min_free_bytes: int = 100 * 2**20,
    ) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValidationError(f"max_bytes must be a positive whole number, not {max_bytes!r}")
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
            raise ValidationError(f"ttl must be a positive number of seconds, not {ttl!r}")
        if max_total_bytes is not None:
            _check_bytes("max_total_bytes", max_total_bytes, minimum=1)
        _check_bytes("min_free_bytes", min_free_bytes, minimum=0)
        if not isinstance(prefix, str) or (prefix and not prefix.endswith("/")):
            raise ValidationError(f"prefix must be '' or end with '/', not {prefix!r}")
        if prefix:
            check_key(prefix.rstrip("/"))
        try:
            storage = _storage(directory)
        except ValidationError as exc:
            raise ValidationError(f"cannot use {str(directory)!r} for uploads: {exc}") from None
        self.__attrs_init__(
            storage,
            prefix,
            max_bytes,
            float(ttl),
            clock,
            max_total_bytes,
            min_free_bytes,
            threading.Lock(),
            collections.OrderedDict(),
            0,
            0,
        )
        seen = self._seen()
        for stored in self._scan():
            seen.add(stored)
        self._recount(seen)

    @property
    def directory(self) -> Path | None:
        """The folder uploads are in, or None when they live in object storage."""
        path = self.storage.local_path(self.prefix + "x")
        return None if path is None else path.parent

    @property
    def spool_dir(self) -> Path:
        """A folder on this machine's disk for request bodies on their way in."""
        return self.directory or Path(tempfile.gettempdir())

    @property
    def used_bytes(self) -> int:
        """The bytes that count against ``max_total_bytes`` now, as this process knows.

        That is the uploads not yet expired and those being received; expired uploads are
        deleted first.
        """
        self._expire()
        with self._lock:
            return self._stored + self._reserved

    def begin(self, filename: str, *, owner: str | None = None) -> UploadWriter:
        """Start receiving a file named ``filename`` (only its last component is kept).

        Raises:
            ValidationError: An unusable filename.
            StorageFull: The store is already full, or its disk nearly is.
            FileStorageError: The storage cannot be reached.
        """
        name = clean_filename(filename)
        self._expire()
        self._check_disk(0)
        with self._lock:
            if self.max_total_bytes is not None and (
                self._stored + self._reserved >= self.max_total_bytes
            ):
                raise self._total_full()
        file_id = str(uuid.uuid4())
        try:
            out = self.storage.writer(self._key(file_id))
        except FileStorageError as exc:
            if exc.full:
                raise self._disk_full() from None
            raise
        return UploadWriter(self, name, owner, file_id, out)

    def save(self, filename: str, fileobj: BinaryIO, *, owner: str | None = None) -> StoredFile:
        """Store the contents of ``fileobj``, read in chunks, never past ``max_bytes``.

        Raises:
            ValidationError: An unusable filename.
            FileTooLarge: The file is over the limit; nothing was kept.
            StorageFull: No room for it in the store or on its disk; nothing was kept.
            FileStorageError: The storage failed; nothing was kept.
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
            FileStorageError: The storage cannot be reached.
        """
        if not isinstance(file_id, str) or not _UUID.match(file_id):
            raise FileNotFound(file_id)
        stored = self._read(file_id)
        if stored is None or stored.created_at + self.ttl <= self.clock():
            raise FileNotFound(file_id)
        if owner is not None and stored.owner != owner:
            raise FileNotFound(file_id)
        return stored

    def file_id_of(self, location: str) -> str | None:
        """The id of the upload at ``location`` (a :attr:`StoredFile.location`), if it
        is one of this store's; None for anything else."""
        key = self.storage.key_of(location)
        if key is None or not key.startswith(self.prefix):
            return None
        file_id = key[len(self.prefix) :]
        return file_id if _UUID.match(file_id) else None

    def open(self, file_id: str, *, owner: str | None = None) -> BinaryIO:
        """The bytes of a visible upload, for reading.

        Raises:
            FileNotFound: Unknown, expired, or another owner's (or deleted meanwhile).
            FileStorageError: The storage cannot be reached.
        """
        self.get(file_id, owner=owner)
        try:
            return self.storage.open(self._key(file_id))
        except FileNotFoundError:
            raise FileNotFound(file_id) from None

    def delete(self, file_id: str) -> bool:
        """Delete an upload (whoever owns it); True when there was one to delete."""
        if not isinstance(file_id, str) or not _UUID.match(file_id):
            return False
        with self._lock:
            known = self._files.pop(file_id, None)
            if known is not None:
                self._stored -= known[1]
        return self._unlink(file_id)

    def _key(self, file_id: str) -> str:
        return f"{self.prefix}{file_id}"

    def _read(self, file_id: str) -> StoredFile | None:
        """The upload a sidecar describes, or None when it is missing or unreadable."""
        key = self._key(file_id)
        try:
            meta = json.loads(self.storage.read_bytes(f"{key}.json"))
            return StoredFile(
                file_id,
                meta["filename"],
                self.storage.local_path(key),
                meta["size"],
                meta["owner"],
                meta["created_at"],
                self.storage.location(key),
            )
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def _unlink(self, file_id: str) -> bool:
        """Remove an upload's sidecar (which hides it), then its bytes; True if it was there."""
        key = self._key(file_id)
        gone = self.storage.delete(f"{key}.json")
        self.storage.delete(key)
        return gone

    def cleanup(self) -> int:
        """Delete expired uploads (and stale partial files); return how many uploads.

        It reads every sidecar in the storage, and so also recounts the running total,
        taking in what other processes sharing it stored or deleted.
        """
        started = self.clock()
        removed = 0
        seen = self._seen()
        for stored in self._scan():
            if stored.created_at + self.ttl <= started:
                self._unlink(stored.id)
                removed += 1
            else:
                seen.add(stored)
        self._recount(seen)
        self.storage.sweep_partial(self.prefix, self.ttl)
        return removed

    # -- the running total -----------------------------------------------------------------

    def _scan(self) -> Iterator[StoredFile]:
        """Every upload the storage's sidecars describe (expired ones too): O(files) time,
        streamed: one sidecar read at a time, the listing consumed as it goes, so memory
        does not grow with the number of files (only the caller's own use of them)."""
        for info in self.storage.list(self.prefix):
            name = info.key[len(self.prefix) :]
            if name.endswith(".json") and _UUID.match(name[:-5]):
                stored = self._read(name[:-5])
                if stored is not None:
                    yield stored

    def _seen(self) -> _Seen:
        """An empty tally of a scan, against the index as it is now."""
        with self._lock:
            return _Seen(sorted(self._files))

    def _recount(self, seen: _Seen) -> None:
        """Make the running total that of the uploads a scan has ``seen``.

        Where the scan and this process disagree (an upload committed or deleted while the
        scan ran, here or in another process), the sidecar in the storage decides. The
        index is updated in place: copies of it at every cleanup would be megabytes of
        small objects that the allocator keeps afterwards.
        """
        with self._lock:
            unseen = [i for i in self._files if not seen.saw(i)]
            lost = [i for i in seen.found() if i not in self._files]
        present = {
            i for i in unseen + lost if self.storage.size(f"{self._key(i)}.json") is not None
        }
        back: dict[str, tuple[float, int]] = {}
        for file_id in lost:
            if file_id in present:
                entry = seen.extra.get(file_id)
                if entry is None and (stored := self._read(file_id)) is not None:
                    entry = (stored.created_at, stored.size)
                if entry is not None:
                    back[file_id] = entry
        with self._lock:
            files = self._files
            for file_id in unseen:
                if file_id not in present:
                    files.pop(file_id, None)
            for file_id, entry in back.items():
                files.setdefault(file_id, entry)
            if not _in_order(files):
                self._files = collections.OrderedDict(
                    sorted(files.items(), key=lambda pair: pair[1][0])
                )
            self._stored = sum(size for _, size in self._files.values())

    def _expire(self) -> None:
        """Drop expired uploads from the total, and delete them: O(expired)."""
        deadline = self.clock() - self.ttl
        expired = []
        with self._lock:
            while self._files:
                file_id, (created_at, size) = next(iter(self._files.items()))
                if created_at > deadline:
                    break
                self._files.popitem(last=False)
                self._stored -= size
                expired.append(file_id)
        for file_id in expired:
            self._unlink(file_id)

    def _reserve(self, nbytes: int) -> None:
        """Count ``nbytes`` about to be written, or raise :class:`StorageFull`."""
        with self._lock:
            if self.max_total_bytes is not None and (
                self._stored + self._reserved + nbytes > self.max_total_bytes
            ):
                raise self._total_full()
            self._reserved += nbytes

    def _release(self, nbytes: int) -> None:
        """Stop counting ``nbytes`` of an upload that was dropped."""
        with self._lock:
            self._reserved -= nbytes

    def _settle(self, stored: StoredFile) -> None:
        """Count a committed upload as stored instead of being received."""
        with self._lock:
            self._reserved -= stored.size
            self._files[stored.id] = (stored.created_at, stored.size)
            self._stored += stored.size

    def _check_disk(self, nbytes: int) -> None:
        """Raise :class:`StorageFull` unless ``min_free_bytes`` stay free after ``nbytes``."""
        if not self.min_free_bytes:
            return
        free = self.storage.free_bytes()
        if free is not None and free - nbytes < self.min_free_bytes:
            raise self._disk_full()

    def _total_full(self) -> StorageFull:
        return StorageFull(
            "total",
            f"the upload storage is full (at most {self.max_total_bytes:,} bytes); "
            "try again once earlier uploads have expired",
        )

    def _disk_full(self) -> StorageFull:
        return StorageFull("disk", "the disk that holds uploads is (nearly) full")


@attrs.define(eq=False)
class _Client:
    """One client's use of an :class:`UploadQuota`."""

    slots: collections.deque[list[int]] = attrs.Factory(collections.deque)  # [slot, bytes]
    pending: int = 0  # bytes of uploads being received


@attrs.define(eq=False, init=False)
class UploadQuota:
    """How many bytes each client may upload per window of time: in memory, per process.

    A sliding window of ``window`` seconds, counted in 60 slots: bytes a client stored
    count against it until their slot is a whole window old, that is for between 59/60 of
    the window and the whole window. Bytes still being received count too, so parallel
    requests cannot get round the cap; the bytes of an upload that was dropped are given
    back. A client is forgotten once nothing of it counts any more, so memory grows with
    the clients of one window only. Each process keeps its own counts: with N processes a
    client may upload up to N times ``max_bytes`` per window (put a shared limiter in
    front, or divide the quota, when that matters).

    Args:
        max_bytes: The bytes one client may upload per window.
        window: The window, in seconds.
        clock: Where times come from, in seconds (:func:`time.monotonic`).

    Raises:
        ValidationError: A bad option.
    """

    max_bytes: int
    window: float
    clock: Callable[[], float]
    _lock: threading.Lock
    _clients: collections.OrderedDict[str, _Client]  # least recently used first

    def __init__(
        self, max_bytes: int, window: float = 3600.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        _check_bytes("the upload quota", max_bytes, minimum=1)
        if (
            isinstance(window, bool)
            or not isinstance(window, (int, float))
            or not 0 < window < float("inf")
        ):
            raise ValidationError(
                f"the upload window must be a positive number of seconds, not {window!r}"
            )
        if not callable(clock):
            raise ValidationError("clock must be a callable returning seconds")
        self.__attrs_init__(
            max_bytes, float(window), clock, threading.Lock(), collections.OrderedDict()
        )

    def used(self, key: str) -> int:
        """The bytes counting against ``key`` now (stored in the window, or arriving)."""
        with self._lock:
            client = self._client(key, self._slot())
            return client.pending + sum(size for _, size in client.slots)

    def check(self, key: str) -> None:
        """Raise :class:`QuotaExceeded` when ``key`` has no room left for a single byte."""
        with self._lock:
            slot = self._slot()
            self._shortfall(key, self._client(key, slot), 1, slot)

    def reserve(self, key: str, nbytes: int) -> None:
        """Count ``nbytes`` that ``key`` is about to upload, or raise :class:`QuotaExceeded`.

        Give them back with :meth:`release` once the upload is kept or dropped.
        """
        with self._lock:
            slot = self._slot()
            client = self._client(key, slot)
            self._shortfall(key, client, nbytes, slot)
            client.pending += nbytes

    def release(self, key: str, nbytes: int, *, kept: bool) -> None:
        """End ``nbytes`` of :meth:`reserve`: counted in the window when ``kept``, else not."""
        with self._lock:
            slot = self._slot()
            client = self._client(key, slot)
            client.pending = max(client.pending - nbytes, 0)
            if kept and nbytes:
                if client.slots and client.slots[-1][0] == slot:
                    client.slots[-1][1] += nbytes
                else:
                    client.slots.append([slot, nbytes])

    def _width(self) -> float:
        return self.window / _QUOTA_SLOTS

    def _slot(self) -> int:
        return math.floor(self.clock() / self._width())

    def _client(self, key: str, slot: int) -> _Client:
        """The client's counts with what left the window dropped; forgets idle clients.

        Called with the lock held.
        """
        oldest = slot - _QUOTA_SLOTS + 1
        while self._clients:  # the least recently used first: O(1) amortized
            first_key, first = next(iter(self._clients.items()))
            while first.slots and first.slots[0][0] < oldest:
                first.slots.popleft()
            if first.slots or first.pending:
                break
            del self._clients[first_key]
        client = self._clients.pop(key, None) or _Client()
        self._clients[key] = client  # now the most recently used
        while client.slots and client.slots[0][0] < oldest:
            client.slots.popleft()
        return client

    def _shortfall(self, key: str, client: _Client, nbytes: int, slot: int) -> None:
        """Raise :class:`QuotaExceeded` when ``nbytes`` more do not fit now.

        Its ``retry_after`` is the wait until they would (the whole window if never).
        """
        over = client.pending + sum(size for _, size in client.slots) + nbytes - self.max_bytes
        if over <= 0:
            return
        wait = self.window
        if client.pending + nbytes <= self.max_bytes:
            for start, size in client.slots:
                over -= size
                if over <= 0:
                    wait = (start + _QUOTA_SLOTS) * self._width() - self.clock()
                    break
        raise QuotaExceeded(key, self.max_bytes, self.window, max(math.ceil(wait), 1))
