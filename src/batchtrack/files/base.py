"""The file boundary: what batchtrack needs of a place for files, and the values that cross it.

Uploads, results and the archives built from them are files; where they live is a
:class:`FileStorage`. batchtrack asks little of one: write a stream so that readers see
the whole file or nothing, open a file for reading, tell its size, delete one file or
every file under a prefix, and list what is there with sizes and times. Keys are
``/``-separated relative names (``uploads/<uuid>``, ``results/<item id>.jpg``); every
storage also turns a key into a *location* that any machine with access to the same
storage can open (:meth:`FileStorage.location`: a URL, or for a folder an absolute path),
which is what :attr:`Item.source <batchtrack.Item.source>` holds when a batch's input
lives in one.

Two storages come with batchtrack: :class:`~batchtrack.files.local.LocalFiles` (a
folder: today's behaviour and the default) and :class:`~batchtrack.files.s3.S3Files`
(S3-compatible object storage, extra ``s3``). To write another, subclass
:class:`FileStorage` and run ``tests/test_files.py``'s suite against it.
"""

from __future__ import annotations

import builtins
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import attrs
from typing_extensions import Self

from .._closing import Closing
from ..exceptions import ValidationError

__all__ = ["FileInfo", "FileStorage", "FileWriter", "check_key"]

_KEY = re.compile(r"\A(?!/)(?:[A-Za-z0-9._=+@,-]+/)*[A-Za-z0-9_=+@,-][A-Za-z0-9._=+@,-]*\Z")


def check_key(key: object) -> str:
    """``key`` if it is a usable key: relative, ``/``-separated, no ``..``, no empty parts.

    A part may not start with a dot (``.`` and ``..`` included): dotted names are the
    storages' own (temporary files of writes in progress).

    Raises:
        ValidationError: Anything else.
    """
    if not isinstance(key, str) or len(key) > 1024 or not _KEY.match(key):
        raise ValidationError(f"{key!r} is not a usable file key")
    if any(part.startswith(".") for part in key.split("/")):
        raise ValidationError(f"{key!r} is not a usable file key")
    return key


@attrs.frozen
class FileInfo:
    """A stored file as a listing shows it.

    Attributes:
        key: Its key in the storage.
        size: Its size in bytes.
        modified: When it was last written (seconds since the epoch, the storage's time).
    """

    key: str
    size: int
    modified: float


class FileWriter(ABC):
    """Receives one file chunk by chunk; nothing is visible until :meth:`commit`.

    Made by :meth:`FileStorage.writer`. As a context manager it commits when the block
    ends normally and aborts when it raises. A file object to Pillow and the like: it has
    ``write``, ``flush`` and ``tell``.
    """

    @abstractmethod
    def write(self, data: bytes) -> int:
        """Append ``data``; return its length.

        Raises:
            FileStorageError: The storage failed; the write is aborted.
        """

    @abstractmethod
    def commit(self) -> int:
        """Make the file visible under its key, whole, replacing any file there; its size.

        Raises:
            FileStorageError: The storage failed; nothing is visible and the write is
                aborted.
        """

    @abstractmethod
    def abort(self) -> None:
        """Drop what was written; safe to call more than once and after :meth:`commit`."""

    @abstractmethod
    def tell(self) -> int:
        """The bytes written so far."""

    def flush(self) -> None:  # noqa: B027 - deliberately nothing, not abstract
        """Nothing to do: a file is only visible once committed."""

    def writable(self) -> bool:
        return True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


