"""Big batches: pages and changes, in the tracker, over HTTP and in the events stream."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import pytest

pytest.importorskip("python_multipart")
from batchtrack import BatchNotFound, BatchTracker, ItemNotFound, MemoryStore, ValidationError
from batchtrack._http import COOKIE
from batchtrack.stores.base import ItemQuery, Store
from http_support import Service, clients

Client = Any


# -- the tracker ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conditions", "message"),
    [
        ({"status": "done"}, "status must be one of"),
        ({"status": 3}, "status must be one of"),
        ({"limit": 0}, "limit must be"),
        ({"limit": True}, "limit must be"),
        ({"limit": 2.0}, "limit must be"),
        ({"since": -1}, "since must be"),
        ({"since": "3"}, "since must be"),
        ({"after": 7}, "after must be a string"),
    ],
)
def test_bad_conditions_are_validation_errors(conditions: dict[str, Any], message: str) -> None:
    tracker = BatchTracker()
    snap = tracker.create_batch(["a.jpg"])
    with pytest.raises(ValidationError, match=message):
        tracker.get(snap.batch_id, **conditions)


def test_conditions_need_items() -> None:
    tracker = BatchTracker()
    snap = tracker.create_batch(["a.jpg"])
    with pytest.raises(ValidationError, match="items=False"):
        tracker.get(snap.batch_id, items=False, since=0)


def test_after_an_unknown_item_is_item_not_found_but_only_for_the_owner() -> None:
    """Someone else's batch stays invisible, whatever ``after`` says."""
    tracker = BatchTracker()
    snap = tracker.create_batch(["a.jpg"], owner="alice")
    with pytest.raises(ItemNotFound):
        tracker.get(snap.batch_id, owner="alice", after="nope")
    with pytest.raises(BatchNotFound):
        tracker.get(snap.batch_id, owner="bob", after="nope")


class _PlainStore(MemoryStore):
    """A third-party store that knows nothing of item queries: the defaults apply."""

    def load_items(self, batch_id: str, query: ItemQuery) -> Any:
        return Store.load_items(self, batch_id, query)

    def changed_since(self, batch_id: str, version: int) -> frozenset[str]:
        return Store.changed_since(self, batch_id, version)


def test_a_store_without_indexes_still_answers_pages_and_over_answers_since() -> None:
    """The Store defaults: pages and status exactly; ``since`` never misses a change."""
    tracker = BatchTracker(_PlainStore())
    snap = tracker.create_batch([f"{n}.jpg" for n in range(5)])
    ids = [item.id for item in snap.items]
    tracker.start_item(snap.batch_id, ids[2])
    tracker.fail_item(snap.batch_id, ids[2], "boom")
    page = tracker.get(snap.batch_id, limit=2, after=ids[0])
    assert [i.id for i in page.items] == ids[1:3]
    assert page.next_after == ids[2]
    assert [i.id for i in tracker.get(snap.batch_id, status="failed").items] == [ids[2]]
    assert ids[2] in {i.id for i in tracker.get(snap.batch_id, since=1).items}


# -- HTTP ----------------------------------------------------------------------------------


def _owned_batch(client: Client, tracker: BatchTracker, n: int) -> tuple[str, list[str]]:
    """A batch of ``n`` items that belongs to the client's session."""
    if COOKIE not in client.cookies:
        client.get(f"/api/batch-status/{uuid.uuid4()}")
    owner = f"session:{client.cookies[COOKIE]}"
    snap = tracker.create_batch([f"{k}.jpg" for k in range(n)], owner=owner)
    return snap.batch_id, [item.id for item in snap.items]


def test_http_pages_chain_to_the_end_and_carry_version(client: Client, service: Service) -> None:
    tracker = service.tracker
    batch_id, ids = _owned_batch(client, tracker, 25)
    seen: list[str] = []
    url = f"/api/batch-status/{batch_id}?limit=10"
    while True:
        body = client.get(url).json()
        assert body["version"] == 0
        assert body["progress"]["total"] == 25
        seen += [image["id"] for image in body["images"]]
        if body["nextAfter"] is None:
            break
        url = f"/api/batch-status/{batch_id}?limit=10&after={body['nextAfter']}"
    assert seen == ids
    full = client.get(f"/api/batch-status/{batch_id}").json()
    assert "version" not in full
    assert "nextAfter" not in full


