"""A store in Redis, shared by every process on every host that reaches the server.

Needs redis-py: ``pip install 'batchtrack[redis]'``.

Every transition is one server-side Lua script, registered once and called by its SHA:
it checks the item's status, updates the item, the batch's counters, ETA stats, version
and expiry, all in one atomic step and one round trip. Reading a batch is one pipelined
``MULTI``/``EXEC``, so a snapshot is consistent.

Keys, under ``prefix`` (default ``batchtrack:``):

- ``b:<batch>`` — a hash: the header, the counts, and the ETA stats in one field;
- ``i:<batch>`` — a hash: item id → the item as JSON (filename, status, error, last change);
- ``o:<batch>`` — a list: the item ids in order;
- ``expiry`` — a sorted set of batch ids by ``expires_at``, for :meth:`RedisStore.purge_expired`.

The three batch keys carry a Redis TTL (the batch's own expiry plus a minute), so a batch
nobody sweeps still disappears; ``cleanup()`` works all the same.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

try:
    import redis
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "batchtrack.stores.redis needs redis-py: pip install 'batchtrack[redis]'"
    ) from exc

import attrs

from .._models import ItemSnapshot, Progress, Status
from ..exceptions import BatchNotFound, ItemNotFound, StoreError, ValidationError
from .base import (
    BatchRecord,
    Outcome,
    Store,
    Transition,
    TransitionResult,
    pack_stats,
    unpack_stats,
)

__all__ = ["RedisStore"]

_STATUSES = (Status.PENDING, Status.PROCESSING, Status.COMPLETED, Status.FAILED)
_CODE = {status: code for code, status in enumerate(_STATUSES)}
_OUTCOMES = {
    b"applied": Outcome.APPLIED,
    b"unchanged": Outcome.UNCHANGED,
    b"rejected": Outcome.REJECTED,
}
_HEADER = (
    "owner",
    "created_at",
    "updated_at",
    "finished_at",
    "expires_at",
    "version",
    "total",
    "completed",
    "failed",
    "processing",
    "pending",
)
_SLACK = 60  # seconds a key outlives the batch's own expiry, for clock skew
_PURGE_CHUNK = 500

# KEYS: batch hash, items hash, order list, expiry zset
# ARGV: batch id, slack, then field/value pairs of the header, then item ids and items
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local n = tonumber(ARGV[3])
local header = {}
for i = 1, n * 2 do header[i] = ARGV[3 + i] end
redis.call('HSET', KEYS[1], unpack(header))
local base = 4 + n * 2
local count = tonumber(ARGV[base])
local ids = {}
local pairs_ = {}
for i = 1, count do
  local id = ARGV[base + 2 * i - 1]
  ids[#ids + 1] = id
  pairs_[#pairs_ + 1] = id
  pairs_[#pairs_ + 1] = ARGV[base + 2 * i]
end
for i = 1, #ids, 1000 do
  redis.call('RPUSH', KEYS[3], unpack(ids, i, math.min(i + 999, #ids)))
end
for i = 1, #pairs_, 2000 do
  redis.call('HSET', KEYS[2], unpack(pairs_, i, math.min(i + 1999, #pairs_)))
end
local expires = tonumber(redis.call('HGET', KEYS[1], 'expires_at'))
local created = tonumber(redis.call('HGET', KEYS[1], 'created_at'))
local ttl = math.max(1, math.ceil(expires - created + tonumber(ARGV[2])))
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ttl) end
redis.call('ZADD', KEYS[4], expires, ARGV[1])
return 1
"""

