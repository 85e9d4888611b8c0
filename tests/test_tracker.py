"""BatchTracker's rules, run against every store."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest

from batchtrack import (
    BatchNotFound,
    BatchSnapshot,
    BatchTracker,
    BatchtrackError,
    InputsGone,
    InvalidTransition,
    Item,
    ItemNotFound,
    MemoryStore,
    ProgressEvent,
    Status,
    ValidationError,
)
from batchtrack.testing import FakeClock


def _ids(snap: BatchSnapshot) -> list[str]:
    return [item.id for item in snap.items]


def _actions(
    tracker: BatchTracker, batch_id: str, item_id: str, error: str
) -> dict[str, Callable[[], ProgressEvent]]:
    """The three transitions of one item, by name."""
    return {
        "start": lambda: tracker.start_item(batch_id, item_id),
        "complete": lambda: tracker.complete_item(batch_id, item_id),
        "fail": lambda: tracker.fail_item(batch_id, item_id, error),
    }


def _state(tracker: BatchTracker, batch_id: str) -> dict[str, object]:
    """Everything a caller can observe about a batch, for before/after comparisons."""
    snap = tracker.get(batch_id)
    return {"dict": snap.to_dict(), "version": snap.version}


# -- creating batches ----------------------------------------------------------------


def test_create_batch_makes_every_item_pending(tracker: BatchTracker) -> None:
    """A new batch is pending, with every item pending and counted as such."""
    snap = tracker.create_batch(["a.jpg", "b.jpg", "c.jpg"])
    assert snap.status is Status.PENDING
    assert [i.filename for i in snap.items] == ["a.jpg", "b.jpg", "c.jpg"]
    assert all(i.status is Status.PENDING and i.error is None for i in snap.items)
    assert (snap.progress.total, snap.progress.pending) == (3, 3)
    assert snap.estimated_time_remaining is None
    assert snap.finished_at is None


def test_generated_ids_are_uuid4(tracker: BatchTracker) -> None:
    """Batch ids and generated item ids are UUID4 strings."""
    snap = tracker.create_batch(["a.jpg", "b.jpg"])
    for value in [snap.batch_id, *_ids(snap)]:
        assert uuid.UUID(value).version == 4
        assert str(uuid.UUID(value)) == value


def test_items_may_bring_their_own_ids(tracker: BatchTracker) -> None:
    """(item_id, filename) pairs keep the caller's ids, mixed with plain filenames."""
    snap = tracker.create_batch([("upload-1", "a.jpg"), "b.jpg"])
    assert snap.items[0].id == "upload-1"
    assert snap.items[1].filename == "b.jpg"


def test_created_and_updated_times_come_from_the_clock(
    tracker: BatchTracker, clock: FakeClock
) -> None:
    """Times are timezone-aware UTC datetimes from the injected clock."""
    snap = tracker.create_batch(["a.jpg"])
    expected = datetime.fromtimestamp(clock(), tz=timezone.utc)
    assert snap.created_at == expected == snap.updated_at
    assert snap.created_at.tzinfo is not None


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([], "at least one item"),
        ([""], "must not be empty"),
        (["   "], "must not be empty"),
        ([None], "must be a string"),
        ([b"a.jpg"], "must be a string"),
        (["a\nb.jpg"], "line breaks"),
        ([("x", "a.jpg"), ("x", "b.jpg")], "more than once"),
        ([("", "a.jpg")], "id must not be empty"),
        ([("x", "a.jpg", "extra")], "expected (item_id, filename)"),
        (["x" * 2000], "longer than"),
        ("a.jpg", "iterable of filenames"),
        (42, "iterable of filenames"),
    ],
)
def test_create_batch_rejects_bad_items(tracker: BatchTracker, items: object, message: str) -> None:
    """Bad item lists raise ValidationError saying what was wrong."""
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tracker.create_batch(items)  # type: ignore[arg-type]


