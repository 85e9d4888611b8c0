"""The errors batchtrack raises.

Every error is a :class:`BatchtrackError`, so ``except BatchtrackError`` catches all of
them. Lookup failures are also :class:`LookupError` and bad arguments are also
:class:`ValueError`, so code that already handles those keeps working.
"""

from __future__ import annotations

import shlex
from pathlib import PurePath

__all__ = [
    "BatchNotFound",
    "BatchPaused",
    "BatchtrackError",
    "DatabaseDamaged",
    "FileStorageError",
    "InputsGone",
    "InvalidTransition",
    "ItemNotFound",
    "OrchestratorClosed",
    "ProcessingError",
    "StoreError",
    "ValidationError",
]


class BatchtrackError(Exception):
    """Base class of every error batchtrack raises on purpose."""


class ValidationError(BatchtrackError, ValueError):
    """An argument was rejected; nothing was changed."""


class BatchNotFound(BatchtrackError, LookupError):
    """No visible batch has this id.

    Raised alike for an id that never existed, a batch that expired or was deleted, and a
    batch that belongs to another owner, so that a caller cannot tell them apart.
    """

    def __init__(self, batch_id: object) -> None:
        super().__init__(f"batch {batch_id!r} not found")
        self.batch_id = batch_id


class ItemNotFound(BatchtrackError, LookupError):
    """The batch exists but has no item with this id."""

    def __init__(self, batch_id: str, item_id: object) -> None:
        super().__init__(f"item {item_id!r} not found in batch {batch_id!r}")
        self.batch_id = batch_id
        self.item_id = item_id


class InvalidTransition(BatchtrackError):
    """An item cannot move from the status it has to the one requested.

    Attributes:
        batch_id: The batch of the item.
        item_id: The item.
        current: The status the item has (unchanged).
        requested: The status that was asked for.
    """

    def __init__(self, batch_id: str, item_id: str, current: str, requested: str) -> None:
        super().__init__(
            f"item {item_id!r} of batch {batch_id!r} is {current}; it cannot become {requested}"
        )
        self.batch_id = batch_id
        self.item_id = item_id
        self.current = current
        self.requested = requested


class BatchPaused(InvalidTransition):
    """An item of a paused batch cannot start until the batch is unpaused.

    An :class:`InvalidTransition`, so a worker that skips items it cannot start skips
    these too; the item stays pending, and a runner's ``resume`` after
    :meth:`~batchtrack.BatchTracker.unpause` runs it.
    """

    def __init__(self, batch_id: str, item_id: str) -> None:
        super().__init__(batch_id, item_id, "pending", "processing")
        self.args = (f"batch {batch_id!r} is paused; item {item_id!r} stays pending",)


class InputsGone(BatchtrackError):
    """Items cannot be retried: their input was not kept, so nothing could run them.

    An item whose input was bytes or a file object (not a path or a string the tracker
    can store) lived only in the process that submitted it; running it again would need
    a guess. Submit such items again instead. Nothing was changed.

    Attributes:
        batch_id: The batch.
        item_ids: The items whose input was not kept, in batch order.
    """

    def __init__(self, batch_id: str, item_ids: tuple[str, ...]) -> None:
        more = f" (and {len(item_ids) - 1} more)" if len(item_ids) > 1 else ""
        super().__init__(
            f"item {item_ids[0]!r}{more} of batch {batch_id!r} cannot be retried: "
            "its input was not kept; submit it again"
        )
        self.batch_id = batch_id
        self.item_ids = item_ids


class StoreError(BatchtrackError):
    """A store could not do what was asked (unreadable file, server down, ...).

    The underlying error, when there is one, is attached as ``__cause__``.
    """


class DatabaseDamaged(StoreError):
    """A database file is damaged (SQLite found malformed pages or missing tables).

    Raised when the store is opened (the file is then not written to), or by a later call
    that met damage the check at open did not reach (that call changed nothing). The
    message says how to keep what can still be read.

    Attributes:
        path: The file.
        detail: What was found, as SQLite put it.
    """

    def __init__(self, path: object, detail: str) -> None:
        name = PurePath(str(path))
        recovered = name.with_name(f"{name.stem}-recovered{name.suffix}")
        super().__init__(
            f"{name} is damaged ({detail}); it was kept untouched. To keep what can be read: "
            f"sqlite3 {shlex.quote(str(name))} .recover | sqlite3 {shlex.quote(str(recovered))},"
            " then put the recovered file in its place; or move it aside (with its -wal and"
            " -shm files) to start with an empty database"
        )
        self.path = path
        self.detail = detail


class FileStorageError(StoreError):
    """A file storage could not do what was asked (object store down, missing bucket,
    refused credentials, a full disk, ...).

    A :class:`StoreError`, so code that handles store outages handles this one too; the
    HTTP API answers it with 503 (507 when ``full``). The underlying error, when there is
    one, is attached as ``__cause__``.

    Attributes:
        full: True when the storage ran out of space (a full disk).
    """

    def __init__(self, message: str, *, full: bool = False) -> None:
        super().__init__(message)
        self.full = full


class ProcessingError(BatchtrackError):
    """Raised by a processor to fail an item with exactly this message for users.

    Any other exception fails the item too, with ``"TypeName: message"``; raise this one
    when the message is already written for the person who uploaded the item
    (``ProcessingError("not an image")``).
    """


class OrchestratorClosed(BatchtrackError, RuntimeError):
    """The orchestrator was closed; it accepts no more batches."""