# KEYS: batch hash, items hash, order list, expiry zset
# ARGV: batch id, item id, target code, source codes, at, error ('' = none),
#       expires_open, expires_finished, slack, then the stats contributions: the number
#       of groups, and per group: source code, names joined by ',', coefficients packed
#       as little-endian doubles, powers as one digit each.
# Returns: outcome, previous code, the item's JSON, the header fields (in _HEADER's
# order), and the stats field (pack_stats format: exact doubles, one value).
_APPLY = """
local SEP = string.char(31)  -- pack_stats' separator between names
local header_fields = {'owner', 'created_at', 'updated_at', 'finished_at', 'expires_at',
  'version', 'total', 'completed', 'failed', 'processing', 'pending', 'stats'}
local function reply(outcome, previous, raw)
  local values = redis.call('HMGET', KEYS[1], unpack(header_fields))
  local stats = table.remove(values)
  return {outcome, previous, raw, values, stats}
end
local at = tonumber(ARGV[5])
local head = redis.call('HMGET', KEYS[1], 'expires_at', 'pending', 'processing',
  'completed', 'failed', 'version', 'stats')
if not head[1] or tonumber(head[1]) <= at then return {'nobatch'} end
local raw = redis.call('HGET', KEYS[2], ARGV[2])
if not raw then return {'noitem'} end
local item = cjson.decode(raw)
local previous = item.s
local target = tonumber(ARGV[3])
if previous == target then return reply('unchanged', previous, raw) end
if not string.find(ARGV[4], tostring(previous), 1, true) then
  return reply('rejected', previous, raw)
end
-- Times travel as strings: cjson keeps only 14 significant digits of a number.
local elapsed = at - tonumber(item.t)
item.s = target
if ARGV[6] ~= '' then item.e = ARGV[6] else item.e = cjson.null end
item.t = ARGV[5]
raw = cjson.encode(item)
redis.call('HSET', KEYS[2], ARGV[2], raw)
local counts = {tonumber(head[2]), tonumber(head[3]), tonumber(head[4]), tonumber(head[5])}
counts[previous + 1] = counts[previous + 1] - 1
counts[target + 1] = counts[target + 1] + 1
local update = {'pending', counts[1], 'processing', counts[2], 'completed', counts[3],
  'failed', counts[4], 'version', tonumber(head[6]) + 1, 'updated_at', ARGV[5]}
local finished = counts[1] + counts[2] == 0
local new_expiry = ARGV[7]
if finished then
  new_expiry = ARGV[8]
  update[#update + 1] = 'finished_at'
  update[#update + 1] = ARGV[5]
end
update[#update + 1] = 'expires_at'
update[#update + 1] = new_expiry
-- Stats live in one field in pack_stats' format and are added here in doubles, exactly
-- as the other stores do in Python.
for g = 0, tonumber(ARGV[10]) - 1 do
  local base = 11 + 4 * g
  if tonumber(ARGV[base]) == previous then
    local names, values, index = {}, {}, {}
    local blob = head[7]
    local count, pos = struct.unpack('<H', blob)
    for i = 1, count do values[i], pos = struct.unpack('<d', blob, pos) end
    for name in string.gmatch(string.sub(blob, pos), '[^' .. SEP .. ']+') do
      names[#names + 1] = name
      index[name] = #names
    end
    local coefs, cpos = ARGV[base + 2], 1
    local i = 0
    for name in string.gmatch(ARGV[base + 1], '[^,]+') do
      i = i + 1
      local coef
      coef, cpos = struct.unpack('<d', coefs, cpos)
      local power = tonumber(string.sub(ARGV[base + 3], i, i))
      local at_name = index[name]
      if not at_name then
        names[#names + 1] = name
        values[#names] = 0
        at_name = #names
        index[name] = at_name
      end
      values[at_name] = values[at_name] + coef * elapsed ^ power
    end
    local packed = {struct.pack('<H', #names)}
    for j = 1, #names do packed[#packed + 1] = struct.pack('<d', values[j]) end
    packed[#packed + 1] = table.concat(names, SEP)
    update[#update + 1] = 'stats'
    update[#update + 1] = table.concat(packed)
  end
end
redis.call('HSET', KEYS[1], unpack(update))
-- Key TTLs are a safety net behind purge_expired: refresh them when the batch finishes,
-- and otherwise at most hourly, not on every event.
local ttl = math.max(1, math.ceil(tonumber(new_expiry) - at + tonumber(ARGV[9])))
if finished or redis.call('TTL', KEYS[1]) < ttl - 3600 then
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ttl) end
  redis.call('ZADD', KEYS[4], new_expiry, ARGV[1])
end
return reply('applied', previous, raw)
"""

