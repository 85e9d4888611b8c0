"""The status body made from cached item JSON is byte for byte the documented body, and
stores hand out fresh snapshots exactly when an item changed."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from batchtrack import BatchTracker, ItemSnapshot, SQLiteStore, Status
from batchtrack._json import item_json, status_body
from batchtrack.testing.strategies import filenames as filename_strategy

# What the tracker accepts as an error: valid UTF-8, not blank; quotes, backslashes,
# control characters and U+2028 included.
_text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=30).filter(
    str.strip
)


def _reference(snap: object) -> bytes:
    return json.dumps(snap.to_dict(), separators=(",", ":"), ensure_ascii=False).encode()  # type: ignore[attr-defined]


@given(
    filenames=st.lists(filename_strategy(), min_size=1, max_size=8),
    errors=st.lists(_text, max_size=8),
    data=st.data(),
)
@settings(max_examples=150, deadline=None)
def test_status_body_equals_json_dumps_of_to_dict(
    filenames: list[str], errors: list[str], data: st.DataObject
) -> None:
    tracker = BatchTracker()
    snap = tracker.create_batch(filenames)
    for item, error in zip(snap.items, errors, strict=False):
        tracker.start_item(snap.batch_id, item.id)
        if data.draw(st.booleans()):
            tracker.fail_item(snap.batch_id, item.id, error)
            if data.draw(st.booleans()):
                tracker.retry(snap.batch_id, [item.id])
                tracker.start_item(snap.batch_id, item.id)  # a second attempt
        else:
            tracker.complete_item(snap.batch_id, item.id)
    for view in (
        tracker.get(snap.batch_id),
        tracker.get(snap.batch_id, limit=2),
        tracker.get(snap.batch_id, since=1),
    ):
        assert status_body(view) == _reference(view)
        assert status_body(view) == status_body(view)  # and again, from the cache


_items = st.builds(
    ItemSnapshot,
    id=_text,
    filename=_text,
    status=st.sampled_from(list(Status)),
    error=st.none() | _text,
    attempts=st.integers(0, 5),
)


@given(items=st.lists(_items, max_size=6), eta=st.none() | st.integers(0, 10**6))
@settings(max_examples=200, deadline=None)
def test_status_body_of_any_items_equals_json_dumps(
    items: list[ItemSnapshot], eta: int | None
) -> None:
    """Errors on any status, any attempts, any text: the same bytes as json.dumps."""
    snap = BatchTracker().create_batch(["a.jpg"])
    view = attrs.evolve(snap, items=tuple(items), estimated_time_remaining=eta)
    assert status_body(view) == _reference(view)


def test_item_json_is_made_once_per_snapshot_and_not_part_of_equality() -> None:
    item = ItemSnapshot("a", 'say "hi"\n', Status.FAILED, "bad\u2028news", 3)
    first = item_json(item)
    assert item_json(item) is first
    assert json.loads(first) == item.to_dict()
    assert item == ItemSnapshot("a", 'say "hi"\n', Status.FAILED, "bad\u2028news", 3)
    assert hash(item) == hash(ItemSnapshot("a", 'say "hi"\n', Status.FAILED, "bad\u2028news", 3))
    assert "_json" not in repr(item)


def test_sqlite_reuses_unchanged_snapshots_and_sees_other_connections_changes(
    tmp_path: Path,
) -> None:
    """A second store on the same file (another process, in effect) changes an item: the
    first store's next read shows it; unchanged items come back as the same objects."""
    path = tmp_path / "b.db"
    reader, writer = SQLiteStore(path), SQLiteStore(path)
    try:
        tracker = BatchTracker(reader)
        snap = tracker.create_batch([("a", "a.jpg"), ("b", "b.jpg"), ("c", "c.jpg")])
        first = tracker.get(snap.batch_id)
        other = BatchTracker(writer)
        other.start_item(snap.batch_id, "b")
        other.fail_item(snap.batch_id, "b", "boom")
        second = tracker.get(snap.batch_id)
        assert second.items[1].status is Status.FAILED
        assert second.items[1].error == "boom"
        assert second.items[0] is first.items[0]
        assert second.items[2] is first.items[2]
        assert status_body(second) == _reference(second)
        # Deleted and made again under the same id: nothing stale comes back.
        assert tracker.delete(snap.batch_id)
    finally:
        reader.close()
        writer.close()
