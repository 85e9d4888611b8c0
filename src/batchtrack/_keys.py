"""Idempotency keys of :meth:`~batchtrack.BatchTracker.create_batch`: the rules, once.

A key names one batch of one owner for :data:`KEY_TTL` seconds (and no longer than that
batch lives). What a key is checked against is the fingerprint of the items: their
filenames and sources, in order (ids are not compared: they may be generated anew).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Sequence

from ._models import ItemSnapshot
from .exceptions import ValidationError

__all__ = [
    "KEY_TTL",
    "MAX_KEY_LENGTH",
    "KeyConflict",
    "check_key",
    "fingerprint",
    "takes_key",
]

KEY_TTL = 24 * 3600.0
"""Seconds a key keeps naming its batch, counted from the batch's creation."""

MAX_KEY_LENGTH = 255


class KeyConflict(ValidationError):
    """A key already names a batch of other items (HTTP: 409 ``idempotency_conflict``)."""


def check_key(key: object) -> str:
    """``key`` if it is a usable idempotency key.

    Raises:
        ValidationError: Not a string, empty, longer than :data:`MAX_KEY_LENGTH`, or with a
            character that is not printable ASCII.
    """
    if not isinstance(key, str):
        raise ValidationError(f"the idempotency key must be a string, not {type(key).__name__}")
    if not key:
        raise ValidationError("the idempotency key must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise ValidationError(
            f"the idempotency key is longer than {MAX_KEY_LENGTH} characters ({len(key)})"
        )
    if not all(" " <= ch <= "~" for ch in key):
        raise ValidationError(
            f"the idempotency key must be printable ASCII characters only: {key!r}"
        )
    return key


def fingerprint(items: Sequence[ItemSnapshot]) -> str:
    """A digest of the items' filenames and sources, in order."""
    text = json.dumps([[item.filename, item.source] for item in items], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def conflict(key: str) -> KeyConflict:
    """The error for a key reused with other items."""
    return KeyConflict(
        f"idempotency key {key!r} already names a batch of other items "
        "(the filenames or sources differ); use a new key for a new batch"
    )


def takes_key(method: object) -> bool:
    """Whether a runner's ``submit`` accepts a ``key`` keyword argument (runners written
    before keys existed do not: the HTTP API then refuses keyed requests)."""
    try:
        parameters = inspect.signature(method).parameters.values()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return any(
        (p.name == "key" and p.kind is not p.POSITIONAL_ONLY) or p.kind is p.VAR_KEYWORD
        for p in parameters
    )