# KEYS: expiry zset. ARGV: now, chunk size, key prefix. The zset's scores may be older
# than a batch's real expiry (they are refreshed hourly), so each is checked against the
# batch itself; being one script, a batch updated meanwhile is never removed.
_PURGE = """
local now = tonumber(ARGV[1])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local removed = 0
for _, id in ipairs(ids) do
  local batch = ARGV[3] .. 'b:' .. id
  local expires = redis.call('HGET', batch, 'expires_at')
  if expires and tonumber(expires) > now then
    redis.call('ZADD', KEYS[1], expires, id)
  else
    redis.call('DEL', batch, ARGV[3] .. 'i:' .. id, ARGV[3] .. 'o:' .. id)
    redis.call('ZREM', KEYS[1], id)
    removed = removed + 1
  end
end
return {removed, #ids}
"""


def _float(value: bytes | None) -> float | None:
    return None if value is None or value == b"" else float(value)


def _record(
    batch_id: str,
    header: Sequence[bytes | None],
    stats: dict[str, float],
    items: tuple[ItemSnapshot, ...] = (),
) -> BatchRecord:
    owner, created, updated, finished, expires, version, total, done, failed, running, pending = (
        header
    )
    return BatchRecord(
        batch_id=batch_id,
        owner=None if owner in (None, b"") else owner.decode(),
        created_at=float(created or 0),
        updated_at=float(updated or 0),
        finished_at=_float(finished),
        expires_at=float(expires or 0),
        version=int(version or 0),
        progress=Progress(
            int(total or 0), int(done or 0), int(failed or 0), int(running or 0), int(pending or 0)
        ),
        stats=stats,
        items=items,
    )


def _from_fields(
    batch_id: str, fields: dict[bytes, bytes], items: tuple[ItemSnapshot, ...] = ()
) -> BatchRecord:
    header = [fields.get(name.encode()) for name in _HEADER]
    return _record(batch_id, header, unpack_stats(fields[b"stats"]), items)


def _item(item_id: str, raw: bytes) -> ItemSnapshot:
    data = json.loads(raw)
    return ItemSnapshot(item_id, data["f"], _STATUSES[data["s"]], data.get("e"))


