"""The store boundary: what a store must do, and the values that cross it.

A store persists batches and applies one item transition at a time **atomically**. It
knows none of batchtrack's rules: the :class:`~batchtrack.BatchTracker` decides which
transitions are allowed, how a batch's status is derived, how the ETA is computed and
when a batch expires, and hands the store a :class:`Transition` that says exactly what
to check and what to write. That keeps every rule in one place, and lets a store apply a
transition in one step of its own (a lock, one SQL transaction, one Lua script) without
read-modify-write races between threads, processes or hosts.

To write a store, subclass :class:`Store` and run :mod:`batchtrack.testing`'s
conformance suite against it. A store that can tell when a batch changes (a pub/sub
channel, LISTEN/NOTIFY) also implements :meth:`Store.listen`, so that watchers are woken
instead of polling it.
"""

from __future__ import annotations

import enum
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

import attrs

from .. import _eta
from .._closing import Closing
from .._models import NO_METADATA, ItemQuery, ItemSnapshot, Progress, Status
from ..exceptions import ItemNotFound

__all__ = [
    "BatchRecord",
    "BatchVersion",
    "BulkResult",
    "ItemQuery",
    "LostItem",
    "OutboxEntry",
    "Outcome",
    "PackedStats",
    "Store",
    "Transition",
    "TransitionResult",
    "add_stats",
    "pack_stats",
    "unpack_stats",
]


class BatchVersion(NamedTuple):
    """What :meth:`Store.version_of` reads: enough to tell that a batch is unchanged."""

    version: int
    owner: str | None
    expires_at: float


@attrs.frozen
class BatchRecord:
    """A batch as a store holds it.

    Attributes:
        batch_id: The batch id.
        owner: The owner id, or None.
        created_at: Seconds since the epoch (from the tracker's clock).
        updated_at: When the last applied transition happened (creation time before).
        finished_at: When the last open item became final, or None.
        expires_at: From this moment on the batch is gone: the store treats it as absent
            in :meth:`Store.apply` and deletes it in :meth:`Store.purge_expired`.
        version: 0 at creation, plus one per applied transition.
        progress: The counts per status, kept incrementally (never recounted).
        stats: Named numbers that applied transitions add to (:attr:`Transition.stats`);
            the tracker keeps its ETA state here. Missing names read as 0.
        items: Every item in the order given at creation, or ``()`` when the caller
            asked for the header only.
        paused: Whether the batch is paused (:meth:`Store.set_paused`): a transition
            with :attr:`Transition.unless_paused` is refused.
        metadata: The string pairs given at creation (never changed after); stores
            write them in :meth:`Store.create` and read them back in :meth:`Store.load`,
            :meth:`Store.load_items` and :meth:`Store.list_batches`, never on a
            transition.
    """

    batch_id: str
    owner: str | None
    created_at: float
    updated_at: float
    finished_at: float | None
    expires_at: float
    version: int
    progress: Progress
    stats: Mapping[str, float] = attrs.field(factory=dict)
    items: tuple[ItemSnapshot, ...] = ()
    paused: bool = False
    metadata: Mapping[str, str] = NO_METADATA


EventStats = Mapping[Status, Mapping[str, tuple[float, int]]] | tuple[float, float | None]
"""What :meth:`Store._apply_parts` takes as a transition's stats: the contributions
themselves (:attr:`Transition.stats`), or the tracker's shorthand ``(origin, lease)``
for ``batchtrack._eta.stats_for(target, at, origin, lease)``, which a store may expand
itself (Redis does) or sum without building them (``_eta.added``: the memory and SQLite
stores do)."""


