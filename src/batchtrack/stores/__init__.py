"""Where batches live: the :class:`~batchtrack.stores.base.Store` boundary and its stores.

- :class:`~batchtrack.stores.memory.MemoryStore`: one process (the default).
- :class:`~batchtrack.stores.sqlite.SQLiteStore`: one file shared by the threads and
  processes of one machine.
- :class:`~batchtrack.stores.redis.RedisStore` and
  :class:`~batchtrack.stores.postgres.PostgresStore`: a server shared by many machines
  (extras ``redis`` and ``postgres``; imported only when used).

:func:`from_url` makes any of them from a URL.
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlsplit

from ..exceptions import StoreError, ValidationError
from .base import BatchRecord, Outcome, Store, Transition, TransitionResult
from .memory import MemoryStore
from .sqlite import SQLiteStore, url_path

__all__ = [
    "URL_FORMS",
    "BatchRecord",
    "MemoryStore",
    "Outcome",
    "SQLiteStore",
    "Store",
    "Transition",
    "TransitionResult",
    "from_url",
]

URL_FORMS = (
    "memory://",
    "sqlite:///absolute/path.db",
    "redis://host:6379/0",
    "rediss://host:6380/0",
    "postgresql://user:password@host:5432/dbname",
)
"""The forms of URL :func:`from_url` accepts (``postgres://`` works too)."""


def _bad(url: object, why: str) -> ValidationError:
    return ValidationError(
        f"not a store URL: {_shown(url)} ({why}); use one of {', '.join(URL_FORMS)}"
    )


def _shown(url: object) -> str:
    """The URL for an error message, without a password."""
    if not isinstance(url, str):
        return repr(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return repr(url)
    if parts.password is None:
        return repr(url)
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return repr(parts._replace(netloc=netloc).geturl())


def from_url(url: str, **options: Any) -> Store:
    """A store for a URL, like limits' ``storage_from_string``.

    - ``memory://``: a :class:`~batchtrack.MemoryStore`;
    - ``sqlite:///absolute/path.db``: a :class:`~batchtrack.SQLiteStore` on that file;
    - ``redis://…``, ``rediss://…``: a :class:`~batchtrack.stores.redis.RedisStore`;
    - ``postgresql://…``, ``postgres://…``: a
      :class:`~batchtrack.stores.postgres.PostgresStore`.

    Redis and PostgreSQL URLs go to redis-py and libpq as they are (with their own query
    parameters); their modules are imported only here. The server is reached once, so a
    store that is returned works.

    Args:
        url: Where the batches live.
        options: More keyword arguments for the store, such as ``prefix=`` for Redis or
            ``table_prefix=`` for PostgreSQL.

    Raises:
        ValidationError: A URL of another scheme, or malformed (a relative SQLite path).
        StoreError: The server cannot be reached, or the database cannot be used.
        ImportError: The store's extra is not installed (the message says which).
    """
    if not isinstance(url, str):
        raise _bad(url, "not a string")
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:
        raise _bad(url, str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme == "memory":
        if parts.netloc or parts.path.strip("/") or parts.query:
            raise _bad(url, "memory:// takes nothing after it")
        return MemoryStore(**options)
    if scheme == "sqlite":
        try:
            path = url_path(url)
        except ValueError as exc:
            raise _bad(url, str(exc)) from None
        return SQLiteStore(path, **options)
    if scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise _bad(url, "no host")
        from .redis import RedisStore

        store = RedisStore(url, **options)
        try:
            store.load(str(uuid.uuid4()), items=False)  # reach the server once
        except StoreError as exc:
            store.close()
            cause = exc.__cause__ or exc
            where = f"{parts.hostname}:{parts.port or 6379}"
            raise StoreError(f"cannot reach Redis at {where}: {cause}") from cause
        return store
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresStore

        return PostgresStore(url, **options)
    why = f"unknown scheme {parts.scheme!r}" if parts.scheme else "no scheme"
    raise _bad(url, why)