def test_rejected_create_leaves_nothing_behind(tracker: BatchTracker, clock: FakeClock) -> None:
    """A rejected create_batch stores nothing: there is nothing to clean up afterwards."""
    with pytest.raises(ValidationError):
        tracker.create_batch(["a.jpg", ("dup", "b.jpg"), ("dup", "c.jpg")])
    clock.advance(10 * 24 * 3600)
    assert tracker.cleanup() == 0


@pytest.mark.parametrize("owner", ["", 3, b"me"])
def test_create_batch_rejects_bad_owner(tracker: BatchTracker, owner: object) -> None:
    """An owner must be a non-empty string or None."""
    with pytest.raises(ValidationError, match="owner"):
        tracker.create_batch(["a.jpg"], owner=owner)  # type: ignore[arg-type]


# -- transitions ------------------------------------------------------------------------


def test_start_then_complete(tracker: BatchTracker) -> None:
    """An item goes pending -> processing -> completed and the counts follow."""
    snap = tracker.create_batch(["a.jpg", "b.jpg"])
    item = snap.items[0].id
    ev = tracker.start_item(snap.batch_id, item)
    assert ev.item.status is Status.PROCESSING
    assert ev.progress.processing == 1
    assert ev.progress.pending == 1
    assert ev.status is Status.PROCESSING
    assert ev.changed
    ev = tracker.complete_item(snap.batch_id, item)
    assert ev.item.status is Status.COMPLETED
    assert (ev.progress.completed, ev.progress.processing, ev.progress.pending) == (1, 0, 1)


def test_fail_records_the_error(tracker: BatchTracker) -> None:
    """A failed item carries its error text, in the snapshot and in to_dict."""
    snap = tracker.create_batch(["a.jpg"])
    item = snap.items[0].id
    tracker.start_item(snap.batch_id, item)
    ev = tracker.fail_item(snap.batch_id, item, "not an image")
    assert ev.item.error == "not an image"
    body = tracker.get(snap.batch_id).to_dict()
    assert body["images"][0]["error"] == "not an image"
    assert body["status"] == "failed"


def test_pending_item_can_fail_directly(tracker: BatchTracker) -> None:
    """pending -> failed is allowed (cancelled or rejected before it started)."""
    snap = tracker.create_batch(["a.jpg", "b.jpg"])
    ev = tracker.fail_item(snap.batch_id, snap.items[0].id, "cancelled")
    assert ev.progress.failed == 1
    assert ev.progress.pending == 1


@pytest.mark.parametrize(
    ("setup", "call"),
    [
        ([], "complete"),  # pending -> completed skips processing
        (["start", "complete"], "start"),
        (["start", "complete"], "fail"),
        (["start", "fail"], "start"),
        (["start", "fail"], "complete"),
        (["fail"], "start"),
        (["fail"], "complete"),
    ],
)
def test_invalid_transitions_raise_and_change_nothing(
    tracker: BatchTracker, setup: list[str], call: str
) -> None:
    """Transitions outside the table raise InvalidTransition and leave the batch as it was."""
    snap = tracker.create_batch(["a.jpg", "b.jpg"])
    bid, item = snap.batch_id, snap.items[0].id
    actions = _actions(tracker, bid, item, "boom")
    for step in setup:
        actions[step]()
    before = _state(tracker, bid)
    with pytest.raises(InvalidTransition) as info:
        actions[call]()
    assert info.value.item_id == item
    assert _state(tracker, bid) == before


@pytest.mark.parametrize(
    ("setup", "repeat"),
    [(["start"], "start"), (["start", "complete"], "complete"), (["fail"], "fail")],
)
def test_repeated_transition_is_a_noop(
    tracker: BatchTracker, setup: list[str], repeat: str
) -> None:
    """Repeating the transition an item already made counts nothing twice (at-least-once)."""
    snap = tracker.create_batch(["a.jpg", "b.jpg"])
    bid, item = snap.batch_id, snap.items[0].id
    actions = _actions(tracker, bid, item, "first error")
    for step in setup:
        actions[step]()
    before = _state(tracker, bid)
    ev = actions[repeat]()
    assert not ev.changed
    assert _state(tracker, bid) == before


