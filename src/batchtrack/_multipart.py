"""Streaming multipart/form-data parsing with python-multipart (the ``server`` extra)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs

try:
    from python_multipart.multipart import MultipartParser, parse_options_header
except ImportError as exc:  # pragma: no cover - depends on the environment
    from ._extras import missing

    raise ImportError(
        missing("batchtrack's upload endpoint", "python-multipart", "server")
    ) from exc

__all__ = ["read_uploads"]

_CHUNK = 1 << 16


class _Sink(Protocol):
    def write(self, data: bytes) -> None: ...


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


@attrs.define
class _Part:
    """The part being parsed: its headers so far and where its bytes go."""

    headers: dict[bytes, bytes] = attrs.Factory(dict)
    field: bytes = b""
    value: bytes = b""
    sink: _Sink | None = None


def read_uploads(
    body: _Readable, content_type: str, begin: Callable[[str, str], _Sink | None]
) -> None:
    """Parse a multipart body chunk by chunk, streaming each file part into a sink.

    ``begin(field_name, filename)`` is called at the start of every part that carries a
    ``filename`` and returns where its bytes go, or None to skip the part.

    Raises:
        ValueError: The body is not well-formed multipart (bad boundary, truncated, ...).
    """
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ValueError("the Content-Type has no boundary")

    part = _Part()
    finished = False

    def on_part_begin() -> None:
        part.headers.clear()
        part.sink = None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part.field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part.value += data[start:end]

    def on_header_end() -> None:
        part.headers[part.field.lower()] = part.value
        part.field, part.value = b"", b""

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(part.headers.get(b"content-disposition", b""))
        if b"filename" in disposition:
            name = disposition.get(b"name", b"").decode("utf-8", "replace")
            filename = disposition[b"filename"].decode("utf-8", "replace")
            part.sink = begin(name, filename)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if part.sink is not None:
            part.sink.write(data[start:end])

    def on_end() -> None:
        nonlocal finished
        finished = True

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_end": on_end,
        },
    )
    # python-multipart's parse errors are ValueErrors; they propagate as they are.
    while chunk := body.read(_CHUNK):
        parser.write(chunk)
    parser.finalize()
    if not finished:
        raise ValueError("the body ended before the closing boundary")
