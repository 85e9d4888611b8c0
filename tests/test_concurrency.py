"""Many threads on one tracker: no update is lost or counted twice."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

from batchtrack import BatchTracker, InvalidTransition, Status

THREADS = 8
ITEMS_PER_THREAD = 300


@pytest.fixture(autouse=True)
def _switch_threads_often() -> Iterator[None]:
    """Let the interpreter switch threads every microsecond, so that races really happen."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


@pytest.mark.parametrize("round_", range(8))
def test_threads_racing_over_shared_items_lose_and_double_nothing(
    tracker: BatchTracker, round_: int
) -> None:
    """8 threads each drive every item through start/complete-or-fail; counts stay exact."""
    snap = tracker.create_batch([f"{i}.jpg" for i in range(THREADS * ITEMS_PER_THREAD)])
    bid = snap.batch_id
    ids = [item.id for item in snap.items]
    odd = {item_id: position % 2 == 1 for position, item_id in enumerate(ids)}
    changed = [0] * THREADS
    barrier = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        barrier.wait()
        try:
            # Every thread tries every item, in a different order, so each transition is
            # raced by all threads at once and must be applied exactly once.
            for i in ids[n::THREADS] + ids:
                try:
                    if tracker.start_item(bid, i).changed:
                        changed[n] += 1
                except InvalidTransition:
                    continue  # another thread already finished it
                final = (
                    tracker.fail_item(bid, i, "odd") if odd[i] else tracker.complete_item(bid, i)
                )
                if final.changed:
                    changed[n] += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    total = THREADS * ITEMS_PER_THREAD
    assert sum(changed) == 2 * total
    final = tracker.get(bid)
    assert final.version == 2 * total
    assert final.progress.completed == total // 2
    assert final.progress.failed == total // 2
    assert final.status is Status.COMPLETED
    assert sum(1 for item in final.items if item.status is Status.COMPLETED) == total // 2
