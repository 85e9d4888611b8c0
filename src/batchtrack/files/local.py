"""Files in a folder on this machine's disk: the default storage."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from ..exceptions import FileStorageError, ValidationError
from .base import FileInfo, FileStorage, FileWriter, check_key

__all__ = ["LocalFiles"]

_PART_PREFIX = ".batchtrack-"
_PART_SUFFIX = ".part"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # at import, before any thread of ours writes a file
    os.umask(mask)
    return mask


_UMASK = _umask()


class _LocalWriter(FileWriter):
    """A temporary file beside the target, renamed onto it on commit (atomic)."""

    def __init__(self, target: Path, mode: int) -> None:
        self._target = target
        self._mode = mode
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, self._tmp = tempfile.mkstemp(
                dir=target.parent, prefix=_PART_PREFIX, suffix=_PART_SUFFIX
            )
        except OSError as exc:
            raise _failed(exc, f"cannot write {target}") from exc
        self._file: BinaryIO | None = os.fdopen(fd, "wb")
        self._size = 0

    def write(self, data: bytes) -> int:
        if self._file is None:
            raise ValueError("write to a writer that was committed or aborted")
        try:
            self._file.write(data)
        except OSError as exc:
            self.abort()
            raise _failed(exc, f"cannot write {self._target}") from exc
        self._size += len(data)
        return len(data)

    def tell(self) -> int:
        return self._size

    def commit(self) -> int:
        if self._file is None:
            raise ValueError("commit of a writer that was committed or aborted")
        try:
            self._file.close()
            self._file = None
            # mkstemp makes the file 0600; results and uploads are read by other users
            # of the folder (a web server, a backup) as any file written there would be.
            os.chmod(self._tmp, self._mode)
            os.replace(self._tmp, self._target)
        except OSError as exc:
            self.abort()
            raise _failed(exc, f"cannot write {self._target}") from exc
        return self._size

    def abort(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)


class LocalFiles(FileStorage):
    """Files under one folder (created when missing), shared by the processes of a machine.

    A key is a path below the folder; writes go to a dotted temporary file beside the
    target and are renamed onto it, so a reader sees the whole file or none, and
    :meth:`sweep_partial` deletes what a killed process left. A file's location is its
    absolute path.

    Args:
        root: The folder.

    Raises:
        ValidationError: ``root`` is a file, or cannot be created.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        path = Path(root).absolute()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ValidationError(f"{str(path)!r} is not a folder") from None
        except OSError as exc:
            raise ValidationError(f"cannot use {str(path)!r}: {exc.strerror or exc}") from None
        self.root = path
        self.url = path.as_uri()
        self._mode = 0o666 & ~_UMASK

    def __repr__(self) -> str:
        return f"LocalFiles({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def writer(self, key: str) -> FileWriter:
        return _LocalWriter(self._path(key), self._mode)

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(errno.ENOENT, "no such file", key) from None
        except OSError as exc:
            raise _failed(exc, f"cannot read {path}") from exc

    def size(self, key: str) -> int | None:
        try:
            stat = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise _failed(exc, f"cannot read {key}") from exc
        return stat.st_size if not os.path.isdir(self._path(key)) else None

    def delete(self, key: str) -> bool:
        try:
            self._path(key).unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return False
        except OSError as exc:
            raise _failed(exc, f"cannot delete {key}") from exc
        return True

    def list(self, prefix: str = "") -> Iterator[FileInfo]:
        if not isinstance(prefix, str):
            raise ValidationError(f"a prefix must be a string, not {prefix!r}")
        # Walk only the folder the prefix names (all of it for "a/b" or "a/b/..."): a
        # listing of "results/<id>." reads one folder, not the whole tree.
        folder, _, _ = prefix.rpartition("/")
        start = self.root / folder if folder else self.root
        if folder and (".." in folder.split("/") or folder.startswith("/")):
            raise ValidationError(f"{prefix!r} is not a usable prefix")
        # One folder at a time through os.scandir: a folder of 100,000 uploads is never
        # a list of 100,000 names in memory (os.walk builds one per folder).
        for entry in _files_under(start, hidden=False):
            if entry.name.startswith("."):
                continue  # writes in progress, and files not ours
            key = Path(entry.path).relative_to(self.root).as_posix()
            if not key.startswith(prefix):
                continue
            with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                stat = entry.stat()
                yield FileInfo(key, stat.st_size, stat.st_mtime)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def location(self, key: str) -> str:
        """The file's absolute path: what any process of this machine (or of a machine
        that mounts the same folder at the same place) opens."""
        return str(self._path(key))

    def key_of(self, location: str) -> str | None:
        """The key of an absolute path (or ``file://`` URL) below the folder, else None."""
        if not isinstance(location, str):
            return None
        if location.startswith("file://"):
            location = unquote(urlsplit(location).path)
        path = Path(location)
        if not path.is_absolute():
            return None
        try:
            key = path.relative_to(self.root).as_posix()
            return check_key(key)
        except (ValueError, ValidationError):
            return None

    def free_bytes(self) -> int | None:
        return shutil.disk_usage(self.root).free

    def sweep_partial(self, prefix: str, older_than: float) -> int:
        folder = self.root / prefix.rstrip("/") if prefix else self.root
        cutoff = time.time() - older_than
        removed = 0
        for entry in _files_under(folder, hidden=True):
            name = entry.name
            if not (name.startswith(_PART_PREFIX) and name.endswith(_PART_SUFFIX)):
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        return removed


def _files_under(start: Path, *, hidden: bool) -> Iterator[os.DirEntry[str]]:
    """The files below ``start`` (any depth), streamed folder by folder with os.scandir.

    Only the paths of folders still to visit are held, never a folder's listing; folders
    that are symbolic links are not entered (as os.walk and rglob), dotted ones only when
    ``hidden``. A folder that vanishes or cannot be read is skipped (as os.walk does).
    """
    pending = [str(start)]
    while pending:
        folder = pending.pop()
        try:
            entries = os.scandir(folder)
        except OSError:
            continue
        with entries:
            while True:
                try:
                    entry = next(entries)
                except StopIteration:
                    break
                except OSError:
                    break
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                if not is_dir:
                    yield entry
                elif (hidden or not entry.name.startswith(".")) and not entry.is_symlink():
                    pending.append(entry.path)


def _failed(exc: OSError, what: str) -> FileStorageError:
    full = exc.errno in _NO_SPACE
    reason = "the disk is full" if full else (exc.strerror or str(exc))
    return FileStorageError(f"{what}: {reason}", full=full)