def test_failing_twice_keeps_the_first_error(tracker: BatchTracker) -> None:
    """A second fail_item with another message is a no-op; the first error stays."""
    snap = tracker.create_batch(["a.jpg"])
    bid, item = snap.batch_id, snap.items[0].id
    tracker.fail_item(bid, item, "first")
    ev = tracker.fail_item(bid, item, "second")
    assert ev.item.error == "first"


@pytest.mark.parametrize("error", [None, 3, b"bytes", "", "   "])
def test_fail_item_rejects_bad_error(tracker: BatchTracker, error: object) -> None:
    """The error must be a non-empty string; nothing changes otherwise."""
    snap = tracker.create_batch(["a.jpg"])
    before = _state(tracker, snap.batch_id)
    with pytest.raises(ValidationError, match="error"):
        tracker.fail_item(snap.batch_id, snap.items[0].id, error)  # type: ignore[arg-type]
    assert _state(tracker, snap.batch_id) == before


def test_long_error_is_cut(tracker: BatchTracker) -> None:
    """Error messages longer than 1000 characters are cut, ending in an ellipsis."""
    snap = tracker.create_batch(["a.jpg"])
    ev = tracker.fail_item(snap.batch_id, snap.items[0].id, "x" * 5000)
    assert ev.item.error is not None
    assert len(ev.item.error) == 1000
    assert ev.item.error.endswith("…")


def test_unknown_batch_raises_batch_not_found(tracker: BatchTracker) -> None:
    """Every method taking a batch id raises BatchNotFound for an unknown one."""
    unknown = str(uuid.uuid4())
    for call in (
        lambda: tracker.get(unknown),
        lambda: tracker.start_item(unknown, "x"),
        lambda: tracker.complete_item(unknown, "x"),
        lambda: tracker.fail_item(unknown, "x", "boom"),
    ):
        with pytest.raises(BatchNotFound) as info:
            call()
        assert isinstance(info.value, LookupError)
        assert isinstance(info.value, BatchtrackError)
    assert tracker.delete(unknown) is False


def test_unknown_item_raises_item_not_found(tracker: BatchTracker) -> None:
    """An item id the batch does not have raises ItemNotFound, a LookupError."""
    snap = tracker.create_batch(["a.jpg"])
    with pytest.raises(ItemNotFound, match="nope") as info:
        tracker.start_item(snap.batch_id, "nope")
    assert isinstance(info.value, LookupError)