def test_http_since_returns_what_changed_and_etags_work_per_query(
    client: Client, service: Service
) -> None:
    tracker = service.tracker
    batch_id, ids = _owned_batch(client, tracker, 30)
    first = client.get(f"/api/batch-status/{batch_id}?since=0")
    assert first.json()["images"] == []
    assert first.json()["version"] == 0
    tracker.start_item(batch_id, ids[7])
    tracker.fail_item(batch_id, ids[7], "not an image")
    tracker.start_item(batch_id, ids[3])
    url = f"/api/batch-status/{batch_id}?since=0"
    changed = client.get(url)
    body = changed.json()
    assert [image["id"] for image in body["images"]] == [ids[3], ids[7]]
    assert body["images"][1]["error"] == "not an image"
    assert body["version"] == 3
    assert client.get(url, headers={"If-None-Match": changed.headers["etag"]}).status_code == 304
    later = client.get(f"/api/batch-status/{batch_id}?since=3").json()
    assert later["images"] == []
    failed = client.get(f"/api/batch-status/{batch_id}?status=failed").json()
    assert [image["id"] for image in failed["images"]] == [ids[7]]
    # Other parameters (cache busters) are ignored.
    assert client.get(f"/api/batch-status/{batch_id}?since=3&_=123").json() == later


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("status=done", "status must be one of"),
        ("limit=0", "limit must be a whole number from 1 to 1000"),
        ("limit=1001", "limit must be a whole number from 1 to 1000"),
        ("limit=ten", "limit must be"),
        ("limit=1&limit=2", "more than once"),
        ("after=123", "after must be a UUID"),
        ("since=-1", "since must be a whole number"),
        ("since=1.5", "since must be a whole number"),
        (f"since={2**53}", "since must be a whole number from 0 to 9007199254740991"),
        ("since=%FF", "not valid UTF-8"),
    ],
)
def test_http_bad_parameters_are_400(
    client: Client, service: Service, query: str, words: str
) -> None:
    batch_id, _ = _owned_batch(client, service.tracker, 3)
    response = client.get(f"/api/batch-status/{batch_id}?{query}")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_query"
    assert words in error["message"]


def test_http_after_an_unknown_image_is_404(client: Client, service: Service) -> None:
    batch_id, _ = _owned_batch(client, service.tracker, 3)
    response = client.get(f"/api/batch-status/{batch_id}?after={uuid.uuid4()}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "item_not_found"


def test_http_parameters_do_not_reveal_other_sessions_batches(service: Service) -> None:
    with clients(service, "asgi") as make:
        alice, bob = make(), make()
        batch_id, _ids = _owned_batch(alice, service.tracker, 3)
        hidden = bob.get(f"/api/batch-status/{batch_id}?after={uuid.uuid4()}")
        assert hidden.json()["error"]["code"] == "batch_not_found"
        assert bob.get(f"/api/batch-status/{batch_id}?since=0").status_code == 404


def _events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def test_events_delta_sends_the_whole_body_once_then_changes(
    client: Client, service: Service
) -> None:
    tracker = service.tracker
    batch_id, ids = _owned_batch(client, tracker, 40)
    for item_id in ids[:-1]:
        tracker.start_item(batch_id, item_id)
        tracker.complete_item(batch_id, item_id)
    # The stream starts now: the first event has every image, then the last one changes.

    def finish() -> None:
        time.sleep(0.6)
        tracker.start_item(batch_id, ids[-1])
        tracker.fail_item(batch_id, ids[-1], "boom")

    worker = threading.Thread(target=finish)
    worker.start()
    try:
        events = _events(client.get(f"/api/batch-events/{batch_id}?delta=1").text)
    finally:
        worker.join()
    assert len(events[0]["images"]) == 40
    assert events[0]["version"] == 78
    assert all(len(e["images"]) <= 1 for e in events[1:])
    assert events[-1]["status"] == "completed"
    assert events[-1]["images"] == [
        {"id": ids[-1], "filename": "39.jpg", "status": "failed", "error": "boom"}
    ]
    assert events[-1]["version"] == 80
    assert client.get(f"/api/batch-events/{batch_id}?delta=yes").status_code == 400


def test_events_without_delta_send_whole_bodies(client: Client, service: Service) -> None:
    tracker = service.tracker
    batch_id, ids = _owned_batch(client, tracker, 3)
    for item_id in ids:
        tracker.start_item(batch_id, item_id)
        tracker.complete_item(batch_id, item_id)
    events = _events(client.get(f"/api/batch-events/{batch_id}").text)
    assert len(events[-1]["images"]) == 3
    assert "version" not in events[-1]


def test_the_openapi_document_describes_the_parameters(client: Client) -> None:
    doc = client.get("/api/openapi.json").json()
    status = doc["paths"]["/batch-status/{batchId}"]["get"]
    names = {p["name"] for p in status["parameters"] if p["in"] == "query"}
    assert names == {"status", "limit", "after", "since"}
    events = doc["paths"]["/batch-events/{batchId}"]["get"]
    assert {p["name"] for p in events["parameters"] if p["in"] == "query"} == {"delta"}
    props = doc["components"]["schemas"]["BatchStatus"]["properties"]
    assert "version" in props
    assert "nextAfter" in props
