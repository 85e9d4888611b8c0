"""One signed S3 request in plain Python: how :class:`~batchtrack.files.s3.S3Files` checks
its bucket without starting obstore.

obstore runs its requests on a Tokio runtime whose threads start with its first request
and do not survive ``fork()``: a process that made one request and then forked (Celery's
prefork pool, ``gunicorn --preload``) leaves children whose every request hangs. The
check at construction happens in exactly such parents, so it is made here, with the
standard library: an AWS Signature Version 4 ``GET`` of one key of the bucket's listing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import datetime, timezone
from email.message import Message
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

__all__ = ["Answer", "get", "signed_headers"]

_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_UNRESERVED = "-_.~"


class Answer:
    """The status, headers and body of an answer, whatever its status."""

    def __init__(self, status: int, headers: Message, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def signed_headers(
    url: str,
    *,
    region: str,
    access_key: str,
    secret_key: str,
    token: str | None = None,
    now: datetime | None = None,
) -> dict[str, str]:
    """The headers that sign a ``GET`` of ``url`` for S3 (Signature Version 4), ``Host``
    included; unsigned (no ``Authorization``) when ``access_key`` is empty."""
    parts = urlsplit(url)
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    headers = {"host": parts.netloc, "x-amz-content-sha256": _EMPTY_SHA256, "x-amz-date": stamp}
    if token:
        headers["x-amz-security-token"] = token
    if access_key:
        query = sorted(parse_qsl(parts.query, keep_blank_values=True))
        canonical_query = "&".join(
            f"{quote(k, safe=_UNRESERVED)}={quote(v, safe=_UNRESERVED)}" for k, v in query
        )
        names = sorted(headers)
        canonical = "\n".join(
            [
                "GET",
                quote(unquote(parts.path) or "/", safe="/" + _UNRESERVED),
                canonical_query,
                "".join(f"{name}:{headers[name].strip()}\n" for name in names),
                ";".join(names),
                _EMPTY_SHA256,
            ]
        )
        scope = f"{stamp[:8]}/{region}/s3/aws4_request"
        text = "\n".join(
            ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        key = f"AWS4{secret_key}".encode()
        for part in (stamp[:8], region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, text.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}"
        )
    return headers


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """S3 answers a wrong region with a redirect that is an error to report, not follow."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _opener(url: str, client_options: Mapping[str, Any]) -> urllib.request.OpenerDirector:
    handlers: list[urllib.request.BaseHandler] = [_NoRedirects()]
    if urlsplit(url).scheme == "https":
        context = ssl.create_default_context()
        bundle = os.environ.get("AWS_CA_BUNDLE")
        if bundle:
            context.load_verify_locations(cafile=bundle)
        root = client_options.get("root_certificate")
        if root:
            context.load_verify_locations(cadata=root if isinstance(root, str) else root.decode())
        if client_options.get("allow_invalid_certificates"):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        handlers.append(urllib.request.HTTPSHandler(context=context))
    proxy = client_options.get("proxy_url")
    if proxy:
        handlers.append(urllib.request.ProxyHandler({"http": proxy, "https": proxy}))
    return urllib.request.build_opener(*handlers)


def get(
    url: str,
    headers: Mapping[str, str],
    *,
    client_options: Mapping[str, Any],
    timeout: float,
    retry_for: float,
) -> Answer:
    """``GET url`` with ``headers``; any status is an :class:`Answer`.

    A refused or reset connection, or a 5xx answer, is tried again (after 0.1, 0.2, 0.4 s,
    ...) until ``retry_for`` seconds have passed; a request that gets no answer in
    ``timeout`` seconds is not.

    Raises:
        OSError: No answer: the connection failed (``urllib.error.URLError``, whose
            ``reason`` says why) or timed out (``TimeoutError``).
    """
    opener = _opener(url, client_options)
    request = urllib.request.Request(
        url, headers={name.title(): value for name, value in headers.items()}
    )
    started = time.monotonic()
    pause = 0.1
    while True:
        try:
            with opener.open(request, timeout=timeout) as response:
                answer = Answer(response.status, response.headers, response.read())
        except urllib.error.HTTPError as exc:
            answer = Answer(exc.code, exc.headers, exc.read())
        except (urllib.error.URLError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            retryable = isinstance(reason, (ConnectionRefusedError, ConnectionResetError))
            if not retryable or time.monotonic() - started + pause > retry_for:
                raise
            time.sleep(pause)
            pause *= 2
            continue
        if answer.status < 500 or time.monotonic() - started + pause > retry_for:
            return answer
        time.sleep(pause)
        pause *= 2