@pytest.mark.parametrize("bad", [None, 7, b"id"])
def test_non_string_ids_are_validation_errors(tracker: BatchTracker, bad: object) -> None:
    """Ids of the wrong type are rejected as bad input, not looked up."""
    snap = tracker.create_batch(["a.jpg"])
    with pytest.raises(ValidationError):
        tracker.get(bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        tracker.start_item(snap.batch_id, bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        tracker.start_item(bad, snap.items[0].id)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        tracker.delete(bad)  # type: ignore[arg-type]


# -- batch status -------------------------------------------------------------------------


def test_batch_completes_when_every_item_is_final(tracker: BatchTracker, clock: FakeClock) -> None:
    """With one success and one failure the batch is completed, finished_at set."""
    snap = tracker.create_batch(["a.jpg", "b.jpg"])
    bid, (a, b) = snap.batch_id, _ids(snap)
    tracker.start_item(bid, a)
    tracker.complete_item(bid, a)
    clock.advance(5)
    tracker.start_item(bid, b)
    ev = tracker.fail_item(bid, b, "broken")
    assert ev.status is Status.COMPLETED
    assert ev.estimated_time_remaining == 0
    final = tracker.get(bid)
    assert final.status is Status.COMPLETED
    assert final.finished_at == datetime.fromtimestamp(clock(), tz=timezone.utc)


def test_batch_fails_when_every_item_failed(tracker: BatchTracker) -> None:
    """A batch whose items all failed is failed."""
    snap = tracker.create_batch(["a.jpg", "b.jpg"])
    for item in _ids(snap):
        tracker.fail_item(snap.batch_id, item, "cancelled")
    assert tracker.get(snap.batch_id).status is Status.FAILED


def test_batch_is_processing_once_an_item_is_final_and_others_pending(
    tracker: BatchTracker,
) -> None:
    """A final item with pending ones left makes the batch processing, not pending."""
    snap = tracker.create_batch(["a.jpg", "b.jpg"])
    tracker.fail_item(snap.batch_id, snap.items[0].id, "cancelled")
    assert tracker.get(snap.batch_id).status is Status.PROCESSING


def test_version_counts_applied_transitions(tracker: BatchTracker) -> None:
    """The version grows by one per applied transition and not on repeats."""
    snap = tracker.create_batch(["a.jpg"])
    bid, item = snap.batch_id, snap.items[0].id
    assert snap.version == 0
    assert tracker.start_item(bid, item).version == 1
    assert tracker.start_item(bid, item).version == 1
    assert tracker.complete_item(bid, item).version == 2
    assert tracker.get(bid).version == 2


def test_header_only_read_has_counts_but_no_items(tracker: BatchTracker) -> None:
    """get(items=False) returns counts, status and ETA without the item list."""
    snap = tracker.create_batch(["a.jpg", "b.jpg"])
    tracker.start_item(snap.batch_id, snap.items[0].id)
    head = tracker.get(snap.batch_id, items=False)
    assert head.items == ()
    assert head.progress.processing == 1
    assert head.status is Status.PROCESSING


# -- ETA -----------------------------------------------------------------------------------


def test_eta_is_none_until_an_item_is_final(tracker: BatchTracker, clock: FakeClock) -> None:
    """No estimate before the first item is final, even with items processing."""
    snap = tracker.create_batch(["a.jpg", "b.jpg"])
    clock.advance(3)
    ev = tracker.start_item(snap.batch_id, snap.items[0].id)
    assert ev.estimated_time_remaining is None
    assert tracker.get(snap.batch_id).estimated_time_remaining is None


def test_eta_is_a_whole_number_of_seconds_from_throughput(
    tracker: BatchTracker, clock: FakeClock
) -> None:
    """After items finish at a steady pace, the ETA is a positive int near the truth."""
    snap = tracker.create_batch([f"{i}.jpg" for i in range(10)])
    for item in _ids(snap)[:5]:
        tracker.start_item(snap.batch_id, item)
        clock.advance(2)
        ev = tracker.complete_item(snap.batch_id, item)
    assert isinstance(ev.estimated_time_remaining, int)
    assert 8 <= ev.estimated_time_remaining <= 12  # 5 items left at 2 s each


# -- ownership -------------------------------------------------------------------------------


def test_other_owner_sees_not_found(tracker: BatchTracker) -> None:
    """Another owner gets BatchNotFound, exactly as for an id that never existed."""
    snap = tracker.create_batch(["a.jpg"], owner="alice")
    with pytest.raises(BatchNotFound) as other:
        tracker.get(snap.batch_id, owner="bob")
    with pytest.raises(BatchNotFound) as unknown:
        tracker.get(str(uuid.uuid4()), owner="bob")
    assert type(other.value) is type(unknown.value)
    assert str(other.value).replace(snap.batch_id, "X") == str(unknown.value).replace(
        unknown.value.batch_id, "X"
    )


def test_owner_and_trusted_caller_see_the_batch(tracker: BatchTracker) -> None:
    """The owner, and a trusted caller passing no owner, both see the batch."""
    snap = tracker.create_batch(["a.jpg"], owner="alice")
    assert tracker.get(snap.batch_id, owner="alice").owner == "alice"
    assert tracker.get(snap.batch_id).batch_id == snap.batch_id


def test_unowned_batch_is_hidden_from_a_named_owner(tracker: BatchTracker) -> None:
    """A batch created without owner is not shown to a caller that names one."""
    snap = tracker.create_batch(["a.jpg"])
    with pytest.raises(BatchNotFound):
        tracker.get(snap.batch_id, owner="alice")


# -- expiry ------------------------------------------------------------------------------------


def _finish(tracker: BatchTracker, snap: BatchSnapshot) -> None:
    for item in _ids(snap):
        tracker.start_item(snap.batch_id, item)
        tracker.complete_item(snap.batch_id, item)


def test_finished_batch_is_gone_ttl_after_finishing(
    tracker: BatchTracker, clock: FakeClock
) -> None:
    """get raises BatchNotFound from ttl seconds after the batch finished, without a sweep."""
    snap = tracker.create_batch(["a.jpg"])
    clock.advance(100)
    _finish(tracker, snap)
    clock.advance(3600 - 0.001)
    assert tracker.get(snap.batch_id).status is Status.COMPLETED
    clock.advance(0.001)
    with pytest.raises(BatchNotFound):
        tracker.get(snap.batch_id)


def test_repeat_on_expired_batch_is_not_found(tracker: BatchTracker, clock: FakeClock) -> None:
    """A late repeated completion of an expired batch raises BatchNotFound."""
    snap = tracker.create_batch(["a.jpg"])
    _finish(tracker, snap)
    clock.advance(3600)
    with pytest.raises(BatchNotFound):
        tracker.complete_item(snap.batch_id, snap.items[0].id)


def test_idle_unfinished_batch_is_gone_after_24_hours(
    tracker: BatchTracker, clock: FakeClock
) -> None:
    """An unfinished batch with no update for 24 hours is gone, for reads and transitions."""
    snap = tracker.create_batch(["a.jpg", "b.jpg"])
    clock.advance(12 * 3600)
    tracker.start_item(snap.batch_id, snap.items[0].id)  # an update restarts the 24 h
    clock.advance(24 * 3600 - 1)
    assert tracker.get(snap.batch_id).progress.processing == 1
    clock.advance(1)
    with pytest.raises(BatchNotFound):
        tracker.get(snap.batch_id)
    with pytest.raises(BatchNotFound):
        tracker.complete_item(snap.batch_id, snap.items[0].id)


def test_cleanup_removes_only_expired_batches(tracker: BatchTracker, clock: FakeClock) -> None:
    """cleanup() removes expired batches, counts them, and keeps live ones."""
    done = tracker.create_batch(["a.jpg"])
    _finish(tracker, done)
    live = tracker.create_batch(["b.jpg"])
    clock.advance(3600)
    assert tracker.cleanup() == 1
    assert tracker.cleanup() == 0
    assert tracker.get(live.batch_id).status is Status.PENDING
    assert tracker.store.load(done.batch_id) is None


def test_delete_removes_a_batch(tracker: BatchTracker) -> None:
    """delete() returns True once, then the batch is not found."""
    snap = tracker.create_batch(["a.jpg"])
    assert tracker.delete(snap.batch_id) is True
    assert tracker.delete(snap.batch_id) is False
    with pytest.raises(BatchNotFound):
        tracker.get(snap.batch_id)


def test_delete_of_expired_batch_returns_false(tracker: BatchTracker, clock: FakeClock) -> None:
    """Deleting a batch that already expired reports False, as it was not visible."""
    snap = tracker.create_batch(["a.jpg"])
    _finish(tracker, snap)
    clock.advance(3600)
    assert tracker.delete(snap.batch_id) is False
    assert tracker.store.load(snap.batch_id) is None


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf"), "60", None, True])
def test_bad_ttl_is_rejected(ttl: object) -> None:
    """ttl must be a positive finite number of seconds."""
    with pytest.raises(ValidationError, match="ttl"):
        BatchTracker(ttl=ttl)  # type: ignore[arg-type]


def test_bad_store_and_clock_are_rejected() -> None:
    """A store that is not a Store, or a clock that is not callable, is refused."""
    with pytest.raises(ValidationError, match="store"):
        BatchTracker({})  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="clock"):
        BatchTracker(clock=5)  # type: ignore[arg-type]


def test_sweeper_runs_cleanup_in_the_background(clock: FakeClock) -> None:
    """start_sweeper removes expired batches on its own; the context manager stops it."""
    with BatchTracker(ttl=1.0, clock=clock) as tracker:
        snap = tracker.create_batch(["a.jpg"])
        _finish(tracker, snap)
        clock.advance(5)
        tracker.start_sweeper(interval=0.01)
        deadline = time.monotonic() + 5
        while tracker.store.load(snap.batch_id) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tracker.store.load(snap.batch_id) is None
    assert not any(t.name == "batchtrack-sweeper" for t in threading.enumerate())


def test_sweeper_cannot_start_twice_and_stops_idempotently() -> None:
    """A second start_sweeper raises; stop_sweeper may be called any number of times."""
    tracker = BatchTracker()
    tracker.start_sweeper(interval=60)
    try:
        with pytest.raises(RuntimeError, match="already running"):
            tracker.start_sweeper(interval=60)
    finally:
        tracker.stop_sweeper()
    tracker.stop_sweeper()
    with pytest.raises(ValidationError, match="interval"):
        tracker.start_sweeper(interval=0)


def test_sweeper_survives_a_failing_store(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A cleanup that raises is logged and the sweeper keeps running."""
    calls: list[float] = []

    class BrokenStore(MemoryStore):
        def purge_expired(self, now: float) -> int:
            calls.append(now)
            raise OSError("disk gone")

    tracker = BatchTracker(BrokenStore(), clock=clock)
    tracker.start_sweeper(interval=0.01)
    deadline = time.monotonic() + 5
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    tracker.stop_sweeper()
    assert len(calls) >= 3
    assert "cleanup failed" in caplog.text


# -- leases, retry, cancel: validation --------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), "300", True, None])
def test_bad_lease_is_rejected(value: object) -> None:
    """A lease that is not a positive finite number raises ValidationError everywhere."""
    with pytest.raises(ValidationError, match="lease"):
        BatchTracker(lease=value)  # type: ignore[arg-type]
    tracker = BatchTracker()
    snap = tracker.create_batch([("a", "a.jpg")])
    if value is not None:
        with pytest.raises(ValidationError, match="lease"):
            tracker.start_item(snap.batch_id, "a", lease=value)  # type: ignore[arg-type]
        tracker.start_item(snap.batch_id, "a")
        with pytest.raises(ValidationError, match="lease"):
            tracker.heartbeat(snap.batch_id, "a", lease=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, -3, 1.5, "3", True, None])
def test_bad_max_attempts_is_rejected(value: object) -> None:
    """max_attempts must be a whole number >= 1."""
    with pytest.raises(ValidationError, match="max_attempts"):
        BatchTracker(max_attempts=value)  # type: ignore[arg-type]


def test_a_per_item_lease_overrides_the_trackers(clock: FakeClock) -> None:
    """start_item(lease=...) and heartbeat(lease=...) set that item's lease only."""
    tracker = BatchTracker(clock=clock, lease=100.0)
    snap = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg")])
    tracker.start_item(snap.batch_id, "a", lease=5.0)
    tracker.start_item(snap.batch_id, "b")
    clock.advance(4)
    tracker.heartbeat(snap.batch_id, "a", lease=2.0)
    clock.advance(2)
    assert tracker.reclaim_items() == [(snap.batch_id, "a", Status.PENDING)]


def test_retry_validates_item_ids(clock: FakeClock) -> None:
    """retry() wants None or a non-empty collection of string ids."""
    tracker = BatchTracker(clock=clock)
    snap = tracker.create_batch([("a", "a.jpg")])
    for bad in ("a", [], [1], 5):
        with pytest.raises(ValidationError):
            tracker.retry(snap.batch_id, bad)  # type: ignore[arg-type]
    with pytest.raises(BatchNotFound):
        tracker.retry("nope")
    with pytest.raises(BatchNotFound):
        tracker.cancel("nope")


def test_retry_and_cancel_check_the_owner(clock: FakeClock) -> None:
    """Another owner's batch is not found for retry and cancel, and nothing changes."""
    tracker = BatchTracker(clock=clock)
    snap = tracker.create_batch([("a", "a.jpg")], owner="alice")
    with pytest.raises(BatchNotFound):
        tracker.cancel(snap.batch_id, owner="bob")
    with pytest.raises(BatchNotFound):
        tracker.retry(snap.batch_id, owner="bob")
    assert tracker.get(snap.batch_id).progress.pending == 1
    assert tracker.cancel(snap.batch_id, owner="alice") == 1


@pytest.mark.parametrize("source", [b"/bytes/path", 12, object()])
def test_a_source_that_cannot_be_stored_is_rejected(source: object) -> None:
    """create_batch stores sources as text: anything but a path or a string is refused."""
    with pytest.raises(ValidationError, match="source"):
        BatchTracker().create_batch([Item("a.jpg", source=source)])


def test_path_sources_are_stored_as_text(tmp_path: Path) -> None:
    """An os.PathLike source comes back as its string."""
    snap = BatchTracker().create_batch([Item("a.jpg", source=tmp_path / "a.jpg")])
    assert snap.items[0].source == str(tmp_path / "a.jpg")
    assert "source" not in snap.to_dict()["images"][0]


def test_the_sweeper_reclaims_lost_items() -> None:
    """start_sweeper() runs reclaim() too."""
    tracker = BatchTracker(lease=0.05)
    snap = tracker.create_batch([("a", "a.jpg")])
    tracker.start_item(snap.batch_id, "a")
    with tracker:
        tracker.start_sweeper(interval=0.02)
        deadline = time.monotonic() + 5
        while tracker.get(snap.batch_id).items[0].status is not Status.PENDING:
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_text_that_is_not_valid_unicode_is_rejected() -> None:
    """A lone surrogate (a non-UTF-8 file name) in a filename or source is a ValidationError."""
    tracker = BatchTracker()
    with pytest.raises(ValidationError, match="Unicode"):
        tracker.create_batch(["bad\udcff.jpg"])
    with pytest.raises(ValidationError, match="Unicode"):
        tracker.create_batch([Item("a.jpg", source="/up/bad\udcff")])


def test_retry_refuses_items_whose_input_was_not_kept_and_changes_nothing(
    tracker: BatchTracker,
) -> None:
    """retry() raises InputsGone when an item to retry had an input that was not kept
    (stored source ""), for the whole batch or that item named, and retries nothing."""
    snap = tracker.create_batch(
        [Item("kept.jpg", source="/in/kept.jpg", id="kept"), Item("cat.jpg", source="", id="cat")]
    )
    for item in ("kept", "cat"):
        tracker.fail_item(snap.batch_id, item, "not an image")
    for names in (None, ["cat"], ["kept", "cat"]):
        with pytest.raises(InputsGone) as caught:
            tracker.retry(snap.batch_id, names)
        assert caught.value.item_ids == ("cat",)
    assert tracker.get(snap.batch_id).progress.failed == 2
    assert tracker.retry(snap.batch_id, ["kept"]) == 1  # an input that was kept: fine