class FileStorage(Closing, ABC):
    """A place for files, shared by every process (and, for object storage, every machine)
    that opens the same one.

    Every method is thread-safe. Keys are checked with :func:`check_key`: a bad key raises
    :class:`~batchtrack.ValidationError` and touches nothing. A storage that cannot be
    reached (a server down, a missing bucket, refused credentials) raises
    :class:`~batchtrack.FileStorageError`; the HTTP API answers it with 503.
    """

    #: Where the storage is, as a URL (``file:///srv/data``, ``s3://bucket/prefix``):
    #: :func:`batchtrack.files.from_url` of it opens the same storage.
    url: str

    @abstractmethod
    def writer(self, key: str) -> FileWriter:
        """Start writing the file ``key``; readers see it only when the writer commits.

        Raises:
            FileStorageError: The storage failed.
        """

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """The file ``key`` for reading (a binary file object; close it when done).

        Raises:
            FileNotFoundError: No file has this key.
            FileStorageError: The storage failed.
        """

    @abstractmethod
    def size(self, key: str) -> int | None:
        """The size of the file ``key`` in bytes, or None when there is none.

        Raises:
            FileStorageError: The storage failed.
        """

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Delete the file ``key``; True when there was one.

        Raises:
            FileStorageError: The storage failed.
        """

    def delete_many(self, keys: builtins.list[str]) -> int:
        """Delete every file named in ``keys`` (missing ones are skipped); how many went.

        Object stores do this in one request per thousand keys.

        Raises:
            ValidationError: A bad key; then nothing is deleted.
            FileStorageError: The storage failed.
        """
        checked = [check_key(key) for key in keys]  # every key, before any file goes
        return sum(self.delete(key) for key in checked)

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[FileInfo]:
        """Every file whose key starts with ``prefix`` (any depth), in no set order.

        ``prefix`` is a plain string prefix (``"results/abc"`` lists ``results/abc.jpg``
        and ``results/abcd/x``); files of writes in progress are never listed.

        Raises:
            FileStorageError: The storage failed.
        """

    def delete_prefix(self, prefix: str) -> int:
        """Delete every file whose key starts with ``prefix``; return how many went.

        An empty prefix is refused: it would delete everything.

        Raises:
            ValidationError: An empty prefix.
            FileStorageError: The storage failed.
        """
        if not isinstance(prefix, str) or not prefix:
            raise ValidationError("delete_prefix needs a non-empty prefix")
        return self.delete_many([info.key for info in self.list(prefix)])

    def older_than(self, prefix: str, before: float) -> builtins.list[FileInfo]:
        """The files under ``prefix`` last written before ``before`` (the storage's time)."""
        return [info for info in self.list(prefix) if info.modified < before]

    def read_bytes(self, key: str) -> bytes:
        """The whole file ``key`` (for small files: results, sidecars).

        Raises:
            FileNotFoundError: No file has this key.
            FileStorageError: The storage failed.
        """
        with self.open(key) as file:
            return file.read()

    def write_bytes(self, key: str, data: bytes) -> int:
        """Store ``data`` as the file ``key``, atomically; return its size."""
        with self.writer(key) as out:
            out.write(data)
        return len(data)

    def location(self, key: str) -> str:
        """Where the file ``key`` is, for any machine with access to this storage: a URL
        (``s3://bucket/prefix/key``), or for a folder its absolute path. :meth:`key_of` of
        the same storage gives ``key`` back."""
        return f"{self.url.rstrip('/')}/{check_key(key)}"

    def key_of(self, location: str) -> str | None:
        """The key of a :meth:`location` of this storage, or None when it lies elsewhere."""
        base = self.url.rstrip("/") + "/"
        if isinstance(location, str) and location.startswith(base):
            try:
                return check_key(location[len(base) :])
            except ValidationError:
                return None
        return None

    def local_path(self, key: str) -> Path | None:
        """Where the file ``key`` is on this machine's disk, or None (object storage)."""
        return None

    def free_bytes(self) -> int | None:
        """The free space left where files are written, or None when it cannot run out."""
        return None

    def sweep_partial(self, prefix: str, older_than: float) -> int:
        """Delete leftovers of writes that never finished (a process killed mid-write)
        under ``prefix`` once ``older_than`` seconds old; return how many went.

        Storages whose unfinished writes leave nothing visible return 0.
        """
        return 0