@attrs.define(eq=False, init=False)
class RedisStore(Store):
    """Batches in Redis, for web and processing workers on many hosts.

    Args:
        url: A Redis URL (``redis://host:6379/0``, ``rediss://...``, ``unix://...``).
        prefix: Put before every key, so several applications can share a server.
        client: An existing ``redis.Redis`` client to use instead of ``url`` (its pool
            is not closed by :meth:`close`).

    Raises:
        ValidationError: A URL redis-py cannot use, or a bad prefix.

    Every method raises :class:`~batchtrack.StoreError` (the redis-py error attached) when
    the server cannot be reached or answers with an error: never a silent success.
    """

    url: str | None
    prefix: str
    _client: Any
    _owns_client: bool
    _create: Any
    _apply: Any
    _purge: Any

    def __init__(
        self, url: str | None = None, *, prefix: str = "batchtrack:", client: Any = None
    ) -> None:
        if not isinstance(prefix, str):
            raise ValidationError("prefix must be a string")
        if client is None:
            if not isinstance(url, str):
                raise ValidationError(
                    "RedisStore needs a Redis URL like 'redis://localhost:6379/0'"
                )
            try:
                client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
            except ValueError as exc:
                raise ValidationError(f"not a usable Redis URL: {url!r} ({exc})") from exc
            owns = True
        else:
            owns = False
        self.__attrs_init__(
            url,
            prefix,
            client,
            owns,
            client.register_script(_CREATE),
            client.register_script(_APPLY),
            client.register_script(_PURGE),
        )

    def _keys(self, batch_id: str) -> list[str]:
        p = self.prefix
        return [f"{p}b:{batch_id}", f"{p}i:{batch_id}", f"{p}o:{batch_id}", f"{p}expiry"]

    def close(self) -> None:
        """Release the connections (of a pool this store created)."""
        if self._owns_client:
            self._client.close()

    def create(self, batch: BatchRecord, items: Sequence[ItemSnapshot]) -> None:
        p = batch.progress
        header: list[Any] = [
            "owner",
            batch.owner or "",
            "created_at",
            repr(batch.created_at),
            "updated_at",
            repr(batch.updated_at),
            "finished_at",
            "",
            "expires_at",
            repr(batch.expires_at),
            "version",
            batch.version,
            "total",
            p.total,
            "completed",
            p.completed,
            "failed",
            p.failed,
            "processing",
            p.processing,
            "pending",
            p.pending,
        ]
        header += ["stats", pack_stats({k: float(v) for k, v in batch.stats.items()})]
        args: list[Any] = [batch.batch_id, _SLACK, len(header) // 2, *header, len(items)]
        for item in items:
            args += [
                item.id,
                json.dumps(
                    {
                        "f": item.filename,
                        "s": _CODE[item.status],
                        "e": item.error,
                        "t": repr(batch.created_at),
                    }
                ),
            ]
        try:
            created = self._create(keys=self._keys(batch.batch_id), args=args)
        except RedisError as exc:
            raise StoreError(f"Redis failed to create batch {batch.batch_id!r}: {exc}") from exc
        if not created:
            raise StoreError(f"batch {batch.batch_id!r} exists already")

    def apply(self, batch_id: str, transition: Transition) -> TransitionResult:
        groups: list[Any] = [len(transition.stats)]
        for source, amounts in transition.stats.items():
            powers = [power for _, power in amounts.values()]
            if any(not 0 <= p <= 9 for p in powers) or any(
                "," in n or "\x1f" in n for n in amounts
            ):
                raise ValidationError("stats names must not contain ',' or \\x1f; powers 0-9")
            groups += [
                _CODE[source],
                ",".join(amounts),
                struct.pack(f"<{len(amounts)}d", *(coef for coef, _ in amounts.values())),
                "".join(map(str, powers)),
            ]
        try:
            reply = self._apply(
                keys=self._keys(batch_id),
                args=[
                    batch_id,
                    transition.item_id,
                    _CODE[transition.target],
                    "".join(str(_CODE[s]) for s in transition.sources),
                    repr(transition.at),
                    transition.error or "",
                    repr(transition.expires_at_open),
                    repr(transition.expires_at_finished),
                    _SLACK,
                    *groups,
                ],
            )
        except RedisError as exc:
            raise StoreError(f"Redis failed to update batch {batch_id!r}: {exc}") from exc
        if reply[0] == b"nobatch":
            raise BatchNotFound(batch_id)
        if reply[0] == b"noitem":
            raise ItemNotFound(batch_id, transition.item_id)
        record = _record(batch_id, reply[3], unpack_stats(reply[4]))
        return TransitionResult(
            _OUTCOMES[reply[0]],
            _STATUSES[int(reply[1])],
            _item(transition.item_id, reply[2]),
            record.progress,
            record.version,
            record.created_at,
            record.finished_at,
            record.expires_at,
            record.stats,
        )

    def load(self, batch_id: str, *, items: bool = True) -> BatchRecord | None:
        batch_key, items_key, order_key, _ = self._keys(batch_id)
        try:
            with self._client.pipeline(transaction=True) as pipe:
                pipe.hgetall(batch_key)
                if items:
                    pipe.lrange(order_key, 0, -1)
                    pipe.hgetall(items_key)
                replies = pipe.execute()
        except RedisError as exc:
            raise StoreError(f"Redis failed to read batch {batch_id!r}: {exc}") from exc
        fields: dict[bytes, bytes] = replies[0]
        if not fields:
            return None
        snapshots: tuple[ItemSnapshot, ...] = ()
        if items:
            raw_items: dict[bytes, bytes] = replies[2]
            snapshots = tuple(_item(i.decode(), raw_items[i]) for i in replies[1])
        return _from_fields(batch_id, fields, snapshots)

    def delete(self, batch_id: str) -> bool:
        keys = self._keys(batch_id)
        try:
            with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(keys[0])
                pipe.delete(keys[1], keys[2])
                pipe.zrem(keys[3], batch_id)
                removed = pipe.execute()[0]
        except RedisError as exc:
            raise StoreError(f"Redis failed to delete batch {batch_id!r}: {exc}") from exc
        return bool(removed)

    def purge_expired(self, now: float) -> int:
        expiry = f"{self.prefix}expiry"
        removed = 0
        try:
            while True:
                gone, looked = self._purge(
                    keys=[expiry], args=[repr(now), _PURGE_CHUNK, self.prefix]
                )
                removed += int(gone)
                if int(looked) < _PURGE_CHUNK:
                    return removed
        except RedisError as exc:
            raise StoreError(f"Redis failed to purge expired batches: {exc}") from exc
