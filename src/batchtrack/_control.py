"""The endpoints that act on a batch once it runs: cancel, retry, pause and unpause it.

``POST {prefix}/batch-cancel/{batchId}`` cancels every item not started yet and answers
how many; ``POST {prefix}/batch-retry/{batchId}`` puts failed and cancelled items (all,
or those named) back to pending and has the runner resume the batch;
``POST {prefix}/batch-pause/{batchId}`` keeps items not started from starting, and
``POST {prefix}/batch-unpause/{batchId}`` lets them start and has the runner resume the
batch. They live apart from the router (:class:`batchtrack._http.Api`), which only maps
the routes to the methods of :class:`BatchControl`. The ``on_progress``
hook of ``create_app`` is handed to the runner from here too (:func:`progress_hook`).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from ._models import ItemSnapshot, ProgressEvent, Status
from ._tracker import BatchTracker
from ._wire import (
    NO_BODY,
    Request,
    Response,
    batch_not_found,
    check_uuid,
    find_batch,
    json_response,
    read_json,
    reject,
    status_url,
)
from .exceptions import (
    BatchNotFound,
    InvalidTransition,
    ItemNotFound,
    OrchestratorClosed,
    ValidationError,
)
from .typing import Runner
from .uploads import FileNotFound, UploadStore

__all__ = ["MAX_RETRY_IDS", "BatchControl", "progress_hook"]

log = logging.getLogger("batchtrack")

MAX_RETRY_IDS = 10_000
"""The most item ids one retry request may name."""

_NAMED_IN_MESSAGES = 3
_RETRIED = (Status.FAILED, Status.CANCELLED)


def _describe(items: Sequence[ItemSnapshot]) -> str:
    """``'a.jpg' (id …), 'b.jpg' (id …) and 3 more``, for error messages."""
    named = ", ".join(f"{i.filename!r} ({i.id})" for i in items[:_NAMED_IN_MESSAGES])
    rest = len(items) - _NAMED_IN_MESSAGES
    return f"{named} and {rest} more" if rest > 0 else named


def _takes_on_progress(method: object) -> bool:
    """Whether ``method`` accepts an ``on_progress`` keyword argument."""
    try:
        parameters = inspect.signature(method).parameters.values()  # type: ignore[arg-type]
    except (TypeError, ValueError):  # no signature to read: assume the protocol's
        return False
    return any(
        (p.name == "on_progress" and p.kind is not p.POSITIONAL_ONLY) or p.kind is p.VAR_KEYWORD
        for p in parameters
    )


def _deliver(callback: Callable[[ProgressEvent], Any], event: ProgressEvent) -> None:
    """Call the app's ``on_progress``; an exception is logged, never raised."""
    try:
        callback(event)
    except Exception:
        log.exception("batchtrack: the app's on_progress callback raised; the batch goes on")


def progress_hook(runner: Runner, on_progress: object) -> dict[str, Any]:
    """The keyword arguments that hand ``create_app``'s ``on_progress`` to the runner.

    Empty without a callback. With one, the runner's ``submit`` and ``resume`` must take
    ``on_progress`` (as :class:`~batchtrack.Orchestrator`'s do): the callback runs in the
    process that runs the items, which a runner on other machines cannot offer.

    Raises:
        ValidationError: ``on_progress`` is not callable, or the runner cannot take it.
    """
    if on_progress is None:
        return {}
    if not callable(on_progress):
        raise ValidationError("on_progress must be callable with one ProgressEvent")
    unable = [m for m in ("submit", "resume") if not _takes_on_progress(getattr(runner, m))]
    if unable:
        raise ValidationError(
            f"on_progress needs a runner whose submit and resume take on_progress (such as "
            f"an Orchestrator); {type(runner).__name__}.{unable[0]} does not. With a runner "
            f"on other machines, follow the batch in the tracker's store instead"
        )
    return {"on_progress": functools.partial(_deliver, on_progress)}