# Transition and TransitionResult are created once per event on the hot path, so they
# are plain slotted classes (about 3x cheaper to build than frozen ones); treat them as
# read-only all the same.
@attrs.define
class Transition:
    """One requested item transition, with everything the store must check and write.

    The store applies it atomically:

    1. If the batch is missing, or ``expires_at <= at``, raise
       :class:`~batchtrack.BatchNotFound`; if the item is missing, raise
       :class:`~batchtrack.ItemNotFound`.
    2. If the item already has status ``target``: change nothing
       (:attr:`Outcome.UNCHANGED`).
    3. If the item's status is not in ``sources``: change nothing
       (:attr:`Outcome.REJECTED`). Else, if ``unless_paused`` and the batch is
       paused: change nothing (:attr:`Outcome.PAUSED`).
    4. If ``lost_before`` is set and the item holds no lease that ran out by then
       (its ``lease_until`` is None or later), or if ``max_attempts`` is set and the
       item was started that many times or more: change nothing
       (:attr:`Outcome.REJECTED`).
    5. Otherwise (:attr:`Outcome.APPLIED`), in one atomic step: set the item's status to
       ``target``, its error to ``error`` and its change time to ``at``; set its lease
       to ``lease_until`` (None: no lease) and, when that is set, its last heartbeat to
       ``at``; add one to its attempts if ``add_attempt``, or set them to 0 if
       ``reset_attempts``; move one count from the old status to the new; add the
       contributions in ``stats`` for the old status to the batch's stats (below); add
       one to ``version``; set ``updated_at`` to ``at``; and if no item is pending or
       processing any more, set ``finished_at`` to ``at`` and ``expires_at`` to
       ``expires_at_finished``, else set ``finished_at`` to None (a retried batch is
       open again) and ``expires_at`` to ``expires_at_open``.
    6. If that set ``finished_at`` where it was None (the batch ended), add the batch's
       end marker (:func:`end_marker` with the new version and ``at``) to the outbox,
       due at once, in the same atomic step (:meth:`Store.outbox_claim`). So does
       :meth:`Store.apply_many` when it ends a batch.

    Attributes:
        item_id: The item to change.
        target: The status it should have.
        sources: The statuses it may come from.
        at: When the transition happens (seconds since the epoch).
        error: The error to record (None except for failures).
        expires_at_open: The batch's new ``expires_at`` while items remain open.
        expires_at_finished: The batch's new ``expires_at`` if this finishes it.
        stats: What an applied transition adds to the batch's stats, by the status the
            item leaves: for each ``name: (coefficient, power)`` in
            ``stats.get(previous_status, {})``, add
            ``coefficient * elapsed ** power`` to the stat ``name`` (a missing stat is 0),
            where ``elapsed`` is the seconds since the item's previous transition (since
            the batch was created, for an item never moved). Power 0 adds the
            coefficient as it is. This is how the tracker keeps its ETA state (throughput
            and item durations) without the store knowing what it means.
        lease_until: The item's lease after the transition (None: it holds none).
        add_attempt: Count one more start of the item.
        reset_attempts: Set the item's count of starts back to 0.
        lost_before: Apply only to an item whose lease ran out at or before this time.
        max_attempts: Apply only to an item started fewer times than this.
        unless_paused: Refuse the transition while the batch is paused (a start).
    """

    item_id: str
    target: Status
    sources: frozenset[Status]
    at: float
    error: str | None
    expires_at_open: float
    expires_at_finished: float
    stats: Mapping[Status, Mapping[str, tuple[float, int]]] = attrs.field(factory=dict)
    lease_until: float | None = None
    add_attempt: bool = False
    reset_attempts: bool = False
    lost_before: float | None = None
    max_attempts: int | None = None
    unless_paused: bool = False


@attrs.frozen
class BulkResult:
    """The answer of :meth:`Store.apply_many`.

    Attributes:
        applied: How many items changed.
        rejected: The named items that were not in an allowed status, with the status
            they had (then nothing changed at all); empty when not naming items.
        progress: The batch's counts after the call.
        version: The batch's version after the call.
    """

    applied: int
    rejected: tuple[tuple[str, Status], ...]
    progress: Progress
    version: int


