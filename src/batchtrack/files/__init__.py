"""Where files live: the :class:`~batchtrack.files.base.FileStorage` boundary and its storages.

- :class:`~batchtrack.files.local.LocalFiles`: a folder on this machine (the default).
- :class:`~batchtrack.files.s3.S3Files`: S3-compatible object storage, shared by every
  machine (``pip install 'batchtrack[s3]'``).

:func:`from_url` opens either from a URL: ``file:///path`` or ``s3://bucket/prefix``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from ..exceptions import ValidationError
from .base import FileInfo, FileStorage, FileWriter, check_key
from .local import LocalFiles
from .results import ResultFiles

__all__ = [
    "FileInfo",
    "FileStorage",
    "FileWriter",
    "LocalFiles",
    "ResultFiles",
    "check_key",
    "from_url",
    "open_location",
]

_FORMS = "file:///absolute/path or s3://bucket[/prefix]"


def from_url(url: str | os.PathLike[str]) -> FileStorage:
    """The file storage a URL names: ``file:///srv/data`` or ``s3://bucket/prefix``.

    A plain path (``/srv/data``, a :class:`~pathlib.Path`) is a folder too. For S3 the
    endpoint, region and credentials come from the standard variables
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_REGION``); the bucket must exist and is checked at once.

    Raises:
        ValidationError: A URL of another form.
        FileStorageError: The storage cannot be reached or used (no such bucket, refused
            credentials, an endpoint that does not answer).
    """
    if isinstance(url, os.PathLike):
        return LocalFiles(url)
    if not isinstance(url, str) or not url:
        raise ValidationError(f"a file storage URL must be {_FORMS}, not {url!r}")
    if "://" not in url:
        return LocalFiles(Path(url))
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValidationError(f"{url!r}: a file URL must be {_FORMS.split(' or ')[0]}")
        return LocalFiles(unquote(parts.path))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValidationError(f"{url!r}: an S3 URL must name a bucket: s3://bucket/prefix")
        from .s3 import S3Files

        return S3Files(parts.netloc, unquote(parts.path).strip("/"))
    raise ValidationError(f"unknown file storage {url!r}: use {_FORMS}")


_buckets: dict[str, FileStorage] = {}
_buckets_lock = threading.Lock()


def open_location(location: str) -> BinaryIO:
    """Open a file by its location (a path, a ``file://`` or an ``s3://bucket/key`` URL).

    What a worker does with an :attr:`Item.source <batchtrack.Item.source>` that names
    an upload in object storage. One storage per bucket is made on first use and kept.

    Raises:
        FileNotFoundError: There is no such file.
        ValidationError: Not a location of a known form.
        FileStorageError: The storage cannot be reached.
    """
    if not isinstance(location, str) or not location:
        raise ValidationError(f"not a file location: {location!r}")
    parts = urlsplit(location)
    if parts.scheme == "s3":
        with _buckets_lock:
            storage = _buckets.get(parts.netloc)
            if storage is None:
                storage = _buckets[parts.netloc] = from_url(f"s3://{parts.netloc}")
        return storage.open(unquote(parts.path).lstrip("/"))
    if parts.scheme == "file":
        return open(unquote(parts.path), "rb")
    if "://" in location:
        raise ValidationError(f"not a file location: {location!r}")
    return open(location, "rb")
