"""Property tests: any sequence of events keeps the counts honest, on every store."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchtrack import BatchTracker, InvalidTransition, Status
from batchtrack.stores.base import Store
from batchtrack.testing.strategies import event_sequences, item_lists

StoreFactory = Callable[[], Store]


# store_factory makes a fresh store on every call, so sharing it across examples is safe;
# each example closes its own (a server allows only so many connections at once).
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), items=item_lists(max_size=8))
def test_any_event_sequence_keeps_counts_equal_to_item_statuses(
    store_factory: StoreFactory, data: st.DataObject, items: list[object]
) -> None:
    """Whatever events arrive, valid or not, each count equals the items in that status."""
    # Drawn before the store exists: a store's own threads (PostgreSQL's pool) may use the
    # random module, which Hypothesis refuses to see while it draws.
    events = data.draw(event_sequences(len(items)))
    with store_factory() as store:
        _check_any_event_sequence(BatchTracker(store), events, items)


def _check_any_event_sequence(
    tracker: BatchTracker, events: list[tuple[str, int, str | None]], items: list[object]
) -> None:
    snap = tracker.create_batch(items)  # type: ignore[arg-type]
    ids = [item.id for item in snap.items]
    applied = 0
    for action, index, error in events:
        try:
            if action == "start":
                event = tracker.start_item(snap.batch_id, ids[index])
            elif action == "complete":
                event = tracker.complete_item(snap.batch_id, ids[index])
            else:
                assert error is not None
                event = tracker.fail_item(snap.batch_id, ids[index], error)
        except InvalidTransition:
            continue
        applied += event.changed
    final = tracker.get(snap.batch_id)
    p = final.progress
    assert p.total == len(ids) == p.completed + p.failed + p.processing + p.pending + p.cancelled
    for status, count in [
        (Status.COMPLETED, p.completed),
        (Status.FAILED, p.failed),
        (Status.PROCESSING, p.processing),
        (Status.PENDING, p.pending),
    ]:
        assert count == sum(1 for item in final.items if item.status is status)
    assert final.version == applied
    # Every item moved at most twice: pending -> processing -> final.
    assert applied <= 2 * len(ids)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), items=item_lists(max_size=8))
def test_cancel_retry_and_pause_among_events_keep_counts_partitioning_the_total(
    store_factory: StoreFactory, data: st.DataObject, items: list[object]
) -> None:
    """With cancel, retry, pause and unpause mixed into any events, the five counts
    always partition the total, each equals its items, and every change is one version."""
    # Drawn before the store exists: a store's own threads (PostgreSQL's pool) may use the
    # random module, which Hypothesis refuses to see while it draws.
    events = data.draw(event_sequences(len(items), batch_actions=True))
    with store_factory() as store:
        tracker = BatchTracker(store)
        snap = tracker.create_batch(items)  # type: ignore[arg-type]
        batch_id, ids = snap.batch_id, [item.id for item in snap.items]
        changes = 0
        for action, index, error in events:
            try:
                if action == "start":
                    changes += tracker.start_item(batch_id, ids[index]).changed
                elif action == "complete":
                    changes += tracker.complete_item(batch_id, ids[index]).changed
                elif action == "fail":
                    assert error is not None
                    changes += tracker.fail_item(batch_id, ids[index], error).changed
                elif action == "cancel":
                    changes += tracker.cancel(batch_id)
                elif action == "retry":
                    changes += tracker.retry(batch_id)
                else:
                    changes += getattr(tracker, action)(batch_id)
            except InvalidTransition:
                continue
            p = tracker.get(batch_id, items=False).progress
            assert p.total == p.completed + p.failed + p.processing + p.pending + p.cancelled
        final = tracker.get(batch_id)
        for status in (s for s in Status if s is not Status.PAUSED):
            count = getattr(final.progress, status.value)
            assert count == sum(1 for item in final.items if item.status is status)
        assert final.version == changes
        assert (final.status is Status.CANCELLED) == (
            final.finished_at is not None
            and final.progress.cancelled > 0
            and final.progress.failed < len(ids)
        )