@attrs.frozen
class LostItem:
    """A processing item whose lease ran out, as :meth:`Store.lost` lists it.

    Attributes:
        batch_id: Its batch.
        item_id: The item.
        attempts: How many times it was started since it was created or last retried.
        beat_at: Its last sign of life: when it was started or last heartbeat.
        lease_until: When its lease ran out.
    """

    batch_id: str
    item_id: str
    attempts: int
    beat_at: float
    lease_until: float


def add_stats(
    stats: dict[str, float], contributions: Mapping[str, tuple[float, int]], elapsed: float
) -> None:
    """Add ``coefficient * elapsed ** power`` to ``stats[name]`` for each contribution.

    The arithmetic of :attr:`Transition.stats`, for stores that run Python.
    """
    square = elapsed * elapsed
    small = (1.0, elapsed, square, square * elapsed, square * square)
    get = stats.get
    for name, (coefficient, power) in contributions.items():
        scale = small[power] if 0 <= power < 5 else elapsed**power
        stats[name] = get(name, 0.0) + coefficient * scale


def pack_stats(stats: Mapping[str, float]) -> bytes:
    """Stats as bytes: a count (uint16), the values as little-endian doubles, the names
    joined by ``\\x1f``.

    For stores that keep stats in one field (SQLite, Redis): several times faster than
    JSON for the ~20 numbers the ETA keeps, exact, and unlike pickle it cannot run code.
    """
    names = "\x1f".join(stats).encode()
    return struct.pack(f"<H{len(stats)}d", len(stats), *stats.values()) + names


def unpack_stats(blob: bytes) -> dict[str, float]:
    """The inverse of :func:`pack_stats`."""
    (count,) = struct.unpack_from("<H", blob)
    if not count:
        return {}
    values = struct.unpack_from(f"<{count}d", blob, 2)
    return dict(zip(blob[2 + 8 * count :].decode().split("\x1f"), values, strict=True))


class PackedStats(Mapping[str, float]):
    """Stats in :func:`pack_stats`' bytes, decoded on first use: a store's answer often
    goes unread (the ETA of an event is worked out only when someone looks)."""

    __slots__ = ("_blob", "_stats")

    def __init__(self, blob: bytes) -> None:
        self._blob = blob
        self._stats: dict[str, float] | None = None

    def _decoded(self) -> dict[str, float]:
        if self._stats is None:
            self._stats = unpack_stats(self._blob)
        return self._stats

    def __getitem__(self, name: str) -> float:
        return self._decoded()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self._decoded())

    def __repr__(self) -> str:
        return f"PackedStats({self._decoded()!r})"


@attrs.frozen
class OutboxEntry:
    """One entry of a store's outbox (:meth:`Store.outbox_claim`): an *end marker* that
    the store wrote when a transition ended a batch, or a webhook *delivery* made of one.

    Attributes:
        entry_id: Unique in the outbox; ``end:<batch id>:<version>`` for a marker.
        batch_id: The batch that ended.
        version: The batch's version right after the transition that ended it.
        ended_at: When it ended (the transition's ``at``).
        url: Where a delivery goes; None for a marker.
        body: A delivery's JSON body; None for a marker.
        attempts: How many times a delivery was tried and failed.
    """

    entry_id: str
    batch_id: str
    version: int
    ended_at: float
    url: str | None = None
    body: str | None = None
    attempts: int = 0


def end_marker(batch_id: str, version: int, ended_at: float) -> OutboxEntry:
    """The marker a store writes when a transition ends a batch (see :meth:`Store.apply`)."""
    return OutboxEntry(f"end:{batch_id}:{version}", batch_id, version, ended_at)


class Outcome(enum.Enum):
    """What :meth:`Store.apply` did with a :class:`Transition`."""

    APPLIED = "applied"
    """The item changed; counts, stats, version and times were updated."""
    UNCHANGED = "unchanged"
    """The item already had the target status; nothing changed."""
    REJECTED = "rejected"
    """The item's status is not an allowed source; nothing changed."""
    PAUSED = "paused"
    """The batch is paused and the transition was one to refuse then; nothing changed."""


