"""Files in S3-compatible object storage (AWS S3, MinIO, SeaweedFS, Ceph, R2, ...).

Needs obstore: ``pip install 'batchtrack[s3]'``.

Every machine that opens the same bucket and prefix sees the same files, so several
``batchtrack serve`` processes on several machines can share uploads and results.
Requests go through `obstore <https://developmentseed.org/obstore/>`_ (the Rust
``object_store`` crate): one connection pool per storage, the GIL released during every
request, retries with back-off built in.

- Writes stream: a :meth:`S3Files.writer` buffers up to ``part_size`` bytes; a file that
  stays smaller is stored by one ``PUT`` on commit, a larger one becomes a multipart upload
  whose parts go out while the file is written and which the commit completes. Either way
  the object appears whole, or not at all, when the writer commits; an abort (or a
  failure) aborts the multipart upload.
- Reads stream: :meth:`S3Files.open` issues one ``GET`` and hands its body out as it
  arrives; a seek the buffer cannot serve (Pillow seeks back to the start, TIFF jumps
  around) continues with a ranged ``GET`` of the same version of the object.
- Outages: each request is retried with exponential back-off for up to
  ``retry_timeout`` seconds (10 by default); then the call raises
  :class:`~batchtrack.FileStorageError`. Puts are atomic and idempotent, so a retried
  write never leaves a half-written or doubled object.
- Forks: obstore's threads start with its first request and do not survive ``fork()``.
  Creating a storage makes no obstore request (the bucket check is plain Python), so a
  process may create it and then fork its workers; a process forked after obstore ran
  gets a :class:`~batchtrack.FileStorageError` saying so, not a hang.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import re
import socket
import ssl
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING, Any, BinaryIO, cast

try:
    import obstore
    from obstore.store import S3Store
except ImportError as exc:  # pragma: no cover - depends on the environment
    from .._extras import missing

    raise ImportError(missing("batchtrack.files.s3", "obstore", "s3")) from exc

from ..exceptions import BatchtrackError, FileStorageError, ValidationError
from . import _sigv4
from .base import FileInfo, FileStorage, FileWriter, check_key

if TYPE_CHECKING:
    from obstore import BytesStream, GetOptions, GetResult, WritableFile
    from obstore.store import ClientConfig, RetryConfig

__all__ = ["S3Files"]

_MiB = 2**20
#: The smallest part S3 accepts in a multipart upload (but the last).
_MIN_PART = 5 * _MiB
#: How much of a download is handed over at once: one chunk of the GET body (fewer,
#: bigger chunks cost less; this is also about what a reader holds in memory).
_READ_CHUNK = _MiB
#: Forward seeks up to this far read on through the open body instead of a new request.
_SKIP = 256 * 1024
#: How many times a read resumes (a ranged GET where it broke off) without progress.
_RESUMES = 3
#: Keys removed per bulk delete request (the S3 limit).
_DELETE_BATCH = 1000
#: Bucket names as S3 allows them (dots and dashes inside, 3 to 63 characters).
_BUCKET = re.compile(r"\A[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")

_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([^<]+)</Code>")
_OS_MESSAGE = re.compile(r'message: "([^"]+)"')
_METADATA = re.compile(r"169\.254\.1(?:69\.254|70\.2)")
_DENIED = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "AllAccessDisabled",
    }
)
_CREDENTIALS_HINT = "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
_WRONG_REGION = frozenset(
    {"PermanentRedirect", "AuthorizationHeaderMalformed", "IncorrectEndpoint"}
)

#: The process in which S3Files first made obstore work: its Tokio threads live there only.
_started_in: int | None = None


class S3Files(FileStorage):
    """Files in a bucket of S3-compatible object storage, under an optional prefix.

    The endpoint, region and credentials come from the arguments, else from the standard
    variables: ``AWS_ENDPOINT_URL`` (for anything but AWS itself, e.g.
    ``http://minio:9000``), ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``); without keys, obstore looks for
    the credentials of the machine's role. A plain ``http://`` endpoint is allowed because
    you named it (obstore would otherwise ask for ``AWS_ALLOW_HTTP``).

    The bucket is checked at once (one listing request, answered within about five
    seconds): a missing bucket, refused credentials, a wrong region or an endpoint that
    does not answer raise one :class:`~batchtrack.FileStorageError` line. The check is
    made in plain Python and starts none of obstore's threads, so the storage may be
    created before the process forks (Celery's prefork pool, ``gunicorn --preload``);
    only with credentials that obstore alone finds (a role) is it made through obstore,
    and the storage must then be created after the fork.

    A file's location is ``s3://bucket/prefix/key``; :attr:`url` is
    ``s3://bucket/prefix``. Unfinished writes leave nothing visible, so
    :meth:`sweep_partial` has nothing to do; the parts of a multipart upload that was
    never completed nor aborted (a process killed mid-write) stay invisible in the bucket
    until a lifecycle rule (``AbortIncompleteMultipartUpload``, e.g. after one day)
    removes them.

    Args:
        bucket: The bucket; it must exist.
        prefix: A folder inside the bucket that holds every key (``"batchtrack"``), or
            ``""`` for the whole bucket.
        endpoint: The S3 endpoint URL; default ``AWS_ENDPOINT_URL``, else AWS.
        region: The region; default ``AWS_REGION``, else ``us-east-1``.
        retry_timeout: How long, in seconds, one request is retried (with exponential
            back-off from 0.1 s to 2 s) before a call gives up with
            :class:`~batchtrack.FileStorageError`. A request that hangs can add up to the
            client's ``timeout`` (30 s) to that.
        part_size: Bytes a writer buffers before it turns to a multipart upload, and the
            size of each part: 5 MiB (S3's minimum) unless you say more. A writer holds
            at most three parts in memory (one filling, two on their way), so a server
            taking many uploads at once needs about that much per upload.
        client_options: obstore HTTP client options (``ClientConfig``: ``timeout``,
            ``connect_timeout``, ``proxy_url``, ``allow_invalid_certificates``, ...).
        **options: obstore S3 settings (``S3Config``: ``access_key_id``,
            ``secret_access_key``, ``session_token``, ``virtual_hosted_style_request``,
            ``checksum_algorithm``, ...).

    Raises:
        ValidationError: A bucket name S3 would refuse, a bad prefix or option.
        FileStorageError: The bucket cannot be used (no such bucket, refused
            credentials, an endpoint that does not answer).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        retry_timeout: float = 10.0,
        part_size: int = _MIN_PART,
        client_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(bucket, str) or not _BUCKET.match(bucket):
            raise ValidationError(f"{bucket!r} is not an S3 bucket name")
        if not isinstance(prefix, str):
            raise ValidationError(f"an S3 prefix must be a string, not {prefix!r}")
        prefix = prefix.strip("/")
        if prefix:
            try:
                check_key(prefix)
            except ValidationError:
                raise ValidationError(f"{prefix!r} is not a usable S3 prefix") from None
        if not retry_timeout > 0:
            raise ValidationError(f"retry_timeout must be positive, not {retry_timeout!r}")
        if not isinstance(part_size, int) or part_size < _MIN_PART:
            raise ValidationError(f"part_size must be at least {_MIN_PART} bytes (5 MiB)")
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.endpoint: str | None = (
            endpoint or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT")
        )
        self.retry_timeout = float(retry_timeout)
        self.part_size = part_size
        config: dict[str, Any] = dict(options)
        if self.endpoint:
            config["endpoint"] = self.endpoint
        if region:
            config["region"] = region
        client: dict[str, Any] = {"connect_timeout": "5s", **(client_options or {})}
        if self.endpoint and self.endpoint.lower().startswith("http://"):
            client.setdefault("allow_http", True)
        retry: RetryConfig = {
            "max_retries": 100,  # the time limit ends retries, not the count
            "retry_timeout": timedelta(seconds=self.retry_timeout),
            "backoff": {
                "init_backoff": timedelta(milliseconds=100),
                "max_backoff": timedelta(seconds=2),
                "base": 2,
            },
        }
        try:
            self._store = S3Store(
                bucket,
                prefix=prefix or None,
                client_options=_client(client),
                retry_config=retry,
                **config,
            )
        except Exception as exc:  # obstore's own config errors: unknown keys, bad values
            raise ValidationError(f"{self.url}: {_first_line(exc)}") from exc
        self._check(client, config)

    def __repr__(self) -> str:
        return f"S3Files({self.bucket!r}, {self.prefix!r})"

    # -- the boundary ----------------------------------------------------------------------

    def writer(self, key: str) -> FileWriter:
        return _S3Writer(self, check_key(key))

    def open(self, key: str) -> BinaryIO:
        """The file ``key`` for reading: its body streamed as it arrives, seekable.

        Reading on from where a seek landed costs one more (ranged) request unless the
        position is in the buffer or a little ahead; a file replaced while it is being
        read raises :class:`~batchtrack.FileStorageError` instead of mixing two versions.
        """
        check_key(key)
        return io.BufferedReader(_S3Reader(self, key), buffer_size=64 * 1024)

    def read_bytes(self, key: str) -> bytes:
        check_key(key)
        try:
            return bytes(obstore.get(self._use(), key).bytes())
        except Exception as exc:
            raise self._failure(exc, key, "read", missing=True) from exc

    def write_bytes(self, key: str, data: bytes) -> int:
        check_key(key)
        try:
            obstore.put(self._use(), key, data, chunk_size=self.part_size, max_concurrency=2)
        except Exception as exc:
            raise self._failure(exc, key, "write") from exc
        return len(data)

    def size(self, key: str) -> int | None:
        """The size of the file ``key``, or None when there is none (one ``HEAD``).

        ``HEAD`` answers carry no body, so a bucket deleted while in use looks like a
        missing file here; every other call reports it.
        """
        check_key(key)
        try:
            return int(obstore.head(self._use(), key)["size"])
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._failure(exc, key, "read") from exc

    def delete(self, key: str) -> bool:
        """Delete the file ``key``; True when there was one.

        S3 answers a delete the same whether or not the object was there, so this asks
        first (a ``HEAD``): two processes deleting the same file at once may both get True.
        """
        if self.size(key) is None:
            return False
        try:
            obstore.delete(self._use(), key)
        except Exception as exc:
            raise self._failure(exc, key, "delete") from exc
        return True

    def delete_many(self, keys: builtins.list[str]) -> int:
        """Delete every file named in ``keys``; how many were there.

        Which of them exist is asked with ``HEAD`` requests, eight at a time; those are then
        deleted in bulk, a thousand per request.

        Raises:
            ValidationError: A bad key (nothing is deleted then).
            FileStorageError: The storage failed.
        """
        checked = [check_key(key) for key in dict.fromkeys(keys)]
        if not checked:
            return 0
        if len(checked) == 1:
            return int(self.delete(checked[0]))
        with ThreadPoolExecutor(max_workers=min(8, len(checked))) as pool:
            sizes = list(pool.map(self.size, checked))
        present = [key for key, size in zip(checked, sizes, strict=True) if size is not None]
        self._delete_existing(present)
        return len(present)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every file whose key starts with ``prefix``: one listing, then bulk
        deletes of a thousand keys per request; return how many the listing found."""
        if not isinstance(prefix, str) or not prefix:
            raise ValidationError("delete_prefix needs a non-empty prefix")
        keys = [info.key for info in self.list(prefix)]
        self._delete_existing(keys)
        return len(keys)

    def list(self, prefix: str = "") -> Iterator[FileInfo]:
        """Every file whose key starts with ``prefix``, in key order, page by page.

        One request per thousand files, starting at ``prefix`` and stopping after the
        last key that starts with it (S3 lists in key order), so a prefix that names a few
        files in a big folder reads a page, not the folder.
        """
        if not isinstance(prefix, str):
            raise ValidationError(f"a prefix must be a string, not {prefix!r}")
        folder = prefix.rpartition("/")[0]
        if folder.startswith("/") or {".", ".."} & set(folder.split("/")):
            raise ValidationError(f"{prefix!r} is not a usable prefix")
        return self._list(prefix)

    def sweep_partial(self, prefix: str, older_than: float) -> int:
        """Nothing to sweep: an unfinished write leaves nothing visible; returns 0.

        The parts of a multipart upload that a killed process never completed nor aborted
        are invisible but kept (and billed) until removed; let the bucket do it with a
        lifecycle rule ``AbortIncompleteMultipartUpload`` (``DaysAfterInitiation: 1``).
        """
        return 0

    # -- plumbing --------------------------------------------------------------------------

    def _check(self, client: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        """List at most one key of the prefix, within about three seconds; raise the one
        FileStorageError line that says why the bucket cannot be used.

        Made in plain Python (:mod:`._sigv4`), so that creating a storage never starts
        obstore's threads: a process may create its storage and then fork its workers.
        Only credentials that obstore alone can find (an instance or task role) are
        checked through obstore.
        """
        credentials = _static_credentials(config)
        if credentials is None:
            self._check_through_obstore(client, config)
            return
        region = str(
            config.get("region")
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )
        url = self._bucket_url(region, _truthy(config.get("virtual_hosted_style_request")))
        query = "list-type=2&max-keys=1" + (f"&prefix={self.prefix}/" if self.prefix else "")
        url = f"{url}?{query}"
        access_key, secret_key, token = credentials
        headers = _sigv4.signed_headers(
            url, region=region, access_key=access_key, secret_key=secret_key, token=token
        )
        try:
            answer = _sigv4.get(url, headers, client_options=client, timeout=3.0, retry_for=2.0)
        except OSError as exc:
            raise FileStorageError(f"{self.url}: {self._unreachable(exc)}") from exc
        if answer.status == 200:
            return
        text = answer.body.decode("utf-8", "replace")
        code_match = _CODE.search(text)
        code = code_match.group(1) if code_match else None
        if code in _WRONG_REGION or answer.status in (301, 307):
            where = answer.headers.get("x-amz-bucket-region")
            named = f" ({where})" if where else ""
            reason = f"the bucket is in another region{named}: set AWS_REGION"
        else:
            reason = _http_reason(answer.status, code)[0]
        cause = FileStorageError(f"HTTP {answer.status} from {url}: {text[:500]}")
        raise FileStorageError(f"{self.url}: {reason}") from cause

    def _check_through_obstore(self, client: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        probe_retry: RetryConfig = {
            "max_retries": 3,
            "retry_timeout": timedelta(seconds=min(self.retry_timeout, 2.0)),
            "backoff": {"init_backoff": timedelta(milliseconds=100)},
        }
        probe_client = {**client, "connect_timeout": "2s", "timeout": "3s"}
        probe = S3Store(
            self.bucket,
            prefix=self.prefix or None,
            client_options=_client(probe_client),
            retry_config=probe_retry,
            **config,
        )
        self._use()
        try:
            for _ in obstore.list(probe, chunk_size=1):
                break
        except Exception as exc:
            raise self._failure(exc, None, "use") from exc

    def _bucket_url(self, region: str, virtual_hosted: bool) -> str:
        """The bucket's URL as obstore builds it: path style unless asked otherwise (then
        an endpoint given already names the bucket)."""
        if self.endpoint:
            base = self.endpoint.rstrip("/")
            return base if virtual_hosted else f"{base}/{self.bucket}"
        if virtual_hosted:
            return f"https://{self.bucket}.s3.{region}.amazonaws.com"
        return f"https://s3.{region}.amazonaws.com/{self.bucket}"

    def _unreachable(self, exc: OSError) -> str:
        reason: object = getattr(exc, "reason", exc)
        where = self.endpoint or "the S3 endpoint"
        if isinstance(reason, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(reason, TimeoutError):
            why = "no answer in time"
        elif isinstance(reason, socket.gaierror):
            why = "unknown host"
        elif isinstance(reason, ssl.SSLError):
            why = f"TLS: {reason.reason or reason}"
        elif isinstance(reason, ConnectionResetError):
            why = "connection reset"
        else:
            why = str(getattr(reason, "strerror", None) or reason)
        return f"cannot reach {where} ({why})"

    def _use(self) -> S3Store:
        """The obstore store, once it is sure obstore can work in this process."""
        global _started_in
        pid = os.getpid()
        if _started_in is None:
            _started_in = pid
        elif _started_in != pid:
            raise FileStorageError(
                f"{self.url}: obstore was started in process {_started_in}, which then forked "
                "this one; it cannot work here. Create the storage in the child, or start "
                "workers with spawn instead of fork"
            )
        return self._store

    def _list(self, prefix: str) -> Iterator[FileInfo]:
        folder, _, rest = prefix.rpartition("/")
        # S3 lists whole path segments; a partial last segment ("results/abc") is found by
        # listing its folder from just before it (start-after) and stopping past it.
        offset = None
        if rest:
            last = rest[-1]
            if last.isascii() and last.isprintable() and last > "!":
                offset = f"{prefix[:-1]}{chr(ord(last) - 1)}~"
        try:
            stream = obstore.list(
                self._use(), folder or None, offset=offset, chunk_size=_DELETE_BATCH
            )
            for chunk in stream:
                for meta in chunk:
                    key = meta["path"]
                    if not key.startswith(prefix):
                        if offset is not None and key > prefix:
                            return
                        continue
                    if not _usable(key):
                        continue  # a folder marker, or a key not written through batchtrack
                    yield FileInfo(key, int(meta["size"]), meta["last_modified"].timestamp())
        except Exception as exc:
            raise self._failure(exc, None, "list", detail=prefix or None) from exc

    def _delete_existing(self, keys: builtins.list[str]) -> None:
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            try:
                obstore.delete(self._use(), batch)
            except Exception as exc:
                raise self._failure(exc, batch[0], "delete") from exc

    def _get(self, key: str, offset: int, etag: str | None) -> GetResult:
        options: GetOptions = {}
        if offset:
            options["range"] = {"offset": offset}
        if etag is not None:
            options["if_match"] = etag
        try:
            return obstore.get(self._use(), key, options=options or None)
        except Exception as exc:
            raise self._failure(exc, key, "read", missing=True) from exc

    def _failure(
        self,
        exc: BaseException,
        key: str | None,
        action: str,
        *,
        missing: bool = False,
        detail: str | None = None,
    ) -> Exception:
        """The error to raise for an obstore failure: FileNotFoundError for a missing key
        (where ``missing`` says that is what a 404 means), else FileStorageError."""
        if isinstance(exc, BatchtrackError):
            return exc
        text = str(exc)
        if missing and isinstance(exc, FileNotFoundError) and "NoSuchBucket" not in text:
            return FileNotFoundError(errno.ENOENT, "no such file", key)
        reason, whole = self._reason(exc, text)
        if whole:
            return FileStorageError(f"{self.url}: {reason}")
        what = key if key is not None else detail
        target = f" {what}" if what else ""
        return FileStorageError(f"{self.url}: cannot {action}{target}: {reason}")

    def _reason(self, exc: BaseException, text: str) -> tuple[str, bool]:
        """What went wrong in a few words, and whether it concerns the whole storage."""
        status_match = _STATUS.search(text)
        status = int(status_match.group(1)) if status_match else None
        code_match = _CODE.search(text)
        code = code_match.group(1) if code_match else None
        where = self.endpoint or "the S3 endpoint"
        if _METADATA.search(text):
            return ("no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)", True)
        kind = type(exc).__name__
        if kind in ("PermissionDeniedError", "UnauthenticatedError"):
            status = status or 403
        elif kind == "PreconditionError":
            status = status or 412
        if status is not None or code is not None:
            return _http_reason(status, code)
        if "ConnectionRefused" in text or "Connection refused" in text:
            return f"cannot reach {where} (connection refused)", True
        if "kind: Timeout" in text or "TimedOut" in text or "timed out" in text:
            return f"cannot reach {where} (no answer in time)", True
        if "dns error" in text or "failed to lookup address" in text:
            return f"cannot reach {where} (unknown host)", True
        if "error sending request" in text or "kind: Connect" in text:
            os_message = _OS_MESSAGE.search(text)
            cause = os_message.group(1).lower() if os_message else "connection failed"
            return f"cannot reach {where} ({cause})", True
        if "connection closed" in text or "reset by peer" in text or "kind: Body" in text:
            return f"the connection to {where} broke off", False
        return _first_line(exc), False


class _S3Writer(FileWriter):
    """A file held in memory until it outgrows a part: then obstore's buffered writer, a
    multipart upload whose parts go out as the file comes in. A small file is one PUT on
    commit. The object appears only when the commit completes the upload."""

    def __init__(self, files: S3Files, key: str) -> None:
        self._files = files
        self._key = key
        self._buffer: bytearray | None = bytearray()
        self._file: WritableFile | None = None
        self._size = 0

    def write(self, data: bytes) -> int:
        file, buffer = self._file, self._buffer
        if file is None and buffer is None:
            raise ValueError("write to a writer that was committed or aborted")
        try:
            if file is not None:
                file.write(data)
            elif buffer is not None:
                buffer += data
                if len(buffer) > self._files.part_size:
                    # Past one part: from here on a multipart upload, parts sent as they fill.
                    self._file = obstore.open_writer(
                        self._files._use(),
                        self._key,
                        buffer_size=self._files.part_size,
                        max_concurrency=2,
                    )
                    self._buffer = None
                    self._file.write(buffer)
        except Exception as exc:
            self.abort()
            raise self._files._failure(exc, self._key, "write") from exc
        self._size += len(data)
        return len(data)

    def tell(self) -> int:
        return self._size

    def commit(self) -> int:
        buffered, self._buffer = self._buffer, None
        file, self._file = self._file, None
        if buffered is None and file is None:
            raise ValueError("commit of a writer that was committed or aborted")
        try:
            if file is not None:
                file.close()
            elif buffered is not None:
                obstore.put(self._files._use(), self._key, buffered, use_multipart=False)
        except Exception as exc:
            # A failed completion leaves the upload incomplete: invisible (see sweep_partial).
            raise self._files._failure(exc, self._key, "write") from exc
        return self._size

    def abort(self) -> None:
        self._buffer = None
        file, self._file = self._file, None
        if file is None:
            return
        # Leaving obstore's writer by an exception aborts its multipart upload; there is no
        # other way to ask for that. Best effort: if it fails, the parts stay invisible
        # all the same.
        with contextlib.suppress(Exception):
            file.__exit__(FileStorageError, None, None)


class _S3Reader(io.RawIOBase):
    """One object's body as a raw stream: a GET read as it arrives, re-requested from the
    position (a ranged GET of the same ETag) after a seek it cannot serve or a broken
    connection."""

    def __init__(self, files: S3Files, key: str) -> None:
        super().__init__()
        self._files = files
        self._key = key
        result = files._get(key, 0, None)
        meta = result.meta
        self._size = int(meta["size"])
        self._etag: str | None = meta.get("e_tag")
        # The answer to the first GET, its body not yet read: whole by readall, or streamed.
        self._pending: GetResult | None = result
        self._stream: BytesStream | None = None
        self._chunk = memoryview(b"")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if self.closed:
            raise ValueError("seek of a closed file")
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._pos + offset
        elif whence == io.SEEK_END:
            target = self._size + offset
        else:
            raise ValueError(f"invalid whence ({whence!r})")
        if target < 0:
            raise ValueError(f"negative seek position {target}")
        ahead = target - self._pos
        if 0 <= ahead <= len(self._chunk):
            self._chunk = self._chunk[ahead:]
        elif 0 < ahead <= _SKIP and (self._stream is not None or self._pending is not None):
            self._pos += len(self._chunk)
            self._chunk = memoryview(b"")
            while self._pos < target and self._next_chunk():
                step = min(len(self._chunk), target - self._pos)
                self._chunk = self._chunk[step:]
                self._pos += step
        else:
            self._pending = self._stream = None  # the next read asks for a range from here
            self._chunk = memoryview(b"")
        self._pos = target
        return target

    def readinto(self, buffer: Any) -> int:
        if self.closed:
            raise ValueError("read of a closed file")
        if self._pos >= self._size:
            return 0
        if not self._chunk and not self._next_chunk():
            return 0
        view = memoryview(buffer).cast("B")
        n = min(len(view), len(self._chunk))
        view[:n] = self._chunk[:n]
        self._chunk = self._chunk[n:]
        self._pos += n
        return n

    def readall(self) -> bytes:
        if self.closed:
            raise ValueError("read of a closed file")
        if self._pending is not None and self._pos == 0:
            # Nothing read yet: take the body whole, as obstore.get(...).bytes() does.
            result, self._pending = self._pending, None
            try:
                whole = bytes(result.bytes())
            except Exception:
                whole = b""  # broke off: read on below, from a fresh ranged GET
            if len(whole) == self._size:
                self._pos = self._size
                return whole
        parts = [self._chunk.tobytes()] if self._chunk else []
        self._pos += len(self._chunk)
        self._chunk = memoryview(b"")
        while self._pos < self._size and (data := self._fill()):
            parts.append(data)
            self._pos += len(data)
            self._chunk = memoryview(b"")
        return b"".join(parts)

    def close(self) -> None:
        self._pending = self._stream = None
        self._chunk = memoryview(b"")
        super().close()

    def _next_chunk(self) -> bool:
        """Fill ``_chunk`` with the bytes at ``_pos``; False at the end of the object."""
        return bool(self._fill())

    def _fill(self) -> bytes:
        """The next piece of the body, from ``_pos`` on, also put in ``_chunk``; empty at
        the end of the object."""
        failures = 0
        while True:
            if self._pos >= self._size:
                return b""
            if self._pending is not None:
                self._stream = self._pending.stream(min_chunk_size=_READ_CHUNK)
                self._pending = None
            elif self._stream is None:
                result = self._files._get(self._key, self._pos, self._etag)
                self._stream = result.stream(min_chunk_size=_READ_CHUNK)
            try:
                data = next(self._stream)
            except StopIteration:
                data = b""
            except Exception as exc:
                # A body that broke off (a timeout, a reset) resumes where it stopped; the
                # request that resumes it has the whole retry budget.
                failures += 1
                self._stream = None
                if failures > _RESUMES:
                    raise self._files._failure(exc, self._key, "read") from exc
                continue
            if data:
                self._chunk = memoryview(data)
                return data
            # An empty end before the size said: the body was cut short. Resume.
            failures += 1
            self._stream = None
            if failures > _RESUMES:
                raise FileStorageError(
                    f"{self._files.url}: cannot read {self._key}: the body ended early"
                )


def _http_reason(status: int | None, code: str | None) -> tuple[str, bool]:
    """What an S3 error answer means, and whether it concerns the whole storage."""
    if code == "NoSuchBucket":
        return "no such bucket", True
    if code in _DENIED or status in (401, 403):
        return f"access denied ({_CREDENTIALS_HINT})", True
    detail = " ".join(str(part) for part in (status, code) if part is not None)
    if status is not None and status >= 500:
        return f"the server failed (HTTP {detail})", False
    if status == 412 or code == "PreconditionFailed":
        return "it changed while it was being read", False
    return f"refused (HTTP {detail})", False


def _static_credentials(config: Mapping[str, Any]) -> tuple[str, str, str | None] | None:
    """The key, secret and session token obstore will sign with, when they are given (in
    ``config`` or the environment); empty ones for unsigned requests; None when only
    obstore can find them (a role)."""
    if _truthy(config.get("skip_signature", os.environ.get("AWS_SKIP_SIGNATURE"))):
        return "", "", None
    key = config.get("access_key_id") or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = config.get("secret_access_key") or os.environ.get("AWS_SECRET_ACCESS_KEY")
    token = (
        config.get("session_token") or config.get("token") or os.environ.get("AWS_SESSION_TOKEN")
    )
    if not (key and secret):
        return None
    return str(key), str(secret), str(token) if token else None


def _truthy(value: object) -> bool:
    return value is True or str(value).strip().lower() in ("1", "true", "yes", "on")


def _client(options: Mapping[str, Any]) -> ClientConfig:
    return cast("ClientConfig", dict(options))


def _usable(key: str) -> bool:
    try:
        check_key(key)
    except ValidationError:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."
