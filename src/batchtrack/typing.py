"""Protocols for what you plug into batchtrack."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from ._models import BatchSnapshot, Item, ProgressEvent

__all__ = ["Processor", "ProgressCallback", "Runner"]


@runtime_checkable
class ProgressCallback(Protocol):
    """Called by the :class:`~batchtrack.Orchestrator` once after every item transition.

    It receives the :class:`~batchtrack.ProgressEvent` of that transition: the item as it
    is now, and the batch's counts and ETA right after it. Calls for one batch may come
    from several threads; one orchestrator delivers them from one thread, each exactly
    once, in the order the store applied the transitions. A callback that raises is
    logged (logger ``batchtrack``) and never stops or slows the batch. Any callable
    taking one argument fits, e.g. ``lambda event: print(event.progress)``.
    """

    def __call__(self, event: ProgressEvent, /) -> Any: ...


@runtime_checkable
class Processor(Protocol):
    """Does the work for one item; returning completes it, raising fails it.

    It receives an :class:`~batchtrack.Item` whose ``id`` and ``batch_id`` are set. Raise
    :class:`~batchtrack.exceptions.ProcessingError` to fail the item with a message
    written for users; any other exception fails it with ``"TypeName: message"`` (paths
    reduced to file names) and its traceback goes to the log. With a process pool the
    processor and the items must be picklable.
    """

    def __call__(self, item: Item, /) -> Any: ...


@runtime_checkable
class Runner(Protocol):
    """What runs batches for the HTTP API: ``create_app(tracker, runner, uploads)``.

    :class:`~batchtrack.Orchestrator` is one (in this process, the default);
    :class:`batchtrack.celery.CeleryRunner` is another (on Celery workers). A runner
    records every transition in the tracker it was given, so that any process sharing the
    tracker's store sees the progress.
    """

    def submit(self, items: Iterable[Any], *, owner: str | None = None) -> BatchSnapshot:
        """Create a batch of ``items`` (:class:`~batchtrack.Item` values or paths) in the
        tracker and start running it; return at once with the new batch.

        A runner may also take ``key=`` (an idempotency key, passed on to
        :meth:`~batchtrack.BatchTracker.create_batch`; a batch the key named already is
        returned as it is and not run again): the HTTP API passes ``key`` only when a
        request carries one, so runners written without it keep working for the rest.
        Likewise ``metadata=`` (string pairs kept with the batch, passed on to
        :meth:`~batchtrack.BatchTracker.create_batch`) is passed only when a request
        carries ``"metadata"``; a runner without it answers such requests with 501.
        """
        ...

    def resume(self, batch_id: str) -> BatchSnapshot:
        """Run the batch's pending items (after a retry, a reclaim or a restart) from their
        stored sources; return the batch as it is now."""
        ...

    def cancel(self, batch_id: str) -> bool:
        """Stop starting the batch's items: pending ones fail with ``"cancelled"``.

        Returns:
            True if any item was cancelled.
        """
        ...
