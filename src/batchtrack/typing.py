"""Protocols for what you plug into batchtrack."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from ._models import Item, ProgressEvent

__all__ = ["Processor", "ProgressCallback"]


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