@attrs.frozen
class BatchControl:
    """Cancel and retry over HTTP, on the tracker and the runner behind ``create_app``.

    Attributes:
        tracker: Where batches are read and changed (counts come from here).
        runner: Told to drop a cancelled batch's queued work, and to resume a retried one.
        uploads: Where the inputs of batches started over HTTP are; a retry needs them.
        prefix: The API prefix, for the URLs handed out.
        progress: The keyword arguments that give the runner the app's ``on_progress``
            when it resumes a retried batch (:func:`progress_hook`).
    """

    tracker: BatchTracker
    runner: Runner
    uploads: UploadStore
    prefix: str
    progress: dict[str, Any] = attrs.field(factory=dict)

    def cancel(self, request: Request, owner: str, batch: str) -> Response:
        """``POST /batch-cancel/{batchId}``: cancel every pending item, ``{"cancelled": n}``."""
        batch_id = check_uuid(batch, "batchId")
        try:
            cancelled = self.tracker.cancel(batch_id, owner=owner)
        except BatchNotFound:
            batch_not_found()
        try:
            # The count is the tracker's, atomic and exact; the runner only drops the
            # work it had queued, whose items the tracker has just cancelled.
            self.runner.cancel(batch_id)
        except Exception:
            # The cancel stands: a worker skips an item that is no longer pending.
            log.exception("batchtrack: the runner failed to cancel batch %s", batch_id)
        return json_response(200, {"cancelled": cancelled})

    def retry(self, request: Request, owner: str, batch: str) -> Response:
        """``POST /batch-retry/{batchId}``: failed and cancelled items back to pending,
        then resume.

        Everything is checked before anything changes: the body, the batch, that each
        item to retry has failed or was cancelled, and that its input is still there.
        """
        batch_id = check_uuid(batch, "batchId")
        names = self._named_items(request)
        snap = find_batch(self.tracker, batch_id, owner)
        if names is None:
            targets = [i for i in snap.items if i.status in _RETRIED]
            if not targets:
                reject(409, "nothing_to_retry", "no item of this batch has failed or was cancelled")
        else:
            by_id = {i.id: i for i in snap.items}
            unknown = [n for n in names if n not in by_id]
            if unknown:
                more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
                reject(404, "item_not_found", f"the batch has no item {unknown[0]}{more}")
            targets = [by_id[n] for n in names]
            busy = [i for i in targets if i.status not in _RETRIED]
            if busy:
                reject(
                    409,
                    "nothing_to_retry",
                    f"only failed and cancelled items can be retried; neither: {_describe(busy)}",
                )
        gone = [i for i in targets if not self._input_available(i)]
        if gone:
            reject(
                410,
                "inputs_gone",
                f"the uploaded files behind {_describe(gone)} have expired; "
                "upload them again and start a new batch",
            )
        try:
            # The ids checked above, not None: an item failing meanwhile was not checked.
            retried = self.tracker.retry(batch_id, [i.id for i in targets], owner=owner)
        except InvalidTransition as exc:
            reject(
                409,
                "nothing_to_retry",
                f"item {exc.item_id} is {exc.current} now, not failed or cancelled; "
                "nothing was retried",
            )
        except (BatchNotFound, ItemNotFound):
            batch_not_found()
        try:
            self.runner.resume(batch_id, **self.progress)
        except OrchestratorClosed:
            reject(503, "shutting_down", "the service is shutting down; try again shortly")
        url = status_url(request, self.prefix, batch_id)
        return json_response(
            202, {"retried": retried, "batchId": batch_id, "statusUrl": url}, [("Location", url)]
        )

    def pause(self, request: Request, owner: str, batch: str) -> Response:
        """``POST /batch-pause/{batchId}``: items not started stay pending until an
        unpause; ``{"paused": true}``, or false for a finished or paused batch."""
        batch_id = check_uuid(batch, "batchId")
        try:
            paused = self.tracker.pause(batch_id, owner=owner)
        except BatchNotFound:
            batch_not_found()
        # The runner needs no word: every start of the batch's items is refused now,
        # so queued work is skipped and stays pending for the resume of an unpause.
        return json_response(200, {"paused": paused})

    def unpause(self, request: Request, owner: str, batch: str) -> Response:
        """``POST /batch-unpause/{batchId}``: let the batch's items start again and have
        the runner resume what is pending; ``{"unpaused": true}``, or false for a batch
        that was not paused."""
        batch_id = check_uuid(batch, "batchId")
        try:
            unpaused = self.tracker.unpause(batch_id, owner=owner)
        except BatchNotFound:
            batch_not_found()
        if unpaused:
            try:
                self.runner.resume(batch_id, **self.progress)
            except OrchestratorClosed:
                # The unpause stands: the pending items wait for the next resume.
                reject(503, "shutting_down", "the service is shutting down; try again shortly")
            except BatchNotFound:
                batch_not_found()  # expired or deleted meanwhile
        return json_response(200, {"unpaused": unpaused})

    def _named_items(self, request: Request) -> list[str] | None:
        """The item ids the body names (lower case, each once); None for every failed one."""
        payload: Any = read_json(request, optional=True)
        if payload is NO_BODY:
            return None
        if not isinstance(payload, dict) or "itemIds" not in payload:
            reject(
                400,
                "missing_item_ids",
                'send {"itemIds": [...]}, or no body to retry every failed item',
            )
        ids = payload["itemIds"]
        if not isinstance(ids, list) or not ids:
            reject(400, "bad_item_ids", "itemIds must be a non-empty list of item ids")
        if len(ids) > MAX_RETRY_IDS:
            reject(400, "too_many_items", f"at most {MAX_RETRY_IDS:,} item ids per request")
        if not all(isinstance(i, str) for i in ids):
            reject(400, "bad_item_ids", "every item id must be a string")
        return list(dict.fromkeys(check_uuid(i, "every item id") for i in ids))

    def _input_available(self, item: ItemSnapshot) -> bool:
        """Whether the item's stored input can still be read: for an upload, one that
        has not expired (even when no cleanup has removed it yet) and is still stored."""
        if item.source is None:
            return False
        file_id = self.uploads.file_id_of(item.source)
        if file_id is not None:
            try:
                self.uploads.get(file_id)
            except FileNotFound:
                return False
            return self.uploads.storage.size(self.uploads.prefix + file_id) is not None
        if "://" in item.source:
            return True  # another storage's: the processor says when it cannot read it
        return Path(item.source).is_file()