@attrs.define
class TransitionResult:
    """The answer of :meth:`Store.apply`: the item and the batch header after the call.

    Attributes:
        outcome: What happened.
        previous: The item's status before the call.
        item: The item after the call.
        progress: The batch's counts after the call.
        version: The batch's version after the call.
        created_at: When the batch was created.
        finished_at: When the batch finished, or None.
        expires_at: When the batch expires, after the call.
        stats: The batch's stats after the call.
    """

    outcome: Outcome
    previous: Status
    item: ItemSnapshot
    progress: Progress
    version: int
    created_at: float
    finished_at: float | None
    expires_at: float
    stats: Mapping[str, float]


class Store(Closing, ABC):
    """Where batches live. Subclasses must be safe to call from any number of threads.

    Stores that share their data between processes or hosts (SQLite, Redis) must keep
    :meth:`apply` atomic across all of them too.

    Attributes:
        can_listen: True on stores that implement :meth:`listen` (a class attribute).
            Watchers of a store that cannot listen read it again every few moments.
    """

    can_listen: bool = False

    def listen(self, on_change: Callable[[str | None], None], stop: threading.Event) -> None:
        """Block until ``stop`` is set, calling ``on_change(batch_id)`` for every change any
        process makes to a batch (create, every applied transition, retry/cancel,
        pause/unpause, delete/expiry).

        Calls ``on_change(None)`` once as soon as the subscription is in place (meaning:
        anything may have changed before now, re-read). Checks ``stop`` at least once a
        second. batchtrack runs one listener per store and process, in a thread of its
        own (:mod:`batchtrack._watch`), and wakes every watcher of the batch named.

        What is not a change: a transition that did not apply (:attr:`Outcome.UNCHANGED`,
        :attr:`Outcome.REJECTED`) and a lease renewal (:meth:`renew`) change nothing a
        watcher sees, so they need not be told. A batch that expires without anyone
        removing it is not told either: watchers know its ``expires_at``. A spurious call
        (a batch that did not change) costs a watcher one read and is allowed.

        ``on_change`` returns at once and never raises. Call it from the listening
        thread, not from the threads that make changes: it wakes every watcher of the
        batch, which is not work for a writer's hot path.

        Raises:
            StoreError: The notification connection dropped (the caller falls back to
                polling and calls listen again later).
            NotImplementedError: The store cannot listen (:attr:`can_listen` is False).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot listen for changes")

    @abstractmethod
    def create(self, batch: BatchRecord, items: Sequence[ItemSnapshot]) -> None:
        """Persist a new batch and its items, all pending, in one step.

        Args:
            batch: The batch header (version 0, all items counted as pending).
            items: The items, in order; their ids are unique within the batch.

        Raises:
            StoreError: The batch id exists already, or the store failed.
        """

    def create_keyed(
        self,
        batch: BatchRecord,
        items: Sequence[ItemSnapshot],
        key: str,
        fingerprint: str,
        key_expires_at: float,
    ) -> tuple[str, str] | None:
        """Create a batch under an idempotency key, unless the key holds a live batch.

        The key belongs to ``batch.owner`` (None is an owner of its own). When the key
        was written before, its ``key_expires_at`` is later than ``batch.created_at`` and
        its batch exists and has not expired at ``batch.created_at``: change nothing and
        answer ``(that batch's id, the fingerprint written with it)``. Otherwise (no key,
        an expired key, or a key whose batch is gone) write the key (``batch.batch_id``,
        ``fingerprint``, ``key_expires_at``), replacing the old one, and create the batch
        as :meth:`create` does, both in one atomic step across every process sharing the
        store (two creators racing with one key: one batch); answer None.

        Keys need not outlive ``key_expires_at``; :meth:`purge_expired` may remove them.

        Raises:
            StoreError: The batch id exists already, or the store failed.
            NotImplementedError: The store cannot keep keys (a store written before
                batchtrack could).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot keep idempotency keys")

    @abstractmethod
    def apply(self, batch_id: str, transition: Transition) -> TransitionResult:
        """Apply one item transition atomically, as :class:`Transition` describes.

        Raises:
            BatchNotFound: The batch is missing or expired at ``transition.at``.
            ItemNotFound: The batch has no such item.
            StoreError: The store failed; nothing was applied.
        """

    def apply_all(self, batch_id: str, transitions: Sequence[Transition]) -> list[TransitionResult]:
        """Apply several transitions of one batch's items in one atomic step, in order;
        answer one :class:`TransitionResult` per transition.

        Each transition is judged on its own, exactly as :meth:`apply` would judge it
        right after the ones before it (an item may appear more than once: a start, then
        its completion): one that is :attr:`Outcome.UNCHANGED`, :attr:`Outcome.REJECTED`
        or :attr:`Outcome.PAUSED` changes nothing and does not stop the others. Each
        applied transition counts one version, as if applied one by one. A result's
        header (counts, version, stats, times) is the batch's right after its own
        transition. What users see is the same as the same :meth:`apply` calls in a
        row; the point is the cost: the orchestrator sends an item's completion and the
        next item's start together, in one store round trip (one lock, one SQL
        transaction, one Lua call).

        A batch that is missing (or expired at a transition's ``at``) or an item that is
        not in it fails the whole call, before anything changes.

        This default calls :meth:`apply` once per transition, so it is atomic per
        transition only (an unknown item stops it after the ones before it applied),
        and costs as many round trips; the built-in stores override it.

        Raises:
            BatchNotFound: The batch is missing or expired (nothing applied).
            ItemNotFound: A transition names an item not in the batch (nothing applied,
                except by this default).
            StoreError: The store failed; nothing was applied.
        """
        return [self.apply(batch_id, transition) for transition in transitions]

    def _apply_parts(
        self,
        batch_id: str,
        item_id: str,
        target: Status,
        sources: frozenset[Status],
        at: float,
        error: str | None,
        expires_at_open: float,
        expires_at_finished: float,
        stats: EventStats,
        lease_until: float | None,
    ) -> tuple[Outcome, Status, ItemSnapshot, Progress, int, float, float, Mapping[str, float]]:
        """:meth:`apply` of a start, complete or fail (a lease means a start: one more
        attempt, refused while the batch is paused), answered as ``(outcome, previous,
        item, progress, version, created_at, expires_at, stats)``: what the tracker's
        hot path calls. A store may answer it without building the
        :class:`Transition` (the built-in stores do). ``stats`` may be the tracker's
        ``(origin, lease)`` shorthand (:data:`EventStats`)."""
        if isinstance(stats, tuple):
            stats = _eta.stats_for(target, at, stats[0], stats[1])
        return event_answer(
            self.apply(
                batch_id,
                event_transition(
                    item_id,
                    target,
                    sources,
                    at,
                    error,
                    expires_at_open,
                    expires_at_finished,
                    stats,
                    lease_until,
                ),
            )
        )

    def set_paused(self, batch_id: str, paused: bool, at: float, expires_at_open: float) -> bool:
        """Pause or unpause a batch, atomically.

        Pausing (``paused`` True) a batch that is not finished (``finished_at`` None)
        and not paused, or unpausing (False) a paused one, finished or not: set the
        flag to ``paused``, add one to ``version``, set ``updated_at`` to ``at`` and,
        while the batch is not finished, ``expires_at`` to ``expires_at_open``; answer
        True. Otherwise change nothing and answer False. Items are not touched; a
        paused batch refuses transitions marked :attr:`Transition.unless_paused` until
        it is unpaused.

        Raises:
            BatchNotFound: The batch is missing or expired at ``at``.
            StoreError: The store failed; nothing was changed.
            NotImplementedError: The store cannot pause batches (a store written before
                batchtrack could).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot pause batches")

    def report(
        self,
        batch_id: str,
        item_id: str,
        fraction: float,
        stage: str | None,
        at: float,
        expires_at_open: float,
    ) -> ItemSnapshot:
        """Record how far a processing item is, atomically.

        When the item is ``processing``: set its ``progress`` to ``fraction`` and its
        ``stage`` to ``stage``, add one to the batch's ``version`` (the item counts as
        changed at it, so since-reads and listeners see it), set ``updated_at`` to ``at``
        and ``expires_at`` to ``expires_at_open``; answer the item as it is now. Any other
        status: change nothing and answer the item as it is. Every applied transition of
        an item clears both fields (they are None on any item not processing).

        Raises:
            BatchNotFound: The batch is missing or expired at ``at``.
            ItemNotFound: The batch has no such item.
            StoreError: The store failed; nothing was changed.
            NotImplementedError: The store cannot keep reports (a store written before
                batchtrack could).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot keep progress reports")

    @abstractmethod
    def renew(
        self, batch_id: str, item_id: str, at: float, lease_until: float, expires_at_open: float
    ) -> TransitionResult:
        """Renew a processing item's lease (a heartbeat), atomically.

        If the item is processing: set its lease to ``lease_until``, its last heartbeat to
        ``at``, and the batch's ``expires_at`` to ``expires_at_open`` (the batch is alive);
        the version, ``updated_at`` and everything else stay (:attr:`Outcome.APPLIED`).
        Otherwise change nothing (:attr:`Outcome.REJECTED`).

        Raises:
            BatchNotFound: The batch is missing or expired at ``at``.
            ItemNotFound: The batch has no such item.
            StoreError: The store failed; nothing was changed.
        """

    @abstractmethod
    def apply_many(
        self, batch_id: str, transition: Transition, item_ids: Sequence[str] | None = None
    ) -> BulkResult:
        """Apply one transition to many items of a batch, in one atomic step.

        ``transition.item_id``, ``stats``, ``lost_before`` and ``max_attempts`` are not
        used. With ``item_ids``
        None, every item whose status is in ``transition.sources`` (and not
        ``transition.target``) changes as :meth:`apply` would change it, counted one
        version each. With ``item_ids``, exactly the named items change, and only if
        every one of them is in an allowed source status; otherwise nothing changes and
        :attr:`BulkResult.rejected` names them.

        Raises:
            BatchNotFound: The batch is missing or expired at ``transition.at``.
            ItemNotFound: A named item is not in the batch (nothing changed).
            StoreError: The store failed; nothing was changed.
        """

    @abstractmethod
    def lost(self, now: float, limit: int) -> list[LostItem]:
        """Up to ``limit`` processing items, of any unexpired batch, whose lease ran out.

        Their lease ended at or before ``now``; oldest lease first. Must cost in
        proportion to what it returns (keep an index of leases), not to the number of
        batches or items in the store.
        """

    @abstractmethod
    def open_batches(self, now: float) -> list[str]:
        """The ids of every batch not finished and not expired at ``now``."""

    @abstractmethod
    def load(self, batch_id: str, *, items: bool = True) -> BatchRecord | None:
        """Read a batch, or None when there is none with this id.

        Expired batches not yet purged are returned too: the tracker decides what is
        visible. The record must be consistent: counts equal the items' statuses.

        Args:
            batch_id: The batch to read.
            items: Whether to read the items too (False: header only, O(1)).
        """

    def version_of(self, batch_id: str) -> BatchVersion | None:
        """A batch's version, owner and expiry, or None when there is none with this id.

        What a status poll reads first: when the version is the one of a body it keeps,
        that body is still right. Expired batches not yet purged are returned too. This
        default reads the header with :meth:`load`; a store whose header read costs more
        than these three fields (several of them, a round trip) overrides it.

        A store may also offer ``async def version_of_async(batch_id)``, the same read
        awaited on the running event loop (and ``async def aclose_async_reads()``, closing
        what it opened on that loop): the ASGI app then answers a kept status body on its
        loop, without a thread. Optional; of the built-in stores, only
        :class:`~batchtrack.stores.redis.RedisStore` has it.
        """
        record = self.load(batch_id, items=False)
        if record is None:
            return None
        return BatchVersion(record.version, record.owner, record.expires_at)

    def load_items(self, batch_id: str, query: ItemQuery) -> BatchRecord | None:
        """Read a batch's header and only the items ``query`` selects, or None.

        Like :meth:`load`, expired batches not yet purged are returned too, and the
        header (counts, version, stats) is that of the whole batch, consistent with the
        items returned. Every item remembers the batch version its last change produced;
        ``query.since`` compares with that.

        This default reads the whole batch and filters it, which is correct for any store
        but costs O(batch). The built-in stores override it with indexes, so that a page
        costs O(page) and a ``since`` read O(changes).

        Raises:
            ItemNotFound: ``query.after`` names no item of the batch.
        """
        record = self.load(batch_id)
        if record is None:
            return None
        items: Sequence[ItemSnapshot] = record.items
        if query.after is not None:
            for position, item in enumerate(items):
                if item.id == query.after:
                    items = items[position + 1 :]
                    break
            else:
                raise ItemNotFound(batch_id, query.after)
        if query.status is not None:
            items = [item for item in items if item.status is query.status]
        if query.since is not None:
            changed = self.changed_since(batch_id, query.since)
            items = [item for item in items if item.id in changed]
        if query.limit is not None:
            items = items[: query.limit]
        return attrs.evolve(record, items=tuple(items))

    def changed_since(self, batch_id: str, version: int) -> frozenset[str]:
        """The ids of the items whose last change made the batch's version greater than
        ``version``; what the default :meth:`load_items` uses for ``since``.

        A store that overrides :meth:`load_items` need not implement this. The default
        cannot know and answers with every item (a ``since`` read then returns all items
        matching the other conditions: more than needed, never less).
        """
        record = self.load(batch_id)
        return frozenset() if record is None else frozenset(item.id for item in record.items)

    @abstractmethod
    def list_batches(
        self, owner: str | None, now: float, limit: int, after: str | None
    ) -> list[BatchRecord]:
        """Headers (no items) of up to ``limit`` batches, newest first.

        Newest first means by ``created_at`` descending, then by ``batch_id``
        descending among batches created at the same moment: one total order, so that
        pages meet without gaps or repeats while batches are created between them.
        Batches with ``expires_at <= now`` are left out (they may still be stored).
        Each record carries its metadata.

        The cost is that of the page, not of the store: stores keep an index per owner
        (and one over every batch) in creation order, written in the step that creates
        or removes a batch.

        Args:
            owner: Only this owner's batches; None: every batch, whoever owns it.
            now: The tracker's clock, for expiry.
            limit: At most this many records (>= 1).
            after: Only batches after this one in the order above (a batch id from an
                earlier page); None: from the newest.

        Raises:
            BatchNotFound: ``after`` names no batch the index holds (never created,
                another owner's, or removed since).
        """

    @abstractmethod
    def delete(self, batch_id: str) -> bool:
        """Remove a batch and its items (and its end markers); True if there was one."""

    @abstractmethod
    def purge_expired(self, now: float) -> int:
        """Remove every batch with ``expires_at <= now`` (and its end markers; deliveries
        made of them stay until settled); return how many."""

    @abstractmethod
    def expired(self, now: float, limit: int) -> list[str]:
        """The ids of up to ``limit`` batches with ``expires_at <= now``, not yet removed.

        For the tracker's cleanup hooks, which need a batch's items before it goes.
        """

    # -- the outbox (webhooks) ----------------------------------------------------------

    def outbox_claim(self, now: float, limit: int, lease_until: float) -> list[OutboxEntry]:
        """Claim up to ``limit`` outbox entries that are due, atomically.

        An entry is due when its next attempt time is at or before ``now`` and it holds no
        lease, or one that ran out at or before ``now``. Set the lease of each entry
        claimed to ``lease_until`` and answer them, earliest due first. Two claimers never
        both hold one entry; an entry whose lease runs out before it is settled
        (:meth:`outbox_done`, :meth:`outbox_retry`, :meth:`outbox_expand`) is claimed
        again: delivery is at least once.

        Raises:
            StoreError: The store failed; nothing was claimed.
            NotImplementedError: The store has no outbox (a store written before
                batchtrack had one).
        """
        raise NotImplementedError(f"{type(self).__name__} has no outbox for webhooks")

    def outbox_expand(self, entry_id: str, deliveries: Sequence[OutboxEntry], at: float) -> None:
        """Replace a marker with its ``deliveries`` in one atomic step: remove the entry
        ``entry_id`` and add each delivery (due at ``at``, no lease, its attempts), keeping
        one already there under the same ``entry_id`` as it is.

        Raises:
            StoreError: The store failed; nothing was changed.
            NotImplementedError: The store has no outbox.
        """
        raise NotImplementedError(f"{type(self).__name__} has no outbox for webhooks")

    def outbox_done(self, entry_id: str) -> None:
        """Remove an outbox entry (delivered, or given up); nothing if it is gone.

        Raises:
            StoreError: The store failed.
            NotImplementedError: The store has no outbox.
        """
        raise NotImplementedError(f"{type(self).__name__} has no outbox for webhooks")

    def outbox_retry(self, entry_id: str, attempts: int, next_at: float) -> None:
        """Record a failed attempt: set the entry's attempts to ``attempts``, make it due
        at ``next_at`` and drop its lease; nothing if it is gone.

        Raises:
            StoreError: The store failed.
            NotImplementedError: The store has no outbox.
        """
        raise NotImplementedError(f"{type(self).__name__} has no outbox for webhooks")

    def outbox_unsubscribe(self, url: str) -> None:
        """Remember that ``url`` unsubscribed (it answered 410), for every process and
        restart, and remove the deliveries waiting for it.

        Raises:
            StoreError: The store failed.
            NotImplementedError: The store has no outbox.
        """
        raise NotImplementedError(f"{type(self).__name__} has no outbox for webhooks")

    def outbox_unsubscribed(self) -> frozenset[str]:
        """Every URL :meth:`outbox_unsubscribe` was given.

        Raises:
            StoreError: The store failed.
            NotImplementedError: The store has no outbox.
        """
        raise NotImplementedError(f"{type(self).__name__} has no outbox for webhooks")

    def close(self) -> None:
        """Release connections and files. The store is not used after this."""


def event_transition(
    item_id: str,
    target: Status,
    sources: frozenset[Status],
    at: float,
    error: str | None,
    expires_at_open: float,
    expires_at_finished: float,
    stats: Mapping[Status, Mapping[str, tuple[float, int]]],
    lease_until: float | None,
) -> Transition:
    """The :class:`Transition` of a tracker's start, complete or fail (a lease means a
    start: one more attempt, refused while the batch is paused)."""
    return Transition(
        item_id,
        target,
        sources,
        at,
        error,
        expires_at_open,
        expires_at_finished,
        stats,
        lease_until,
        lease_until is not None,
        unless_paused=lease_until is not None,
    )


def event_answer(
    r: TransitionResult,
) -> tuple[Outcome, Status, ItemSnapshot, Progress, int, float, float, Mapping[str, float]]:
    """A transition's result as the tracker's event path takes it: ``(outcome,
    previous, item, progress, version, created_at, expires_at, stats)``."""
    return (
        r.outcome,
        r.previous,
        r.item,
        r.progress,
        r.version,
        r.created_at,
        r.expires_at,
        r.stats,
    )
