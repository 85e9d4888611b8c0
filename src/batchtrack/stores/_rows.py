"""What the SQL stores (SQLite, PostgreSQL) share: status codes and the batch header row.

Both keep a batch's header as one row whose columns are :data:`COLUMNS`, in that order,
and an item's status as a small integer (:data:`CODE`); these turn such rows into the
values that cross the store boundary. Cancelled items have no column of their own: they
are what the total leaves over (``total - completed - failed - processing - pending``),
so the header rows of stores written before ``cancelled`` existed stay right as they are.
A batch's paused flag is a column read after the header's (each store places it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .._models import NO_METADATA, ItemSnapshot, Metadata, Progress, Status
from .base import (
    BatchRecord,
    Outcome,
    Transition,
    TransitionResult,
    add_stats,
    pack_stats,
    unpack_stats,
)

__all__ = [
    "CODE",
    "COLUMNS",
    "FAILED",
    "STATUSES",
    "counts",
    "ends",
    "header",
    "pack_metadata",
    "progress",
    "result",
    "step",
    "unpack_metadata",
    "values",
]

STATUSES = (
    Status.PENDING,
    Status.PROCESSING,
    Status.COMPLETED,
    Status.FAILED,
    Status.CANCELLED,
)
"""Item statuses by their code in the database."""
CODE = {status: code for code, status in enumerate(STATUSES)}
FAILED = CODE[Status.FAILED]

COLUMNS = (
    "batch_id",
    "owner",
    "created_at",
    "updated_at",
    "finished_at",
    "expires_at",
    "version",
    "total",
    "completed",
    "failed",
    "processing",
    "pending",
    "stats",
)
"""The batch header's columns, in the order :func:`header` reads them."""


def header(
    row: Sequence[Any],
    stats: Mapping[str, float],
    items: tuple[ItemSnapshot, ...] = (),
    paused: object = False,
    metadata: Mapping[str, str] = NO_METADATA,
) -> BatchRecord:
    """The batch a header row (:data:`COLUMNS` first) describes, with its decoded stats,
    its paused flag (a truthy value) and its metadata."""
    return BatchRecord(
        batch_id=row[0],
        owner=row[1],
        created_at=row[2],
        updated_at=row[3],
        finished_at=row[4],
        expires_at=row[5],
        version=row[6],
        progress=Progress(
            row[7], row[8], row[9], row[10], row[11], row[7] - row[8] - row[9] - row[10] - row[11]
        ),
        stats=stats,
        items=items,
        paused=bool(paused),
        metadata=metadata,
    )


def pack_metadata(metadata: Mapping[str, str]) -> str | None:
    """A batch's metadata as the text of its column: JSON, NULL when there is none."""
    if not metadata:
        return None
    return json.dumps(dict(metadata), ensure_ascii=False, separators=(",", ":"))


def unpack_metadata(text: str | None) -> Mapping[str, str]:
    """The metadata a column's text (:func:`pack_metadata`) holds."""
    if not text:
        return NO_METADATA
    return Metadata(json.loads(text))


def values(batch: BatchRecord) -> tuple[Any, ...]:
    """A batch's header as a row: its values in :data:`COLUMNS` order."""
    p = batch.progress
    return (
        batch.batch_id,
        batch.owner,
        batch.created_at,
        batch.updated_at,
        batch.finished_at,
        batch.expires_at,
        batch.version,
        p.total,
        p.completed,
        p.failed,
        p.processing,
        p.pending,
        pack_stats(batch.stats),
    )


def counts(row: Sequence[Any]) -> dict[Status, int]:
    """The counts per status of a header row (:data:`COLUMNS` order)."""
    return {
        Status.COMPLETED: row[8],
        Status.FAILED: row[9],
        Status.PROCESSING: row[10],
        Status.PENDING: row[11],
        Status.CANCELLED: row[7] - row[8] - row[9] - row[10] - row[11],
    }


def progress(total: int, counts: dict[Status, int]) -> Progress:
    """A :class:`Progress` from a total and the counts per status."""
    return Progress(
        total,
        counts[Status.COMPLETED],
        counts[Status.FAILED],
        counts[Status.PROCESSING],
        counts[Status.PENDING],
        counts[Status.CANCELLED],
    )


def result(
    outcome: Outcome, previous: Status, item: ItemSnapshot, header: BatchRecord
) -> TransitionResult:
    """The result of a transition: the item as it is now and the batch's header."""
    return TransitionResult(
        outcome,
        previous,
        item,
        header.progress,
        header.version,
        header.created_at,
        header.finished_at,
        header.expires_at,
        header.stats,
    )


def step(
    row: Sequence[Any],
    packed: bytes,
    memo: tuple[bytes, dict[str, float]],
    previous: Status,
    transition: Transition,
    elapsed: float,
    attempts: int,
) -> tuple[dict[Status, int], bytes, dict[str, float], int]:
    """What applying ``transition`` to an item makes of its batch's header ``row``.

    Args:
        row: The header row (:data:`COLUMNS` first).
        packed: The header's stats as stored.
        memo: The last ``(packed, decoded)`` stats this store saw: decoding is skipped
            when ``packed`` is the same blob.
        previous: The item's status before.
        transition: What is applied.
        elapsed: Seconds since the item's previous change.
        attempts: The item's attempts before.

    Returns:
        The new counts per status, the new stats packed and decoded (the caller's next
        ``memo``), and the item's new attempts.
    """
    counts_now = counts(row)
    counts_now[previous] -= 1
    counts_now[transition.target] += 1
    memo_blob, memo_stats = memo
    stats = memo_stats if packed == memo_blob else unpack_stats(packed)
    contributions = transition.stats.get(previous)
    if contributions:
        stats = dict(stats)
        add_stats(stats, contributions, elapsed)
        packed = pack_stats(stats)
    if transition.add_attempt:
        attempts += 1
    elif transition.reset_attempts:
        attempts = 0
    return counts_now, packed, stats, attempts


def ends(counts: dict[Status, int], transition: Transition) -> tuple[float | None, float]:
    """The batch's ``finished_at`` and ``expires_at`` once its counts are ``counts``."""
    if counts[Status.PENDING] or counts[Status.PROCESSING]:
        return None, transition.expires_at_open
    return transition.at, transition.expires_at_finished
