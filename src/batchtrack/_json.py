"""The JSON body of a status answer, made fast for big batches.

``json.dumps(snap.to_dict())`` builds a dict per item and encodes every item on every
poll. Here each item's entry is encoded once and kept on its (immutable)
:class:`~batchtrack.ItemSnapshot`; stores hand out the same snapshot object until the
item changes, so a poll of an unchanged batch joins bytes it already has. The output is
byte for byte ``json.dumps(snap.to_dict(), separators=(",", ":"), ensure_ascii=False)``
in UTF-8 (the tests check it on random batches).
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring  # the C version when available, as json uses

from ._models import BatchSnapshot, ItemSnapshot, Status

__all__ = ["dumps", "item_json", "status_body"]

_IMAGES = b'"images":[]'


def dumps(payload: object) -> bytes:
    """Compact JSON in UTF-8, non-ASCII characters as they are."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def item_json(item: ItemSnapshot) -> bytes:
    """The item's entry in ``images``, as JSON (made once per snapshot object)."""
    cached = item._json
    if cached is None:
        text = (
            f'{{"id":{encode_basestring(item.id)}'
            f',"filename":{encode_basestring(item.filename)}'
            f',"status":"{item.status.value}"'
        )
        if item.error is not None:
            text += f',"error":{encode_basestring(item.error)}'
        if item.attempts > 1:
            text += f',"attempts":{item.attempts}'
        if item.progress is not None and item.status is Status.PROCESSING:
            text += f',"progress":{json.dumps(item.progress)}'
            if item.stage is not None:
                text += f',"stage":{encode_basestring(item.stage)}'
        cached = (text + "}").encode()
        object.__setattr__(item, "_json", cached)
    return cached


def status_body(snap: BatchSnapshot) -> bytes:
    """``snap.to_dict()`` as the compact JSON body of the status endpoint."""
    head = dumps(snap._body([]))
    before, after = head.split(_IMAGES, 1)  # no other text of the header can hold it
    images = b",".join([i._json or item_json(i) for i in snap.items])
    return b"".join((before, b'"images":[', images, b"]", after))
