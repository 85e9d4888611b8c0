"""The query parameters of the status and events endpoints: pages and changes of big
batches (``?status=&limit=&after=&since=``, ``?delta=1``)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

from ._models import BatchSnapshot, Status
from ._tracker import BatchTracker
from ._wire import Request, batch_not_found, reject
from .exceptions import BatchNotFound, ItemNotFound

__all__ = ["MAX_LIMIT", "MAX_VERSION", "find_items", "item_conditions", "wants_delta"]

MAX_LIMIT = 1000
"""The largest ``limit`` a status request may ask for."""

MAX_VERSION = 2**53 - 1
"""The largest ``since``: the largest integer every JSON client reads exactly."""

_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_STATUSES = ", ".join(s.value for s in Status if s is not Status.PAUSED)
_STATUS_PARAMETERS = frozenset({"status", "limit", "after", "since"})


def _parameters(request: Request, known: frozenset[str]) -> dict[str, str]:
    """The known parameters of the query (others are ignored, like cache busters); a
    known one given twice is a 400."""
    found: dict[str, str] = {}
    try:
        pairs = parse_qsl(request.query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        reject(400, "invalid_query", "the query string is not valid UTF-8")
    for name, value in pairs:
        if name not in known:
            continue
        if name in found:
            reject(400, "invalid_query", f"{name} is given more than once")
        found[name] = value
    return found


def _whole(value: str, name: str, low: int, high: int) -> int:
    if (
        not (value.isascii() and value.isdigit())
        or len(value) > 20
        or not low <= int(value) <= high
    ):
        reject(
            400,
            "invalid_query",
            f"{name} must be a whole number from {low} to {high}, got {value[:40]!r}",
        )
    return int(value)


def item_conditions(request: Request) -> dict[str, Any]:
    """The ``status``, ``limit``, ``after`` and ``since`` of a status request, checked,
    as keyword arguments of :meth:`BatchTracker.get` (empty when none is given)."""
    given = _parameters(request, _STATUS_PARAMETERS)
    conditions: dict[str, Any] = {}
    if "status" in given:
        try:
            conditions["status"] = Status(given["status"])
            if conditions["status"] is Status.PAUSED:  # a batch's status, never an item's
                raise ValueError(given["status"])
        except ValueError:
            reject(
                400,
                "invalid_query",
                f"status must be one of {_STATUSES}, got {given['status'][:40]!r}",
            )
    if "limit" in given:
        conditions["limit"] = _whole(given["limit"], "limit", 1, MAX_LIMIT)
    if "after" in given:
        if not _UUID.fullmatch(given["after"]):
            reject(400, "invalid_query", f"after must be a UUID, got {given['after'][:80]!r}")
        conditions["after"] = given["after"].lower()
    if "since" in given:
        conditions["since"] = _whole(given["since"], "since", 0, MAX_VERSION)
    return conditions


def find_items(tracker: BatchTracker, batch_id: str, owner: str, request: Request) -> BatchSnapshot:
    """The batch with the items the request's query asks for, as the caller may see it.

    Raises:
        Reject: 400 ``invalid_query`` for a bad parameter; 404 ``batch_not_found`` as
            for the whole batch, 404 ``item_not_found`` for an ``after`` that names no
            image of the batch.
    """
    conditions = item_conditions(request)
    try:
        return tracker.get(batch_id, owner=owner, **conditions)
    except BatchNotFound:
        batch_not_found()
    except ItemNotFound:
        reject(404, "item_not_found", "after names no image of this batch")


def wants_delta(request: Request) -> bool:
    """Whether an events request asks for changed items only (``delta=1``)."""
    value = _parameters(request, frozenset({"delta"})).get("delta", "0")
    if value not in ("0", "1"):
        reject(400, "invalid_query", f"delta must be 0 or 1, got {value[:40]!r}")
    return value == "1"
