"""Statuses, progress counts and the exact JSON body of a snapshot."""

from __future__ import annotations

import json
import weakref
from datetime import datetime, timedelta, timezone

import attrs
import pytest

from batchtrack import BatchSnapshot, ItemSnapshot, Progress, ProgressEvent, Status
from batchtrack._models import _item_snapshot, _progress, iso_utc


def test_status_is_a_str_enum() -> None:
    """Status members equal their strings and serialise to JSON as them."""
    assert Status.COMPLETED == "completed"
    assert str(Status.FAILED) == "failed"
    assert json.dumps({"s": Status.PROCESSING}) == '{"s": "processing"}'
    assert [s.value for s in Status] == [
        "pending",
        "processing",
        "completed",
        "failed",
        "cancelled",
        "paused",
    ]


def test_only_completed_failed_and_cancelled_are_final() -> None:
    """is_final is true for completed, failed and cancelled only."""
    assert [s for s in Status if s.is_final] == [
        Status.COMPLETED,
        Status.FAILED,
        Status.CANCELLED,
    ]


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ({"pending": 3}, Status.PENDING),
        ({"pending": 2, "processing": 1}, Status.PROCESSING),
        ({"pending": 2, "completed": 1}, Status.PROCESSING),
        ({"processing": 1, "failed": 2}, Status.PROCESSING),
        ({"completed": 3}, Status.COMPLETED),
        ({"completed": 1, "failed": 2}, Status.COMPLETED),
        ({"failed": 3}, Status.FAILED),
        ({"completed": 2, "cancelled": 1}, Status.CANCELLED),
        ({"failed": 2, "cancelled": 1}, Status.CANCELLED),
        ({"cancelled": 3}, Status.CANCELLED),
        ({"processing": 1, "cancelled": 2}, Status.PROCESSING),
    ],
)
def test_batch_status_is_derived_from_counts(counts: dict[str, int], expected: Status) -> None:
    """The batch status follows the contract's derivation rule."""
    assert Progress(total=3, **counts).status is expected


def test_values_are_frozen() -> None:
    """Snapshots, items and progress cannot be changed after creation."""
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        Progress(total=1).total = 2  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        ItemSnapshot("i", "a.jpg").status = Status.FAILED  # type: ignore[misc]


def test_iso_timestamps_are_utc_with_z() -> None:
    """Timestamps are ISO 8601 in UTC ending in Z, whatever zone the datetime is in."""
    moment = datetime(2025, 11, 25, 11, 0, 0, 123456, tzinfo=timezone(timedelta(hours=1)))
    assert iso_utc(moment) == "2025-11-25T10:00:00.123Z"
    assert iso_utc(None) is None


def test_to_dict_matches_the_contract_key_by_key() -> None:
    """to_dict produces exactly the status endpoint's JSON body."""
    created = datetime(2025, 11, 25, 10, 0, 0, tzinfo=timezone.utc)
    snap = BatchSnapshot(
        batch_id="b-1",
        status=Status.PROCESSING,
        progress=Progress(total=3, completed=1, failed=1, processing=0, pending=1),
        items=(
            ItemSnapshot("i1", "image1.jpg", Status.COMPLETED),
            ItemSnapshot("i2", "image2.jpg", Status.PENDING),
            ItemSnapshot("i3", "image3.jpg", Status.FAILED, "not an image"),
        ),
        estimated_time_remaining=30,
        created_at=created,
        updated_at=created + timedelta(seconds=4.5),
        finished_at=None,
        eta_range=(20, 45),
    )
    body = json.loads(json.dumps(snap.to_dict()))
    assert list(body) == [
        "batchId",
        "status",
        "progress",
        "images",
        "estimatedTimeRemaining",
        "estimatedTimeRemainingRange",
        "createdAt",
        "updatedAt",
        "finishedAt",
    ]
    assert body["batchId"] == "b-1"
    assert body["status"] == "processing"
    assert body["progress"] == {
        "total": 3,
        "completed": 1,
        "failed": 1,
        "processing": 0,
        "pending": 1,
        "cancelled": 0,
    }
    assert body["images"] == [
        {"id": "i1", "filename": "image1.jpg", "status": "completed"},
        {"id": "i2", "filename": "image2.jpg", "status": "pending"},
        {"id": "i3", "filename": "image3.jpg", "status": "failed", "error": "not an image"},
    ]
    assert body["estimatedTimeRemaining"] == 30
    assert body["estimatedTimeRemainingRange"] == [20, 45]
    assert body["createdAt"] == "2025-11-25T10:00:00.000Z"
    assert body["updatedAt"] == "2025-11-25T10:00:04.500Z"
    assert body["finishedAt"] is None


