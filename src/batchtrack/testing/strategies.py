"""Hypothesis strategies for batchtrack: filenames, item lists and event sequences.

>>> from hypothesis import given
>>> from batchtrack.testing.strategies import item_lists
>>> @given(item_lists())
... def test_anything(items): ...
"""

from __future__ import annotations

try:
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - depends on the environment
    from .._extras import missing

    raise ImportError(missing("batchtrack.testing.strategies", "Hypothesis", "test")) from exc

from .._models import Item

__all__ = [
    "ACTIONS",
    "BATCH_ACTIONS",
    "Event",
    "event_sequences",
    "filenames",
    "item_lists",
    "sources",
]

ACTIONS = ("start", "complete", "fail")
"""The tracker calls an event can make: start_item, complete_item, fail_item."""

BATCH_ACTIONS = ("cancel", "retry", "pause", "unpause")
"""The calls on a whole batch an event can make too (``event_sequences(...,
batch_actions=True)``): cancel, retry (every failed and cancelled item), pause, unpause."""

Event = tuple[str, int, str | None]
"""One event: (action, index of the item (unused by batch actions), error text for
``fail`` else None)."""


def filenames() -> st.SearchStrategy[str]:
    """Filenames users may upload: non-empty, no NUL or line breaks, any other Unicode."""
    name = st.text(
        alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00\r\n"),
        min_size=1,
        max_size=40,
    ).filter(lambda s: s.strip() != "")
    ext = st.sampled_from([".jpg", ".png", ".webp", ".gif", ""])
    return st.builds(lambda n, e: n + e, name, ext)


def sources() -> st.SearchStrategy[str]:
    """Item sources as users give them: paths and URLs, any Unicode but NUL."""
    path = st.text(
        alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
        min_size=1,
        max_size=60,
    )
    return st.one_of(path.map(lambda p: "/data/uploads/" + p), st.just("s3://bucket/key.jpg"))


def item_lists(*, min_size: int = 1, max_size: int = 12) -> st.SearchStrategy[list[object]]:
    """Item lists for ``create_batch``: filenames, some with caller-chosen unique ids, and
    :class:`~batchtrack.Item` values with or without an id and a source."""
    plain = filenames()
    with_id = st.tuples(st.uuids().map(str), filenames())
    item = st.builds(
        Item,
        filenames(),
        source=st.one_of(st.none(), sources()),
        id=st.one_of(st.none(), st.uuids().map(str)),
    )

    def key(spec: object) -> object:
        if isinstance(spec, tuple):
            return spec[0]
        if isinstance(spec, Item) and spec.id is not None:
            return spec.id
        return object()

    return st.lists(
        st.one_of(plain, with_id, item), min_size=min_size, max_size=max_size, unique_by=key
    )


def event_sequences(
    n_items: int, *, max_size: int = 60, batch_actions: bool = False
) -> st.SearchStrategy[list[Event]]:
    """Sequences of item events, valid and invalid mixed, for a batch of ``n_items``;
    with ``batch_actions``, :data:`BATCH_ACTIONS` mixed in (about one event in five)."""
    error = st.sampled_from(["not an image", "truncated image", "cancelled", "boom"])
    actions = st.sampled_from(ACTIONS)
    if batch_actions:
        actions = st.one_of(actions, actions, actions, actions, st.sampled_from(BATCH_ACTIONS))
    event = st.tuples(actions, st.integers(0, n_items - 1), error).map(
        lambda e: (e[0], e[1], e[2] if e[0] == "fail" else None)
    )
    return st.lists(event, max_size=max_size)