def test_progress_events_work_out_their_eta_as_of_their_own_moment() -> None:
    """An event's ETA, read late, is the one of its transition: later transitions and the
    clock moving on do not change it; read at once it is the same value."""
    import pickle

    from batchtrack import BatchTracker
    from batchtrack.testing import FakeClock

    def run(read_at_once: bool) -> list[ProgressEvent]:
        clock = FakeClock(1000.0)
        tracker = BatchTracker(clock=clock)
        snap = tracker.create_batch([(str(n), f"{n}.jpg") for n in range(6)])
        events = []
        for n in range(5):
            tracker.start_item(snap.batch_id, str(n))
            clock.advance(1.5 + n)
            event = tracker.complete_item(snap.batch_id, str(n))
            if read_at_once:
                assert event.estimated_time_remaining is not None
            events.append(event)
        clock.advance(500)
        return events

    late, early = run(False), run(True)
    assert [e.estimated_time_remaining for e in late] == [e.estimated_time_remaining for e in early]
    assert [e.eta_range for e in late] == [e.eta_range for e in early]
    assert [(e.item, e.progress, e.version) for e in late] == [
        (e.item, e.progress, e.version) for e in early
    ]
    first = late[0]
    plain = ProgressEvent(
        first.batch_id,
        first.item,
        first.progress,
        first.estimated_time_remaining,
        first.changed,
        first.version,
        first.eta_range,
    )
    assert plain == first
    assert hash(plain) == hash(first)
    assert pickle.loads(pickle.dumps(first)) == first
    assert "estimated_time_remaining=" in repr(first)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        first.version = 9  # type: ignore[misc]
    assert first.status is first.progress.status


def test_fast_constructors_make_the_same_frozen_values_as_the_public_ones() -> None:
    """The stores' private fast constructors make snapshots and counts indistinguishable
    from the public constructors': equal, same hash, repr, pickle, JSON and frozenness."""
    import pickle

    for error, attempts, source in ((None, 0, None), ("boom", 2, "s3://b/k")):
        fast = _item_snapshot("i", "a.jpg", Status.FAILED, error, attempts, source)
        public = ItemSnapshot("i", "a.jpg", Status.FAILED, error, attempts, source)
        assert type(fast) is ItemSnapshot
        assert fast == public
        assert hash(fast) == hash(public)
        assert repr(fast) == repr(public)
        assert pickle.loads(pickle.dumps(fast)) == public
        assert fast.to_dict() == public.to_dict()
        assert fast.progress is None
        assert fast.stage is None
        assert fast._json is None
        assert attrs.evolve(fast, attempts=5) == attrs.evolve(public, attempts=5)
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            fast.status = Status.COMPLETED  # type: ignore[misc]
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            del fast.status  # type: ignore[misc]
        assert weakref.ref(fast)() is fast
    counts = (7, 1, 2, 3, 1, 0)
    fast_progress, public_progress = _progress(*counts), Progress(*counts)
    assert type(fast_progress) is Progress
    assert fast_progress == public_progress
    assert hash(fast_progress) == hash(public_progress)
    assert repr(fast_progress) == repr(public_progress)
    assert pickle.loads(pickle.dumps(fast_progress)) == public_progress
    assert fast_progress.to_dict() == public_progress.to_dict()
    assert fast_progress.status is public_progress.status
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        fast_progress.total = 8  # type: ignore[misc]
