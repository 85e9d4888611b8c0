"""A store in Redis, shared by every process on every host that reaches the server.

Needs redis-py: ``pip install 'batchtrack[redis]'``.

Every transition is one server-side Lua script, registered once and called by its SHA:
it checks the item's status, updates the item, the batch's counters, ETA stats, version
and expiry, all in one atomic step and one round trip. Reading a batch is one pipelined
``MULTI``/``EXEC``, so a snapshot is consistent. The tracker's own events (a start, a
completion, a failure) run a leaner script of the same effect (``_EVENT``), sent packed
at once on connections the store keeps for them (:meth:`RedisStore._fast`).

Keys, under ``prefix`` (default ``batchtrack:``):

- ``b:<batch>`` — a hash: the header, the counts, and the ETA stats in one field;
- ``i:<batch>`` — a hash: item id → the item as JSON (filename, status, error, last change);
- ``o:<batch>`` — a list: the item ids in order;
- ``c:<batch>`` — a sorted set of item ids by the batch version their last change
  produced, for reads of what changed since a version;
- ``s:<batch>`` — a sorted set of item ids by status and position
  (``status * 2**32 + position``), for pages of one status;
- ``expiry`` — a sorted set of batch ids by ``expires_at``, for :meth:`RedisStore.purge_expired`;
- ``leases`` — a sorted set of ``<batch>\x1f<item>`` by ``lease_until``, one member per
  processing item, for :meth:`RedisStore.lost`;
- ``by:all`` — a sorted set of batch ids by ``created_at`` (ties: by id), and
  ``by:o:<owner>`` the same for each owner's batches, for :meth:`RedisStore.list_batches`;
  ``listed`` — a hash: batch id → owner (``''`` for none), so that a purge finds the
  owner's set of a batch whose keys Redis already expired. All three are written by the
  script that creates a batch and cleaned by delete and purge.

Every change to a batch (creation, each applied transition, retry and cancel, pause and
unpause, deletion, removal by ``cleanup()``) is published on the channel
``<prefix>changes``, with the batch id as the message, from inside the very script (or
``MULTI``) that makes it: :meth:`RedisStore.listen` subscribes to it.

The five batch keys carry a Redis TTL (the batch's own expiry plus a minute), so a batch
nobody sweeps still disappears; ``cleanup()`` works all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import math
import os
import struct
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from typing import Any

try:
    import redis
    import redis.asyncio
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import NoScriptError, RedisError, ResponseError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - depends on the environment
    from .._extras import missing

    raise ImportError(missing("batchtrack.stores.redis", "redis-py", "redis")) from exc

import attrs

from .. import _eta
from .._models import ItemSnapshot, Progress, Status
from ..exceptions import BatchNotFound, ItemNotFound, StoreError, ValidationError
from ._rows import pack_metadata, unpack_metadata
from .base import (
    BatchRecord,
    BatchVersion,
    BulkResult,
    EventStats,
    ItemQuery,
    LostItem,
    OutboxEntry,
    Outcome,
    PackedStats,
    Store,
    Transition,
    TransitionResult,
    pack_stats,
    unpack_stats,
)

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:  # redis-py packs with hiredis when it is there: so do we, without its wrappers
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - depends on the environment
    _hiredis_pack = None

__all__ = ["RedisStore"]

# Cancelled items (code 4) have no count field: they are what the total leaves over.
_STATUSES = (
    Status.PENDING,
    Status.PROCESSING,
    Status.COMPLETED,
    Status.FAILED,
    Status.CANCELLED,
)
_CODE = {status: code for code, status in enumerate(_STATUSES)}
_DIGITS = {status: str(code) for status, code in _CODE.items()}
# A transition's allowed sources as the scripts take them (digits), per set of sources.
_SOURCE_CODES: dict[frozenset[Status], str] = {}
_OUTCOMES = {
    b"applied": Outcome.APPLIED,
    b"unchanged": Outcome.UNCHANGED,
    b"rejected": Outcome.REJECTED,
    b"paused": Outcome.PAUSED,
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
_CREATE_CHUNK = 1000  # items per staging call when creating a batch
_CREATE_PIPELINE = 20  # staging calls sent per round trip
_STAGING_TTL = 3600  # seconds staged items of a creator that died are kept
_SLACK = 60  # seconds a key outlives the batch's own expiry, for clock skew
_SLACK_ARG = str(_SLACK)
_IDLE_KEPT = 16  # idle connections RedisStore._fast keeps
_CONSTANTS_KEPT = 4096  # batches whose created_at and total RedisStore keeps
_PURGE_CHUNK = 500
_PING_AFTER = 5.0  # seconds of silence on the listening connection before a PING
_DEAD_AFTER = 15.0  # seconds of silence (no answer to it either) that mean it is gone
# ConnectionPool.get_connection's arguments: none since redis-py 5.3, a command name before.
_GET_ARGS: tuple[str, ...] = (
    () if tuple(int(p) for p in redis.__version__.split(".")[:2]) >= (5, 3) else ("EVALSHA",)
)


def _call_ids() -> Iterator[str]:
    """Ids for RedisStore._fast's calls, unique to this process's store (a random part
    and a count: a repeat is known by its id, never mistaken for another call)."""
    return map(f"{uuid.uuid4().hex[:16]}:{{}}".format, itertools.count())


# Publishes a change of batch `id` on <prefix>changes. KEYS[4] is always <prefix>expiry
# (_keys' order), so the channel is made from it: channels are not keys.
_NOTIFY = """
local function notify(id)
  redis.call('PUBLISH', string.sub(KEYS[4], 1, -7) .. 'changes', id)
end
"""

# A batch is created in two steps, so that 100,000 items never travel in one command:
# its items are written in pipelined chunks to staging keys (_STAGE), then one script
# (_CREATE) renames them into place and writes the header, only if the batch does not
# exist. Staging keys expire on their own if the creator dies in between.
_STATUS_SCALE = 2**32  # s:<batch> scores: status * _STATUS_SCALE + position

# KEYS: staged items hash, order list, status zset. ARGV: TTL, first position, then
# item id and item JSON pairs.
_STAGE = """
local pairs_, ids, scored = {}, {}, {}
local first = tonumber(ARGV[2])
for i = 3, #ARGV, 2 do
  local n = (i - 3) / 2
  pairs_[#pairs_ + 1] = ARGV[i]
  pairs_[#pairs_ + 1] = ARGV[i + 1]
  ids[#ids + 1] = ARGV[i]
  scored[#scored + 1] = first + n
  scored[#scored + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], unpack(pairs_))
redis.call('RPUSH', KEYS[2], unpack(ids))
redis.call('ZADD', KEYS[3], unpack(scored))
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[1])) end
return 1
"""

# KEYS: the batch keys (_keys' order), then the staged items hash, order list and status
# zset. ARGV: batch id, slack, then the header's field/value pairs.
# Returns 1, or 0 (and deletes the staged keys) when the batch exists already.
_CREATE_BODY = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('DEL', KEYS[8], KEYS[9], KEYS[10])
  return 0
end
local header = {}
for i = FIRST, #ARGV do header[#header + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(header))
if redis.call('EXISTS', KEYS[8]) == 1 then
  redis.call('RENAME', KEYS[8], KEYS[2])
  redis.call('RENAME', KEYS[9], KEYS[3])
  redis.call('RENAME', KEYS[10], KEYS[7])
end
local expires = tonumber(redis.call('HGET', KEYS[1], 'expires_at'))
local created = tonumber(redis.call('HGET', KEYS[1], 'created_at'))
local ttl = math.max(1, math.ceil(expires - created + tonumber(ARGV[2])))
-- A placeholder below every version, so that the changes key exists (and expires)
-- from the start; reads of what changed never reach it.
redis.call('ZADD', KEYS[6], -1, string.char(31))
for _, i in ipairs({1, 2, 3, 6, 7}) do redis.call('EXPIRE', KEYS[i], ttl) end
redis.call('ZADD', KEYS[4], expires, ARGV[1])
local prefix = string.sub(KEYS[4], 1, -7)
local owner = redis.call('HGET', KEYS[1], 'owner')
redis.call('HSET', prefix .. 'listed', ARGV[1], owner)
redis.call('ZADD', prefix .. 'by:all', created, ARGV[1])
if owner ~= '' then redis.call('ZADD', prefix .. 'by:o:' .. owner, created, ARGV[1]) end
notify(ARGV[1])
return 1
"""
_CREATE = _NOTIFY + _CREATE_BODY.replace("FIRST", "3")

# _CREATE under an idempotency key. KEYS: as _CREATE's, then the key's own key
# (<prefix>k:<sha256 of owner and key>). ARGV: batch id, slack, the key's value
# ("<batch id> <fingerprint> <expires_at>"), its Redis TTL, now, then the header's pairs.
# Returns 1, or {0, value} (deleting the staged keys) when the key holds a live batch.
_CREATE_KEYED = (
    _NOTIFY
    + """
local now = tonumber(ARGV[5])
if not redis.call('SET', KEYS[11], ARGV[3], 'NX', 'EX', tonumber(ARGV[4])) then
  local held = redis.call('GET', KEYS[11])
  local other, _, until_ = string.match(held, '^(%S+) (%S+) (%S+)$')
  local batch = string.sub(KEYS[1], 1, -#ARGV[1] - 1) .. other
  local expires = redis.call('HGET', batch, 'expires_at')
  if tonumber(until_) > now and expires and tonumber(expires) > now then
    redis.call('DEL', KEYS[8], KEYS[9], KEYS[10])
    return {0, held}
  end
  redis.call('SET', KEYS[11], ARGV[3], 'EX', tonumber(ARGV[4]))
end
"""
    + _CREATE_BODY.replace("FIRST", "6")
)

# Shared by the scripts below: KEYS are always batch hash, items hash, order list, expiry
# zset, leases zset, changes zset, status zset (_keys' order).
# The stats blob (pack_stats' format) in Lua: decoded, encoded, and one group added;
# shared by the general scripts (_PRELUDE) and the tracker's event (_EVENT).
_STATS_LUA = """
local SEP = string.char(31)  -- pack_stats' separator between names
local function decode_stats(blob)
  local count = struct.unpack('<H', blob)
  local sums = {struct.unpack('<H' .. string.rep('d', count), blob)}
  local pos = table.remove(sums)
  table.remove(sums, 1)
  local names, index = {}, {}
  for name in string.gmatch(string.sub(blob, pos), '[^' .. SEP .. ']+') do
    names[#names + 1] = name
    index[name] = #names
  end
  return names, sums, index
end
local function encode_stats(names, sums)
  return struct.pack('<H' .. string.rep('d', #names), #names, unpack(sums, 1, #names))
    .. table.concat(names, SEP)
end
-- Add one stats group (names joined by `sep`, ',' when nil; coefficients as packed
-- doubles, powers as digits) for an item that spent `elapsed` seconds in the group's
-- source status.
local function add_group(names, sums, index, group_names, coefs, powers, elapsed, sep)
  local coef = {struct.unpack('<' .. string.rep('d', #coefs / 8), coefs)}
  local square = elapsed * elapsed  -- the powers as add_stats makes them, bit for bit
  local small = {1.0, elapsed, square, square * elapsed, square * square}
  local k = 0
  for name in string.gmatch(group_names, '[^' .. (sep or ',') .. ']+') do
    k = k + 1
    local at_name = index[name]
    if not at_name then
      names[#names + 1] = name
      sums[#names] = 0
      at_name = #names
      index[name] = at_name
    end
    local power = string.byte(powers, k) - 48
    sums[at_name] = sums[at_name] + coef[k] * (small[power + 1] or elapsed ^ power)
  end
end
"""

_PRELUDE = (
    _NOTIFY
    + _STATS_LUA
    + """
-- The id of the call (of each transition in it) that move() marks an item with, so that
-- a repeat of that very call, sent again after its answer was lost, is known (nil: none).
local CALL = nil
local header_fields = {'owner', 'created_at', 'updated_at', 'finished_at', 'expires_at',
  'version', 'total', 'completed', 'failed', 'processing', 'pending', 'stats'}
local header_index = {}
for i, name in ipairs(header_fields) do header_index[name] = i end
local function reply(outcome, previous, raw)
  local values = redis.call('HMGET', KEYS[1], unpack(header_fields))
  local stats = table.remove(values)
  return {outcome, previous, raw, values, stats}
end
-- Key TTLs are a safety net behind purge_expired: refresh them when the batch finishes,
-- and otherwise at most hourly, not on every event. An open batch's keys get an hour
-- more than it needs, so that refreshing hourly never lets them die before the batch.
local function refresh_ttl(batch_id, new_expiry, at, slack, finished)
  local ttl = math.max(1, math.ceil(tonumber(new_expiry) - at + tonumber(slack)))
  if not finished then ttl = ttl + 3600 end
  if finished or redis.call('TTL', KEYS[1]) < ttl - 3600 then
    for _, i in ipairs({1, 2, 3, 6, 7}) do redis.call('EXPIRE', KEYS[i], ttl) end
    redis.call('ZADD', KEYS[4], new_expiry, batch_id)
  end
end
-- Move an item (decoded) to target at `at` (a string), as a transition that applies,
-- its change counted at batch version `version`.
local function move(item_id, item, target, error, at, lease, attempts, version)
  item.w = item.s  -- what a repeat of the call answers as its previous status
  item.n = CALL
  item.s = target
  redis.call('ZADD', KEYS[6], version, item_id)
  if item.p then redis.call('ZADD', KEYS[7], target * 4294967296 + item.p, item_id) end
  if error ~= '' then item.e = error else item.e = cjson.null end
  item.q = nil  -- a report lasts while the item runs
  item.g = nil
  item.t = at
  if attempts == '+' then item.a = (item.a or 0) + 1 elseif attempts == '0' then item.a = 0 end
  local member = ARGV[1] .. SEP .. item_id
  if lease ~= '' then
    item.l = lease
    item.h = at
    redis.call('ZADD', KEYS[5], lease, member)
  elseif item.l then
    item.l = nil
    redis.call('ZREM', KEYS[5], member)
  end
  local raw = cjson.encode(item)
  redis.call('HSET', KEYS[2], item_id, raw)
  return raw
end
-- Stats in pack_stats' format: decoded into names, sums and each name's index, and
-- encoded back, one struct call each way (not one per value).
-- The end marker of a batch a transition just ended, in the webhook outbox (the keys
-- <prefix>outbox, <prefix>outbox:ready and <prefix>outbox:ends, named after KEYS[4]).
local function ended(batch_id, version, at)
  local p = string.sub(KEYS[4], 1, -7)
  local id = 'end:' .. batch_id .. ':' .. version
  local entry = cjson.encode({b = batch_id, v = version, t = at})
  if redis.call('HSETNX', p .. 'outbox', id, entry) == 1 then
    redis.call('ZADD', p .. 'outbox:ready', at, id)
    redis.call('HSET', p .. 'outbox:ends', batch_id,
      (redis.call('HGET', p .. 'outbox:ends', batch_id) or '') .. id .. ' ')
  end
end
-- The header after items moved: counts, version, times and expiry.
local function settle(head, counts, changes, at, expires_open, expires_finished)
  local update = {'pending', counts[1], 'processing', counts[2], 'completed', counts[3],
    'failed', counts[4], 'version', tonumber(head[6]) + changes, 'updated_at', at}
  local finished = counts[1] + counts[2] == 0
  local new_expiry = expires_open
  update[#update + 1] = 'finished_at'
  if finished then
    new_expiry = expires_finished
    update[#update + 1] = at
  else
    update[#update + 1] = ''
  end
  update[#update + 1] = 'expires_at'
  update[#update + 1] = new_expiry
  return update, finished, new_expiry
end
"""
)

# ARGV: batch id, item id, target code, source codes, at, error ('' = none),
#       expires_open, expires_finished, slack, lease_until ('' = none), attempts ('+' add
#       one, '0' reset, '' keep), lost_before ('' = none), max_attempts ('' = none),
#       unless_paused ('1' = refuse while the batch's field paused is '1'), then the
#       stats contributions: the number of groups, and per group: source code, names
#       joined by ',', coefficients packed as little-endian doubles, powers as one digit
#       each; last, the call's id (RedisStore._fast's kind: a repeat of the call is
#       answered as applied).
# Returns: outcome, previous code, the item's JSON, the header fields (in _HEADER's
# order), and the stats field (pack_stats format: exact doubles, one value).
_APPLY_BODY = """
local at = tonumber(ARGV[5])
CALL = ARGV[#ARGV]
-- The whole header, read once: the reply is made from it and the update (no re-read).
local values = redis.call('HMGET', KEYS[1], unpack(header_fields))
if not values[5] or tonumber(values[5]) <= at then return {'nobatch'} end
local head = {values[5], values[11], values[10], values[8], values[9], values[6], values[12]}
local function answer(outcome, previous, raw, update)
  if update then
    for i = 1, #update, 2 do values[header_index[update[i]]] = update[i + 1] end
  end
  local stats = table.remove(values)
  return {outcome, previous, raw, values, stats}
end
local raw = redis.call('HGET', KEYS[2], ARGV[2])
if not raw then return {'noitem'} end
local item = cjson.decode(raw)
local previous = item.s
local target = tonumber(ARGV[3])
if previous == target then
  -- This very call sent again (its answer was lost after it applied).
  if item.n == CALL then return answer('applied', item.w or previous, raw) end
  return answer('unchanged', previous, raw)
end
if not string.find(ARGV[4], tostring(previous), 1, true) then
  return answer('rejected', previous, raw)
end
if ARGV[12] ~= '' and (not item.l or tonumber(item.l) > tonumber(ARGV[12])) then
  return answer('rejected', previous, raw)
end
if ARGV[13] ~= '' and (item.a or 0) >= tonumber(ARGV[13]) then
  return answer('rejected', previous, raw)
end
if ARGV[14] == '1' and redis.call('HGET', KEYS[1], 'paused') == '1' then
  return answer('paused', previous, raw)
end
-- Times travel as strings: cjson keeps only 14 significant digits of a number.
local elapsed = at - tonumber(item.t)
raw = move(ARGV[2], item, target, ARGV[6], ARGV[5], ARGV[10], ARGV[11], tonumber(head[6]) + 1)
-- The fifth, cancelled, is never written: it is what the total leaves over.
local counts = {tonumber(head[2]), tonumber(head[3]), tonumber(head[4]), tonumber(head[5]), 0}
counts[previous + 1] = counts[previous + 1] - 1
counts[target + 1] = counts[target + 1] + 1
local update, finished, new_expiry = settle(head, counts, 1, ARGV[5], ARGV[7], ARGV[8])
-- Stats live in one field in pack_stats' format and are added here in doubles, exactly
-- as the other stores do in Python.
for g = 0, tonumber(ARGV[15]) - 1 do
  local base = 16 + 4 * g
  if tonumber(ARGV[base]) == previous then
    local names, sums, index = decode_stats(head[7])
    add_group(names, sums, index, ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], elapsed)
    update[#update + 1] = 'stats'
    update[#update + 1] = encode_stats(names, sums)
  end
end
redis.call('HSET', KEYS[1], unpack(update))
refresh_ttl(ARGV[1], new_expiry, at, ARGV[9], finished)
if finished and (not values[4] or values[4] == '') then
  ended(ARGV[1], tonumber(head[6]) + 1, ARGV[5])
end
notify(ARGV[1])
return answer('applied', previous, raw, update)
"""
_APPLY = _PRELUDE + _APPLY_BODY

# The tracker's event (a start, completion or failure; RedisStore._apply_parts), the
# same transition as _APPLY with the fewest server calls: two keys, eleven short
# arguments, the other keys named from the prefix, one stats group at most, the header
# fields it changes written and no others.
# KEYS: batch hash, items hash. ARGV: batch id, item id, target code, source codes, at,
#       expires_open, expires_finished, slack, lease_until ('' = none; a lease means a
#       start: one more attempt, refused while paused), error ('' = none), then the
#       stats group ('' = none): source code, powers as one digit each, ':' and the names
#       joined by \x1f, and its coefficients as little-endian doubles; then the
#       created_at and total the caller kept for the batch, as '<created_at> <total>'
#       ('' = none); then the call's id (RedisStore._fast: unique to the call, the same
#       when it is sent again).
# Returns: outcome, previous code, the item's JSON, created_at and total (both '' when
# the caller kept these very ones), expires_at, version, completed, failed, processing,
# pending, stats (or {'nobatch'} / {'noitem'}).
_EVENT_BODY = """
local at = tonumber(ARGV[5])
-- finished_at is not read: an event that applies never finds its batch finished (it
-- moves a pending or processing item).
local h = redis.call('HMGET', KEYS[1], 'expires_at', 'version', 'pending', 'processing',
  'completed', 'failed', 'stats', 'paused', 'created_at', 'total')
if not h[1] or tonumber(h[1]) <= at then return {'nobatch'} end
-- created_at and total never change while a batch lives, but a batch id can be deleted
-- (or expire) and made again: sent back unless the caller kept these very ones.
local created, total = h[9] or '', h[10] or ''
if ARGV[13] == created .. ' ' .. total then created, total = '', '' end
local raw = redis.call('HGET', KEYS[2], ARGV[2])
if not raw then return {'noitem'} end
local item = cjson.decode(raw)
local previous = item.s
local target = tonumber(ARGV[3])
local outcome = nil
if previous == target then
  -- This very call sent again (its answer was lost after it applied): answered as
  -- applied again, not as unchanged.
  if item.n == ARGV[14] then
    return {'applied', item.w or previous, raw, created, total, h[1], h[2], h[5], h[6], h[4],
      h[3], h[7]}
  end
  outcome = 'unchanged'
elseif not string.find(ARGV[4], previous, 1, true) then
  outcome = 'rejected'
elseif ARGV[9] ~= '' and h[8] == '1' then
  outcome = 'paused'
end
if outcome then
  return {outcome, previous, raw, created, total, h[1], h[2], h[5], h[6], h[4], h[3], h[7]}
end
local p = string.sub(KEYS[1], 1, -#ARGV[1] - 3)
local version = tonumber(h[2]) + 1
-- Times travel as strings: cjson keeps only 14 significant digits of a number.
local elapsed = at - tonumber(item.t)
redis.call('ZADD', p .. 'c:' .. ARGV[1], version, ARGV[2])
if item.p then
  redis.call('ZADD', p .. 's:' .. ARGV[1], target * 4294967296 + item.p, ARGV[2])
end
item.w = previous  -- what a repeat of this call answers as its previous status
item.n = ARGV[14]
item.s = target
if ARGV[10] ~= '' then item.e = ARGV[10] else item.e = cjson.null end
item.q = nil  -- a report lasts while the item runs
item.g = nil
item.t = ARGV[5]
if ARGV[9] ~= '' then
  item.a = (item.a or 0) + 1
  item.l = ARGV[9]
  item.h = ARGV[5]
  redis.call('ZADD', p .. 'leases', ARGV[9], ARGV[1] .. '\\031' .. ARGV[2])
elseif item.l then
  item.l = nil
  redis.call('ZREM', p .. 'leases', ARGV[1] .. '\\031' .. ARGV[2])
end
raw = cjson.encode(item)
redis.call('HSET', KEYS[2], ARGV[2], raw)
-- pending, processing, completed, failed (h[3] to h[6]); cancelled is never written.
local counts = {tonumber(h[3]), tonumber(h[4]), tonumber(h[5]), tonumber(h[6]), 0}
counts[previous + 1] = counts[previous + 1] - 1
counts[target + 1] = counts[target + 1] + 1
local finished = counts[1] + counts[2] == 0
local expires = finished and ARGV[7] or ARGV[6]
local update = {'version', version, 'updated_at', ARGV[5], 'expires_at', expires}
local names = {'pending', 'processing', 'completed', 'failed'}
for _, code in ipairs({previous, target}) do
  if code < 4 then
    update[#update + 1] = names[code + 1]
    update[#update + 1] = counts[code + 1]
  end
end
if finished then
  update[#update + 1] = 'finished_at'
  update[#update + 1] = ARGV[5]
end
local stats = h[7]
if ARGV[11] ~= '' and tonumber(string.sub(ARGV[11], 1, 1)) == previous then
  stats = add_stats(stats, ARGV[11], ARGV[12], elapsed)
  update[#update + 1] = 'stats'
  update[#update + 1] = stats
end
redis.call('HSET', KEYS[1], unpack(update))
local ttl = math.max(1, math.ceil(tonumber(expires) - at + tonumber(ARGV[8])))
if not finished then ttl = ttl + 3600 end
if finished or redis.call('TTL', KEYS[1]) < ttl - 3600 then
  for _, key in ipairs({KEYS[1], KEYS[2], p .. 'o:' .. ARGV[1], p .. 'c:' .. ARGV[1],
      p .. 's:' .. ARGV[1]}) do
    redis.call('EXPIRE', key, ttl)
  end
  redis.call('ZADD', p .. 'expiry', expires, ARGV[1])
end
if finished then
  local id = 'end:' .. ARGV[1] .. ':' .. version
  local entry = cjson.encode({b = ARGV[1], v = version, t = ARGV[5]})
  if redis.call('HSETNX', p .. 'outbox', id, entry) == 1 then
    redis.call('ZADD', p .. 'outbox:ready', ARGV[5], id)
    redis.call('HSET', p .. 'outbox:ends', ARGV[1],
      (redis.call('HGET', p .. 'outbox:ends', ARGV[1]) or '') .. id .. ' ')
  end
end
redis.call('PUBLISH', p .. 'changes', ARGV[1])
return {'applied', previous, raw, created, total, expires, version, counts[3], counts[4],
  counts[2], counts[1], stats}
"""

# Adds one stats group (as _EVENT's ARGV takes it) to a stats blob (pack_stats' format)
# for an item that spent `elapsed` seconds in the group's source status, as add_stats
# does in Python (the same powers: elapsed * elapsed, then times elapsed or squared).
# When the group's names lie in the blob in a row (as the tracker's always do once
# there), only the doubles are decoded and encoded; otherwise names are matched one by one.
_ADD_STATS = """
local function add_stats(blob, group, coefs, elapsed)
  local cut = string.find(group, ':', 1, true)
  local powers = string.sub(group, 2, cut - 1)
  local gnames = string.sub(group, cut + 1)
  local k = #powers
  local fmt = '<' .. string.rep('d', k)
  local coef = {struct.unpack(fmt, coefs)}
  local square = elapsed * elapsed
  local small = {1.0, elapsed, square, square * elapsed, square * square}
  local count = struct.unpack('<H', blob)
  local names_at = 3 + 8 * count
  local at = string.find(blob, gnames, names_at, true)
  if at and (at == names_at or string.byte(blob, at - 1) == 31)
      and (at + #gnames > #blob or string.byte(blob, at + #gnames) == 31) then
    -- The group's sums lie in a row: decode and encode those k doubles only.
    local before = 0
    for _ in string.gmatch(string.sub(blob, names_at, at - 1), SEP) do before = before + 1 end
    local first = 3 + 8 * before
    local sums = {struct.unpack(fmt, blob, first)}
    for i = 1, k do
      local power = string.byte(powers, i) - 48
      sums[i] = sums[i] + coef[i] * (small[power + 1] or elapsed ^ power)
    end
    return string.sub(blob, 1, first - 1) .. struct.pack(fmt, unpack(sums, 1, k))
      .. string.sub(blob, first + 8 * k)
  end
  local names, sums, index = decode_stats(blob)
  add_group(names, sums, index, gnames, coefs, powers, elapsed, SEP)
  return encode_stats(names, sums)
end
"""

_EVENT = _STATS_LUA + _ADD_STATS + _EVENT_BODY

# ARGV: batch id, then per transition: how many arguments it has, and _APPLY's ARGV;
# last the call's id (RedisStore._fast), transition i's being '<id>.<i>'.
# Every item is checked before anything changes; then each transition is judged and
# applied as _APPLY would, on the header kept here (read once, written once, one
# notification), its reply made from the header as it is right after it.
# Returns: {'nobatch'}, {'noitem', item id}, or one _APPLY reply per transition.
_APPLY_ALL = (
    _PRELUDE
    + _ADD_STATS
    + """
local calls, ids = {}, {}
local n = 2
while n < #ARGV do
  local size = tonumber(ARGV[n])
  local args = {}
  for i = 1, size do args[i] = ARGV[n + i] end
  calls[#calls + 1] = args
  ids[#ids + 1] = args[2]
  n = n + size + 1
end
if #calls == 0 then return {} end
local values = redis.call('HMGET', KEYS[1], unpack(header_fields))
local found = redis.call('HMGET', KEYS[2], unpack(ids))
local raws = {}
for i, args in ipairs(calls) do
  if not values[5] or tonumber(values[5]) <= tonumber(args[5]) then return {'nobatch'} end
  if not found[i] then return {'noitem', args[2]} end
  raws[args[2]] = found[i]
end
local paused = redis.call('HGET', KEYS[1], 'paused') == '1'
-- The fifth, cancelled, is never written: it is what the total leaves over.
local counts = {tonumber(values[11]), tonumber(values[10]), tonumber(values[8]),
  tonumber(values[9]), 0}
local version = tonumber(values[6])
local replies = {}
local last_at, slack, finished = nil, nil, false
for i, A in ipairs(calls) do
  local raw = raws[A[2]]
  local item = cjson.decode(raw)
  local previous = item.s
  local target = tonumber(A[3])
  local outcome = nil
  if previous == target then
    -- This very call sent again (its answer was lost after it applied).
    if item.n == ARGV[#ARGV] .. '.' .. i then
      outcome = 'applied'
      previous = item.w or previous
    else
      outcome = 'unchanged'
    end
  elseif not string.find(A[4], tostring(previous), 1, true) then
    outcome = 'rejected'
  elseif A[12] ~= '' and (not item.l or tonumber(item.l) > tonumber(A[12])) then
    outcome = 'rejected'
  elseif A[13] ~= '' and (item.a or 0) >= tonumber(A[13]) then
    outcome = 'rejected'
  elseif A[14] == '1' and paused then
    outcome = 'paused'
  end
  if not outcome then
    outcome = 'applied'
    CALL = ARGV[#ARGV] .. '.' .. i
    local at = tonumber(A[5])
    -- Times travel as strings: cjson keeps only 14 significant digits of a number.
    local elapsed = at - tonumber(item.t)
    version = version + 1
    raw = move(A[2], item, target, A[6], A[5], A[10], A[11], version)
    raws[A[2]] = raw
    counts[previous + 1] = counts[previous + 1] - 1
    counts[target + 1] = counts[target + 1] + 1
    for g = 0, tonumber(A[15]) - 1 do
      local base = 16 + 4 * g
      if tonumber(A[base]) == previous then
        local group = A[base] .. A[base + 3] .. ':' .. (string.gsub(A[base + 1], ',', SEP))
        values[12] = add_stats(values[12], group, A[base + 2], elapsed)
      end
    end
    finished = counts[1] + counts[2] == 0
    if finished and (not values[4] or values[4] == '') then
      ended(ARGV[1], version, A[5])
    end
    values[3] = A[5]
    if finished then
      values[4] = A[5]
      values[5] = A[8]
    else
      values[4] = ''
      values[5] = A[7]
    end
    values[6] = version
    values[8], values[9], values[10], values[11] = counts[3], counts[4], counts[2], counts[1]
    last_at, slack = at, A[9]
  end
  replies[i] = {outcome, previous, raw, {unpack(values, 1, 11)}, values[12]}
end
if last_at then
  redis.call('HSET', KEYS[1], 'pending', counts[1], 'processing', counts[2],
    'completed', counts[3], 'failed', counts[4], 'version', version,
    'updated_at', values[3], 'finished_at', values[4], 'expires_at', values[5])
  if values[12] then redis.call('HSET', KEYS[1], 'stats', values[12]) end
  refresh_ttl(ARGV[1], values[5], last_at, slack, finished)
  notify(ARGV[1])
end
return replies
"""
)

# ARGV: batch id, item id, at, lease_until, expires_open, slack.
_RENEW = (
    _PRELUDE
    + """
local at = tonumber(ARGV[3])
local expires = redis.call('HGET', KEYS[1], 'expires_at')
if not expires or tonumber(expires) <= at then return {'nobatch'} end
local raw = redis.call('HGET', KEYS[2], ARGV[2])
if not raw then return {'noitem'} end
local item = cjson.decode(raw)
if item.s ~= 1 then return reply('rejected', item.s, raw) end
item.l = ARGV[4]
item.h = ARGV[3]
raw = cjson.encode(item)
redis.call('HSET', KEYS[2], ARGV[2], raw)
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[1] .. SEP .. ARGV[2])
redis.call('HSET', KEYS[1], 'expires_at', ARGV[5])
refresh_ttl(ARGV[1], ARGV[5], at, ARGV[6], false)
return reply('applied', 1, raw)
"""
)

# ARGV: as _APPLY's first nine (the item id unused), attempts ('0' reset, '' keep), the
#       call's id (RedisStore._call_id), then the item ids (none: every item in a source
#       status).
# Returns: {'applied', count, header fields, stats} or {'rejected', id, code, id, code...}.
_APPLY_MANY = (
    _PRELUDE
    + """
local at = tonumber(ARGV[5])
local head = redis.call('HMGET', KEYS[1], 'expires_at', 'pending', 'processing',
  'completed', 'failed', 'version', 'finished_at')
if not head[1] or tonumber(head[1]) <= at then return {'nobatch'} end
local target = tonumber(ARGV[3])
CALL = ARGV[11]  -- move() marks the items it moves with it
local function allowed(code)
  return code ~= target and string.find(ARGV[4], tostring(code), 1, true) ~= nil
end
local chosen = {}
-- Items this very call moved already: it is a repeat, sent again after its answer was
-- lost, and is answered as it was then, changing nothing more.
local again = 0
if #ARGV > 11 then
  local rejected = {'rejected'}
  local seen = {}
  for i = 12, #ARGV do
    local id = ARGV[i]
    if not seen[id] then
      seen[id] = true
      local raw = redis.call('HGET', KEYS[2], id)
      if not raw then return {'noitem', id} end
      local item = cjson.decode(raw)
      if item.n == CALL then
        again = again + 1
      elseif allowed(item.s) then
        chosen[#chosen + 1] = {id, item}
      else
        rejected[#rejected + 1] = id
        rejected[#rejected + 1] = item.s
      end
    end
  end
  if #rejected > 1 and again == 0 then return rejected end
else
  local all = redis.call('HGETALL', KEYS[2])
  for i = 1, #all, 2 do
    local item = cjson.decode(all[i + 1])
    if item.n == CALL then
      again = again + 1
    elseif allowed(item.s) then
      chosen[#chosen + 1] = {all[i], item}
    end
  end
end
if again > 0 then
  local values = redis.call('HMGET', KEYS[1], unpack(header_fields))
  table.remove(values)
  return {'applied', again, values}
end
-- Versions are counted in creation order.
table.sort(chosen, function(a, b) return (a[2].p or 0) < (b[2].p or 0) end)
local counts = {tonumber(head[2]), tonumber(head[3]), tonumber(head[4]), tonumber(head[5]), 0}
for n, pair in ipairs(chosen) do
  local previous = pair[2].s
  counts[previous + 1] = counts[previous + 1] - 1
  counts[target + 1] = counts[target + 1] + 1
  -- One version each, in order, as if applied one by one.
  move(pair[1], pair[2], target, ARGV[6], ARGV[5], '', ARGV[10], tonumber(head[6]) + n)
end
if #chosen > 0 then
  local update, finished, new_expiry = settle(head, counts, #chosen, ARGV[5], ARGV[7], ARGV[8])
  redis.call('HSET', KEYS[1], unpack(update))
  refresh_ttl(ARGV[1], new_expiry, at, ARGV[9], finished)
  if finished and (not head[7] or head[7] == '') then
    ended(ARGV[1], tonumber(head[6]) + #chosen, ARGV[5])
  end
  notify(ARGV[1])
end
local values = redis.call('HMGET', KEYS[1], unpack(header_fields))
table.remove(values)
return {'applied', #chosen, values}
"""
)

# ARGV: batch id, paused ('1' to pause, '' to unpause), at, expires_open, slack.
# Returns 1 when the flag changed, 0 when not (finished, or already so), or 'nobatch'.
_PAUSE = (
    _PRELUDE
    + """
local at = tonumber(ARGV[3])
local head = redis.call('HMGET', KEYS[1], 'expires_at', 'finished_at', 'paused', 'version')
if not head[1] or tonumber(head[1]) <= at then return 'nobatch' end
local open = not head[2] or head[2] == ''
local want = ARGV[2] == '1'
if (head[3] == '1') == want or (want and not open) then return 0 end
local update = {'paused', want and '1' or '0', 'version', tonumber(head[4]) + 1,
  'updated_at', ARGV[3]}
if open then
  update[#update + 1] = 'expires_at'
  update[#update + 1] = ARGV[4]
end
redis.call('HSET', KEYS[1], unpack(update))
if open then refresh_ttl(ARGV[1], ARGV[4], at, ARGV[5], false) end
notify(ARGV[1])
return 1
"""
)

# ARGV: batch id, item id, fraction (a string: cjson keeps 14 digits), '1' when a stage
# is given, the stage, at, expires_open, slack. The item's JSON keeps them as q and g.
# Returns: {'applied' or 'rejected', the item's JSON}, or 'nobatch' / 'noitem'.
_REPORT = (
    _PRELUDE
    + """
local at = tonumber(ARGV[6])
local expires = redis.call('HGET', KEYS[1], 'expires_at')
if not expires or tonumber(expires) <= at then return 'nobatch' end
local raw = redis.call('HGET', KEYS[2], ARGV[2])
if not raw then return 'noitem' end
local item = cjson.decode(raw)
if item.s ~= 1 then return {'rejected', raw} end
item.q = ARGV[3]
if ARGV[4] == '1' then item.g = ARGV[5] else item.g = nil end
raw = cjson.encode(item)
redis.call('HSET', KEYS[2], ARGV[2], raw)
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('ZADD', KEYS[6], version, ARGV[2])
redis.call('HSET', KEYS[1], 'updated_at', ARGV[6], 'expires_at', ARGV[7])
refresh_ttl(ARGV[1], ARGV[7], at, ARGV[8], false)
notify(ARGV[1])
return {'applied', raw}
"""
)

# KEYS: leases zset. ARGV: now, limit, key prefix. Members of batches that are gone or
# expired, or whose item no longer holds that lease, are dropped on the way.
_LOST = """
local SEP = string.char(31)
local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local found = {}
local offset = 0
while #found < 5 * limit do
  local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES',
    'LIMIT', offset, limit)
  if #members == 0 then break end
  local kept = 0
  for i = 1, #members, 2 do
    local member = members[i]
    local cut = string.find(member, SEP, 1, true)
    local batch_id = string.sub(member, 1, cut - 1)
    local item_id = string.sub(member, cut + 1)
    local expires = redis.call('HGET', ARGV[3] .. 'b:' .. batch_id, 'expires_at')
    local raw = expires and tonumber(expires) > now
      and redis.call('HGET', ARGV[3] .. 'i:' .. batch_id, item_id)
    local item = raw and cjson.decode(raw)
    if item and item.s == 1 and item.l then
      if #found >= 5 * limit then break end
      kept = kept + 1
      found[#found + 1] = batch_id
      found[#found + 1] = item_id
      found[#found + 1] = tostring(item.a or 0)
      found[#found + 1] = item.h or item.t
      found[#found + 1] = item.l
    else
      redis.call('ZREM', KEYS[1], member)
    end
  end
  if #found >= 5 * limit or #members < 2 * limit then break end
  offset = offset + kept
end
return found
"""

# KEYS: expiry zset. ARGV: now, limit, key prefix. Scores may be older than a batch's
# real expiry (refreshed hourly), so each is checked against the batch itself.
_EXPIRED = """
local now = tonumber(ARGV[1])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local found = {}
for _, id in ipairs(ids) do
  local expires = redis.call('HGET', ARGV[3] .. 'b:' .. id, 'expires_at')
  if expires and tonumber(expires) <= now then
    found[#found + 1] = id
    if #found >= tonumber(ARGV[2]) then break end
  end
end
return found
"""

# KEYS: expiry zset. ARGV: now, key prefix.
_OPEN = """
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local now = tonumber(ARGV[1])
local open = {}
for _, id in ipairs(ids) do
  local head = redis.call('HMGET', ARGV[2] .. 'b:' .. id, 'finished_at', 'expires_at')
  if head[2] and tonumber(head[2]) > now and (not head[1] or head[1] == '') then
    open[#open + 1] = id
  end
end
return open
"""

# KEYS: as _keys. ARGV: status code ('' = any), after item id ('' = none), since
# version ('' = none), limit (-1 = none).
# Returns {'ok', header hash as field/value pairs, item id, item JSON, ...} in creation
# order, or {'nobatch'}, {'noitem'}, or {'legacy'} for a batch created before the indexes.
_READ = """
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return {'nobatch'} end
if redis.call('HEXISTS', KEYS[1], 'ix') == 0 then return {'legacy'} end
local start = 0
if ARGV[2] ~= '' then
  local raw = redis.call('HGET', KEYS[2], ARGV[2])
  if not raw then return {'noitem'} end
  start = cjson.decode(raw).p + 1
end
local limit = tonumber(ARGV[4])
local function fetch(ids)
  local raws = {}
  for i = 1, #ids, 1000 do
    local chunk = redis.call('HMGET', KEYS[2], unpack(ids, i, math.min(i + 999, #ids)))
    for j = 1, #chunk do raws[#raws + 1] = chunk[j] end
  end
  return raws
end
local out = {'ok', fields}
if ARGV[3] ~= '' then
  local ids = redis.call('ZRANGEBYSCORE', KEYS[6], '(' .. ARGV[3], '+inf')
  local raws = fetch(ids)
  local code = ARGV[1] ~= '' and tonumber(ARGV[1])
  local chosen = {}
  for i = 1, #ids do
    local item = cjson.decode(raws[i])
    if item.p >= start and (not code or item.s == code) then
      chosen[#chosen + 1] = {item.p, ids[i], raws[i]}
    end
  end
  table.sort(chosen, function(a, b) return a[1] < b[1] end)
  for i = 1, #chosen do
    if limit >= 0 and i > limit then break end
    out[#out + 1] = chosen[i][2]
    out[#out + 1] = chosen[i][3]
  end
  return out
end
local ids
if ARGV[1] ~= '' then
  local base = tonumber(ARGV[1]) * 4294967296
  ids = redis.call('ZRANGEBYSCORE', KEYS[7], base + start, '(' .. (base + 4294967296),
    'LIMIT', 0, limit)
elseif limit >= 0 then
  ids = redis.call('LRANGE', KEYS[3], start, start + limit - 1)
else
  ids = redis.call('LRANGE', KEYS[3], start, -1)
end
local raws = fetch(ids)
for i = 1, #ids do
  out[#out + 1] = ids[i]
  out[#out + 1] = raws[i]
end
return out
"""

# Removes the end markers of a batch that goes (its deliveries stay).
_DROP_MARKERS = """
local function drop_markers(p, batch_id)
  local ids = redis.call('HGET', p .. 'outbox:ends', batch_id)
  if ids then
    for id in string.gmatch(ids, '[^ ]+') do
      redis.call('HDEL', p .. 'outbox', id)
      redis.call('ZREM', p .. 'outbox:ready', id)
    end
    redis.call('HDEL', p .. 'outbox:ends', batch_id)
  end
end
"""

# The outbox: <prefix>outbox maps an entry id to its JSON (b: batch, v: version, t: end
# time, u: url, y: body, a: attempts), <prefix>outbox:ready scores each entry with when it
# may next be claimed: its due time, or the end of the lease it is held under.
# KEYS: outbox, ready. ARGV: now, limit, lease_until. Returns id, JSON, id, JSON, ...
_OUTBOX_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  local raw = redis.call('HGET', KEYS[1], id)
  if raw then
    redis.call('ZADD', KEYS[2], ARGV[3], id)
    out[#out + 1] = id
    out[#out + 1] = raw
  else
    redis.call('ZREM', KEYS[2], id)
  end
end
return out
"""

# KEYS: outbox, ready. ARGV: the marker's id, at, then each delivery's id and JSON.
_OUTBOX_EXPAND = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
for i = 3, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('ZADD', KEYS[2], ARGV[2], ARGV[i])
  end
end
"""

# KEYS: outbox, ready. ARGV: id, attempts, next_at.
_OUTBOX_RETRY = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local entry = cjson.decode(raw)
entry.a = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(entry))
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""

# KEYS: outbox, ready, gone set. ARGV: url. (The outbox holds what is waiting: scanned.)
_OUTBOX_UNSUBSCRIBE = """
redis.call('SADD', KEYS[3], ARGV[1])
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if cjson.decode(all[i + 1]).u == ARGV[1] then
    redis.call('HDEL', KEYS[1], all[i])
    redis.call('ZREM', KEYS[2], all[i])
  end
end
"""

# KEYS: expiry zset. ARGV: now, chunk size, key prefix. The zset's scores may be older
# than a batch's real expiry (they are refreshed hourly), so each is checked against the
# batch itself; being one script, a batch updated meanwhile is never removed.
_PURGE = (
    _DROP_MARKERS
    + """
local now = tonumber(ARGV[1])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local removed = 0
for _, id in ipairs(ids) do
  local batch = ARGV[3] .. 'b:' .. id
  local expires = redis.call('HGET', batch, 'expires_at')
  if expires and tonumber(expires) > now then
    redis.call('ZADD', KEYS[1], expires, id)
  else
    redis.call('DEL', batch, ARGV[3] .. 'i:' .. id, ARGV[3] .. 'o:' .. id,
      ARGV[3] .. 'c:' .. id, ARGV[3] .. 's:' .. id)
    redis.call('ZREM', KEYS[1], id)
    drop_markers(ARGV[3], id)
    local owner = redis.call('HGET', ARGV[3] .. 'listed', id)
    if owner then
      redis.call('HDEL', ARGV[3] .. 'listed', id)
      if owner ~= '' then redis.call('ZREM', ARGV[3] .. 'by:o:' .. owner, id) end
    end
    redis.call('ZREM', ARGV[3] .. 'by:all', id)
    redis.call('PUBLISH', ARGV[3] .. 'changes', id)
    removed = removed + 1
  end
end
return {removed, #ids}
"""
)


# KEYS: the index to walk (by:all or by:o:<owner>). ARGV: now, limit, after ('' for
# none), key prefix. Walks the index newest first from after, a chunk at a time,
# skipping batches expired at now (or already gone); returns {'ok', id, header hash as
# field/value pairs, ...} or {'noafter'} when after is not in the index.
_LIST = """
local now, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local start = 0
if ARGV[3] ~= '' then
  local rank = redis.call('ZREVRANK', KEYS[1], ARGV[3])
  if not rank then return {'noafter'} end
  start = rank + 1
end
local out, found = {'ok'}, 0
while found < limit do
  local ids = redis.call('ZREVRANGE', KEYS[1], start, start + limit - 1)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    local fields = redis.call('HGETALL', ARGV[4] .. 'b:' .. id)
    local expires = 0
    for i = 1, #fields, 2 do
      if fields[i] == 'expires_at' then expires = tonumber(fields[i + 1]) end
    end
    if expires > now then
      out[#out + 1] = id
      out[#out + 1] = fields
      found = found + 1
      if found >= limit then break end
    end
  end
  start = start + #ids
end
return out
"""


def _float(value: bytes | None) -> float | None:
    return None if value is None or value == b"" else float(value)


def _record(
    batch_id: str,
    header: Sequence[bytes | None],
    stats: Mapping[str, float],
    items: tuple[ItemSnapshot, ...] = (),
    paused: bool = False,
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
            int(total or 0),
            int(done or 0),
            int(failed or 0),
            int(running or 0),
            int(pending or 0),
            int(total or 0)
            - int(done or 0)
            - int(failed or 0)
            - int(running or 0)
            - int(pending or 0),
        ),
        stats=stats,
        items=items,
        paused=paused,
    )


def _from_fields(
    batch_id: str, fields: dict[bytes, bytes], items: tuple[ItemSnapshot, ...] = ()
) -> BatchRecord:
    header = [fields.get(name.encode()) for name in _HEADER]
    paused = fields.get(b"paused") == b"1"
    record = _record(batch_id, header, unpack_stats(fields[b"stats"]), items, paused)
    meta = fields.get(b"meta")
    if meta:
        record = attrs.evolve(record, metadata=unpack_metadata(meta.decode()))
    return record


_decode = json.JSONDecoder().decode  # json.loads without its checks of the input's type


def _item(item_id: str, raw: bytes) -> ItemSnapshot:
    data = _decode(raw.decode())
    fraction = data.get("q")
    return ItemSnapshot(
        item_id,
        data["f"],
        _STATUSES[data["s"]],
        data.get("e"),
        data.get("a", 0),
        data.get("r"),
        None if fraction is None else float(fraction),
        data.get("g"),
    )


def _item_json(item: ItemSnapshot, created_at: float, position: int) -> str:
    """A new item as the items hash keeps it."""
    fields = {
        "f": item.filename,
        "s": _CODE[item.status],
        "e": item.error,
        "t": repr(created_at),
        "a": item.attempts,
        "p": position,
    }
    if item.source is not None:
        fields["r"] = item.source
    return json.dumps(fields)


def _common_args(batch_id: str, item_id: str, transition: Transition) -> list[Any]:
    """The first nine ARGV of the transition scripts, in their order."""
    return [
        batch_id,
        item_id,
        _CODE[transition.target],
        "".join(str(_CODE[s]) for s in transition.sources),
        repr(transition.at),
        transition.error or "",
        repr(transition.expires_at_open),
        repr(transition.expires_at_finished),
        _SLACK,
    ]


def _optional(value: float | None) -> str:
    return "" if value is None else repr(value)


def _transition_result(batch_id: str, item_id: str, reply: list[Any]) -> TransitionResult:
    if reply[0] == b"nobatch":
        raise BatchNotFound(batch_id)
    if reply[0] == b"noitem":
        raise ItemNotFound(batch_id, item_id)
    # The header as _record reads it, without the BatchRecord.
    _, created, _, finished, expires, version, total, done, failed, running, pending = reply[3]
    total, done, failed = int(total or 0), int(done or 0), int(failed or 0)
    running, pending = int(running or 0), int(pending or 0)
    return TransitionResult(
        _OUTCOMES[reply[0]],
        _STATUSES[int(reply[1])],
        _item(item_id, reply[2]),
        Progress(total, done, failed, running, pending, total - done - failed - running - pending),
        int(version or 0),
        float(created or 0),
        _float(finished),
        float(expires or 0),
        PackedStats(reply[4]),
    )


def _version_from(version: Any, owner: Any, expires: Any) -> BatchVersion | None:
    """A :class:`BatchVersion` from the batch hash's ``version``, ``owner`` and
    ``expires_at`` fields as HMGET answers them (all None: no such batch)."""
    if version is None and expires is None:
        return None
    return BatchVersion(
        int(version or 0),
        None if owner in (None, b"") else owner.decode(),
        float(expires or 0),
    )


@attrs.define(eq=False, init=False)
class RedisStore(Store):
    """Batches in Redis, for web and processing workers on many hosts.

    Args:
        url: A Redis URL (``redis://host:6379/0``, ``rediss://...``, ``unix://...``).
        prefix: Put before every key, so several applications can share a server.
        client: An existing ``redis.Redis`` client to use instead of ``url`` (its pool
            is not closed by :meth:`close`).

    Raises:
        ValidationError: A URL redis-py cannot use, a bad prefix, or a ``client`` made
            with ``decode_responses=True`` (the store reads every answer as bytes).

    Every method raises :class:`~batchtrack.StoreError` (the redis-py error attached) when
    the server cannot be reached or answers with an error: never a silent success.

    Every change is published on the channel ``<prefix>changes``; :meth:`listen`
    subscribes to it on a connection of its own.
    """

    can_listen = True

    url: str | None
    prefix: str
    _client: Any
    _owns_client: bool
    _create: Any
    _stage: Any
    _read: Any
    _apply: Any
    _apply_all: Any = attrs.field(init=False, default=None)  # registered after init
    _event: Any = attrs.field(init=False, default=None)
    # The client's pool for _fast's direct calls; None for a client that is not a
    # plain redis.Redis with a pool (a single-connection client, a cluster...).
    _pool: Any = attrs.field(init=False, default=None)
    _idle: list[Any] = attrs.field(init=False, factory=list)  # _fast's idle connections
    # How many of the pool's connections _fast holds (idle or in use), under _lock.
    _borrowed: int = attrs.field(init=False, default=0)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    _calls: Iterator[str] = attrs.field(init=False, factory=_call_ids)  # _fast's call ids
    _closed: bool = attrs.field(init=False, default=False)  # close() was called
    _pid: int = attrs.field(init=False, factory=os.getpid)  # whose they are
    # Per stats group (source and names): the group as _EVENT takes it.
    _layouts: dict[tuple[Any, ...], str] = attrs.field(init=False, factory=dict)
    # Per batch: its created_at and total, which never change while it lives (_EVENT
    # need not send them again), and both as _EVENT compares them with the batch's own
    # ('<created_at> <total>': a batch deleted and made again under the same id has
    # others); forgotten all at once when _CONSTANTS_KEPT are kept, and on delete.
    _constants: dict[str, tuple[float, int, str]] = attrs.field(init=False, factory=dict)
    # Per event loop: the redis.asyncio client of version_of_async (made on first use)
    # and the started async generator that closes it.
    _async_reads: dict[Any, tuple[Any, AsyncGenerator[None, None]]] = attrs.field(
        init=False, factory=dict
    )
    _purge: Any
    _renew: Any
    _apply_many: Any
    _lost: Any
    _open: Any
    _expired: Any
    # Per set of stats names: the names and powers as the transition script takes them
    # (the tracker's names always carry the same powers).
    _groups: dict[tuple[str, ...], tuple[str, str]]
    _channel: str  # where every change is published
    _pause: Any
    _create_keyed: Any
    _report: Any
    _drop: Any  # the outbox's scripts
    _claim: Any
    _expand: Any
    _retry: Any
    _unsubscribe: Any
    _list: Any

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
            kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
            if kwargs.get("decode_responses"):  # every reply is read as bytes
                raise ValidationError(
                    "RedisStore needs a client that answers bytes: decode_responses=False"
                )
        self.__attrs_init__(
            url,
            prefix,
            client,
            owns,
            client.register_script(_CREATE),
            client.register_script(_STAGE),
            client.register_script(_READ),
            client.register_script(_APPLY),
            client.register_script(_PURGE),
            client.register_script(_RENEW),
            client.register_script(_APPLY_MANY),
            client.register_script(_LOST),
            client.register_script(_OPEN),
            client.register_script(_EXPIRED),
            {},
            f"{prefix}changes",
            client.register_script(_PAUSE),
            client.register_script(_CREATE_KEYED),
            client.register_script(_REPORT),
            client.register_script(_DROP_MARKERS + "drop_markers(ARGV[1], ARGV[2])"),
            client.register_script(_OUTBOX_CLAIM),
            client.register_script(_OUTBOX_EXPAND),
            client.register_script(_OUTBOX_RETRY),
            client.register_script(_OUTBOX_UNSUBSCRIBE),
            client.register_script(_LIST),
        )
        self._apply_all = client.register_script(_APPLY_ALL)
        self._event = client.register_script(_EVENT)
        if isinstance(client, redis.Redis) and getattr(client, "connection", None) is None:
            self._pool = client.connection_pool

    def _keys(self, batch_id: str) -> list[str]:
        p = self.prefix
        return [
            f"{p}b:{batch_id}",
            f"{p}i:{batch_id}",
            f"{p}o:{batch_id}",
            f"{p}expiry",
            f"{p}leases",
            f"{p}c:{batch_id}",
            f"{p}s:{batch_id}",
        ]

    def _call(self, script: Any, what: str, keys: list[str], args: list[Any]) -> Any:
        if self._closed:
            raise StoreError(f"Redis failed to {what}: the store is closed")
        try:
            return script(keys=keys, args=args)
        except RedisError as exc:
            raise StoreError(f"Redis failed to {what}: {exc}") from exc
        finally:
            if self._closed and self._owns_client:
                # close() ran meanwhile: the pool it disconnected has this call's
                # connection back, open again.
                with contextlib.suppress(RedisError, OSError):
                    self._client.connection_pool.disconnect(inuse_connections=False)

    def _refuse_closed(self, what: str) -> None:
        """Raise StoreError when the store is closed (as the other stores do), rather than
        open connections again."""
        if self._closed:
            raise StoreError(f"Redis failed to {what}: the store is closed")

    def close(self) -> None:
        """Release the connections (of a pool this store created). Every call after it
        raises :class:`~batchtrack.StoreError`; calls under way end, their connections
        closed."""
        self._fresh()
        self._closed = True  # a call under way closes its connection when done
        self._drain()
        if self._owns_client:
            self._client.close()

    def listen(self, on_change: Callable[[str | None], None], stop: threading.Event) -> None:
        """Subscribe to ``<prefix>changes`` and report each published batch id.

        The subscription has a connection of its own that never reconnects by itself:
        when it drops (the server restarts, ``CLIENT KILL``, the network), this raises
        :class:`~batchtrack.StoreError` and the caller decides when to listen again (that
        listen reports ``on_change(None)`` once subscribed: what was published meanwhile
        is lost). A silent connection is pinged after 5 s and given up after 15 s.
        """
        client, owned = self._listening_client()
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(self._channel)
            heard = time.monotonic()
            pinged = False
            while not stop.is_set():
                message = pubsub.get_message(timeout=1.0)
                now = time.monotonic()
                if message is None:
                    if now - heard > _DEAD_AFTER:
                        raise StoreError(
                            f"Redis change notifications: no answer for {_DEAD_AFTER:g} s"
                        )
                    if now - heard > _PING_AFTER and not pinged:
                        pubsub.ping()
                        pinged = True
                    continue
                heard, pinged = now, False
                if message["type"] == "message":
                    on_change(message["data"].decode())
                elif message["type"] == "subscribe":
                    on_change(None)
        except RedisError as exc:
            raise StoreError(f"Redis change notifications stopped: {exc}") from exc
        finally:
            with contextlib.suppress(RedisError, OSError):
                pubsub.close()
                if owned:
                    client.close()

    def _listening_client(self) -> tuple[Any, bool]:
        """A client for :meth:`listen` and whether it is ours to close: made from the URL
        with retries off, so that a dropped subscription is an error here rather than a
        silent reconnect (what was published meanwhile would be lost unnoticed). Given a
        ``client`` instead of a URL, that client, retries and all: its reconnects come
        back as a fresh ``subscribe`` confirmation, which reports ``on_change(None)``."""
        if self.url is None:
            return self._client, False
        own = redis.Redis.from_url(
            self.url, socket_timeout=10, socket_connect_timeout=5, retry=Retry(NoBackoff(), 0)
        )
        return own, True

    def create(self, batch: BatchRecord, items: Sequence[ItemSnapshot]) -> None:
        self._create_batch(batch, items, None)

    def create_keyed(
        self,
        batch: BatchRecord,
        items: Sequence[ItemSnapshot],
        key: str,
        fingerprint: str,
        key_expires_at: float,
    ) -> tuple[str, str] | None:
        name = hashlib.sha256(json.dumps([batch.owner, key]).encode()).hexdigest()
        ttl = max(1, math.ceil(key_expires_at - batch.created_at) + _SLACK)
        value = f"{batch.batch_id} {fingerprint} {key_expires_at!r}"
        keyed = ([f"{self.prefix}k:{name}"], [value, ttl, repr(batch.created_at)])
        return self._create_batch(batch, items, keyed)

    def _create_batch(
        self,
        batch: BatchRecord,
        items: Sequence[ItemSnapshot],
        keyed: tuple[list[str], list[Any]] | None,
    ) -> tuple[str, str] | None:
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
        header += ["ix", "1"]  # keeps the c: and s: indexes (batches since 0.2)
        meta = pack_metadata(batch.metadata)
        if meta is not None:
            header += ["meta", meta]
        staging = f"{self.prefix}new:{uuid.uuid4().hex}:"
        staged = [f"{staging}i", f"{staging}o", f"{staging}s"]
        what = f"create batch {batch.batch_id!r}"
        self._refuse_closed(what)
        try:
            # Chunks go out as they are encoded, so only one chunk of JSON is ever held.
            with self._client.pipeline(transaction=False) as pipe:
                for first in range(0, len(items), _CREATE_CHUNK):
                    args: list[Any] = [_STAGING_TTL, first]
                    for n, item in enumerate(items[first : first + _CREATE_CHUNK], first):
                        args += [item.id, _item_json(item, batch.created_at, n)]
                    self._stage(keys=staged, args=args, client=pipe)
                    if len(pipe) >= _CREATE_PIPELINE:
                        pipe.execute()
                pipe.execute()
        except RedisError as exc:
            raise StoreError(f"Redis failed to {what}: {exc}") from exc
        if keyed is None:
            created = self._call(
                self._create,
                what,
                self._keys(batch.batch_id) + staged,
                [batch.batch_id, _SLACK, *header],
            )
        else:
            created = self._call(
                self._create_keyed,
                what,
                self._keys(batch.batch_id) + staged + keyed[0],
                [batch.batch_id, _SLACK, *keyed[1], *header],
            )
            if isinstance(created, list):
                held = created[1].decode() if isinstance(created[1], bytes) else created[1]
                other, digest, _ = held.split(" ")
                return other, digest
        if not created:
            raise StoreError(f"batch {batch.batch_id!r} exists already")
        return None

    def apply(self, batch_id: str, transition: Transition) -> TransitionResult:
        # With a call id, as _fast's calls: redis-py's retries of it are known as repeats.
        self._fresh()
        reply = self._call(
            self._apply,
            f"update batch {batch_id!r}",
            self._keys(batch_id),
            [*self._args(batch_id, transition), next(self._calls)],
        )
        return _transition_result(batch_id, transition.item_id, reply)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.apply is not RedisStore.apply:  # what it applies must be what applies
            cls._apply_parts = Store._apply_parts  # type: ignore[method-assign]

    def _apply_parts(
        self,
        batch_id: str,
        item_id: str,
        target: Status,
        sources: frozenset[Status],
        at: float,
        error: str | None,
        expires_at_open: float,
        expires_at_finished: float,
        stats: EventStats,
        lease_until: float | None,
    ) -> tuple[Outcome, Status, ItemSnapshot, Progress, int, float, float, Mapping[str, float]]:
        # The tracker's hot path: _EVENT's call and answer, without the Transition and
        # TransitionResult objects (a start is the one with a lease).
        if isinstance(stats, tuple):
            stats = _eta.stats_for(target, at, stats[0], stats[1])
        codes = _SOURCE_CODES.get(sources)
        if codes is None:
            codes = _SOURCE_CODES[sources] = "".join(str(_CODE[s]) for s in sources)
        if not stats:
            group, coefs = "", b""
        elif len(stats) == 1:
            ((source, amounts),) = stats.items()
            group = self._layout(source, amounts)
            coefs = struct.pack(f"<{len(amounts)}d", *[coef for coef, _ in amounts.values()])
        else:  # never from the tracker: the general script
            return super()._apply_parts(
                batch_id,
                item_id,
                target,
                sources,
                at,
                error,
                expires_at_open,
                expires_at_finished,
                stats,
                lease_until,
            )
        p = self.prefix
        known = self._constants.get(batch_id)
        reply = self._fast(
            self._event,
            f"update batch {batch_id!r}",
            (f"{p}b:{batch_id}", f"{p}i:{batch_id}"),
            (
                batch_id,
                item_id,
                _DIGITS[target],
                codes,
                repr(at),
                repr(expires_at_open),
                repr(expires_at_finished),
                _SLACK_ARG,
                "" if lease_until is None else repr(lease_until),
                error or "",
                group,
                coefs,
                known[2] if known else "",
            ),
        )
        if len(reply) < 12:
            if reply[0] == b"nobatch":
                raise BatchNotFound(batch_id)
            raise ItemNotFound(batch_id, item_id)
        outcome, previous, raw, created, total, expires, version, done, failed, running = reply[:10]
        if known and created == b"":  # the batch's own, as kept
            created, total = known[0], known[1]
        else:
            token = f"{created.decode()} {total.decode()}"
            created, total = float(created or 0), int(total or 0)
            if len(self._constants) >= _CONSTANTS_KEPT:
                self._constants.clear()
            self._constants[batch_id] = (created, total, token)
        done, failed, running, pending = int(done), int(failed), int(running), int(reply[10])
        return (
            _OUTCOMES[outcome],
            _STATUSES[previous],
            _item(item_id, raw),
            Progress(
                total, done, failed, running, pending, total - done - failed - running - pending
            ),
            int(version),
            created,
            float(expires),
            PackedStats(reply[11]),
        )

    def _layout(self, source: Status, amounts: Mapping[str, tuple[float, int]]) -> str:
        """A stats group's source, powers and names as _EVENT takes them, checked once per
        set of names (the tracker sends the same names with every completion)."""
        key = (source, *amounts)
        known = self._layouts.get(key)
        if known is None:
            names, powers = self._group(tuple(amounts), amounts)
            known = self._layouts[key] = f"{_CODE[source]}{powers}:{names.replace(',', chr(31))}"
        return known

    def _fast(self, script: Any, what: str, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        """``script(keys, args)`` on a connection of the store's own, the command packed at
        once: redis-py's general path (its pool's checks, its per-argument encoding)
        costs about as much as the script itself. The connections are the client pool's
        (borrowed from it once: they count against its ``max_connections``) and kept
        here while idle (at most :data:`_IDLE_KEPT`; the others go back to the pool); one
        that fails is dropped. On anything but an answer (a connection lost, the script
        not loaded yet, a client that is not a plain ``redis.Redis``), the general path
        with redis-py's retries.

        The script gets one more argument, last: the call's id, unique to this call and
        the same in every sending of it, which the script marks the items it moves with.
        A call may be sent again after its answer was lost (a connection killed or timed
        out after the command left: here, or in redis-py's retries), when it may have
        applied already: the script then answers it as applied, not as unchanged."""
        if self._closed:  # (also after close: no connection is opened again)
            raise StoreError(f"Redis failed to {what}: the store is closed")
        call = self._call_id()
        pool = self._pool
        if pool is not None:
            try:
                conn = self._idle.pop()
            except IndexError:
                conn = self._borrow(pool)
                if conn is None:
                    return self._call(script, what, list(keys), [*args, call])
            command = ("EVALSHA", script.sha, len(keys), *keys, *args, call)
            try:
                conn.send_packed_command(
                    [_hiredis_pack(command)]
                    if _hiredis_pack is not None
                    else conn.pack_command(*command)
                )
                reply = conn.read_response()
            except NoScriptError:  # answered: the connection is fine, nothing ran
                self._keep(conn)
            except ResponseError as exc:
                self._keep(conn)
                raise StoreError(f"Redis failed to {what}: {exc}") from exc
            except (RedisConnectionError, RedisTimeoutError):
                self._drop_connection(conn)  # the call is sent again, as the same call
            except BaseException:  # mid-command: what is left unread would answer the next
                self._drop_connection(conn)
                raise
            else:
                self._keep(conn)
                return reply
        return self._call(script, what, list(keys), [*args, call])

    def _call_id(self) -> str:
        """A new call id (see :meth:`_fast`), for a script sent on the general path."""
        if self._pid != os.getpid():
            self._fresh()
        return next(self._calls)

    def _fresh(self) -> None:
        """In a forked child, forget the parent's connections, lock and call ids (the
        child's calls must not repeat the parent's ids)."""
        if self._pid != os.getpid():
            self._idle.clear()
            self._borrowed = 0
            self._lock = threading.Lock()  # it may have been held by a parent's thread
            self._calls = _call_ids()
            self._pid = os.getpid()

    def _borrow(self, pool: Any) -> Any:
        """A connection of the pool's for :meth:`_fast`, or None when the store holds all
        but one of the pool's ``max_connections`` already (so that the general path, which
        returns its connection after each command, always has one: a thread waiting in a
        blocking pool never waits on connections idle here) or the pool failed."""
        with self._lock:
            if self._borrowed >= getattr(pool, "max_connections", 2**31) - 1:
                return None
            self._borrowed += 1
        try:  # a blocking pool may wait here, for the general path's calls to end
            return pool.get_connection(*_GET_ARGS)
        except RedisError:  # the general path reports it, with redis-py's retries
            with self._lock:
                self._borrowed -= 1
            return None

    def _give_back(self, conn: Any) -> None:
        """Return a borrowed connection to the pool."""
        with self._lock:
            self._borrowed -= 1
        with contextlib.suppress(RedisError, OSError):
            self._pool.release(conn)

    def _keep(self, conn: Any) -> None:
        """Put a connection of :meth:`_fast` back with the idle ones (or give it back to
        the pool; closed first when the store is closed)."""
        if len(self._idle) < _IDLE_KEPT and not self._closed:
            self._idle.append(conn)
            if self._closed:  # close() ran meanwhile: it may have emptied the list before
                self._drain()
        elif self._closed:
            self._drop_connection(conn)
        else:
            self._give_back(conn)
            if self._closed and self._owns_client:  # the pool may be disconnected already
                with contextlib.suppress(RedisError, OSError):
                    conn.disconnect()

    def _drain(self) -> None:
        """Close the idle connections of :meth:`_fast`."""
        while True:
            try:
                conn = self._idle.pop()
            except IndexError:
                return
            self._drop_connection(conn)

    def _drop_connection(self, conn: Any) -> None:
        """Close a connection of :meth:`_fast` and give it back to the pool (which opens
        it again when next used)."""
        with contextlib.suppress(RedisError, OSError):
            conn.disconnect()
        self._give_back(conn)

    def _stats_args(self, stats: Mapping[Status, Mapping[str, tuple[float, int]]]) -> list[Any]:
        """A transition's stats contributions as the transition scripts take them."""
        groups: list[Any] = [len(stats)]
        for source, amounts in stats.items():
            names, powers = self._group(tuple(amounts), amounts)
            groups += [
                _CODE[source],
                names,
                struct.pack(f"<{len(amounts)}d", *(coef for coef, _ in amounts.values())),
                powers,
            ]
        return groups

    def _args(self, batch_id: str, transition: Transition) -> list[Any]:
        """The ARGV of ``_APPLY`` for a transition."""
        attempts = "+" if transition.add_attempt else "0" if transition.reset_attempts else ""
        return [
            *_common_args(batch_id, transition.item_id, transition),
            _optional(transition.lease_until),
            attempts,
            _optional(transition.lost_before),
            "" if transition.max_attempts is None else transition.max_attempts,
            "1" if transition.unless_paused else "",
            *self._stats_args(transition.stats),
        ]

    def apply_all(self, batch_id: str, transitions: Sequence[Transition]) -> list[TransitionResult]:
        # One script call for all of them.
        if not transitions:
            return []
        args: list[Any] = [batch_id]
        for transition in transitions:
            one = self._args(batch_id, transition)
            args.append(len(one))
            args += one
        replies = self._fast(
            self._apply_all,
            f"update batch {batch_id!r}",
            tuple(self._keys(batch_id)),
            tuple(args),
        )
        if replies and replies[0] == b"nobatch":
            raise BatchNotFound(batch_id)
        if replies and replies[0] == b"noitem":
            item_id = replies[1].decode() if isinstance(replies[1], bytes) else replies[1]
            raise ItemNotFound(batch_id, item_id)
        return [
            _transition_result(batch_id, transition.item_id, reply)
            for transition, reply in zip(transitions, replies, strict=True)
        ]

    def _group(
        self, names: tuple[str, ...], amounts: Mapping[str, tuple[float, int]]
    ) -> tuple[str, str]:
        """A stats group's names and powers as the script takes them, checked once per
        set of names (the tracker sends the same names with every completion)."""
        known = self._groups.get(names)
        if known is None:
            powers = [power for _, power in amounts.values()]
            if any(not 0 <= p <= 9 for p in powers) or any(
                "," in n or "\x1f" in n for n in amounts
            ):
                raise ValidationError("stats names must not contain ',' or \\x1f; powers 0-9")
            known = self._groups[names] = (",".join(names), "".join(map(str, powers)))
        return known

    def renew(
        self, batch_id: str, item_id: str, at: float, lease_until: float, expires_at_open: float
    ) -> TransitionResult:
        reply = self._call(
            self._renew,
            f"renew a lease in batch {batch_id!r}",
            self._keys(batch_id),
            [batch_id, item_id, repr(at), repr(lease_until), repr(expires_at_open), _SLACK],
        )
        return _transition_result(batch_id, item_id, reply)

    def set_paused(self, batch_id: str, paused: bool, at: float, expires_at_open: float) -> bool:
        reply = self._call(
            self._pause,
            f"pause batch {batch_id!r}",
            self._keys(batch_id),
            [batch_id, "1" if paused else "", repr(at), repr(expires_at_open), _SLACK],
        )
        if reply == b"nobatch":
            raise BatchNotFound(batch_id)
        return bool(reply)

    def report(
        self,
        batch_id: str,
        item_id: str,
        fraction: float,
        stage: str | None,
        at: float,
        expires_at_open: float,
    ) -> ItemSnapshot:
        reply = self._call(
            self._report,
            f"report on item {item_id!r} of batch {batch_id!r}",
            self._keys(batch_id),
            [
                batch_id,
                item_id,
                repr(fraction),
                "" if stage is None else "1",
                stage or "",
                repr(at),
                repr(expires_at_open),
                _SLACK,
            ],
        )
        if reply == b"nobatch":
            raise BatchNotFound(batch_id)
        if reply == b"noitem":
            raise ItemNotFound(batch_id, item_id)
        return _item(item_id, reply[1])

    def apply_many(
        self, batch_id: str, transition: Transition, item_ids: Sequence[str] | None = None
    ) -> BulkResult:
        reply = self._call(
            self._apply_many,
            f"update batch {batch_id!r}",
            self._keys(batch_id),
            [
                *_common_args(batch_id, "", transition),
                "0" if transition.reset_attempts else "",
                # The call's id: a repeat of this call (redis-py sends it again when its
                # answer is lost) is answered as the call was, not as rejected.
                self._call_id(),
                *(item_ids or ()),
            ],
        )
        if reply[0] == b"nobatch":
            raise BatchNotFound(batch_id)
        if reply[0] == b"noitem":
            raise ItemNotFound(batch_id, reply[1].decode())
        if reply[0] == b"rejected":
            pairs = reply[1:]
            rejected = tuple(
                (pairs[i].decode(), _STATUSES[int(pairs[i + 1])]) for i in range(0, len(pairs), 2)
            )
            header = self.load(batch_id, items=False)
            assert header is not None
            return BulkResult(0, rejected, header.progress, header.version)
        record = _record(batch_id, reply[2], {})
        return BulkResult(int(reply[1]), (), record.progress, record.version)

    def lost(self, now: float, limit: int) -> list[LostItem]:
        flat = self._call(
            self._lost,
            "list lost items",
            [f"{self.prefix}leases"],
            [repr(now), limit, self.prefix],
        )
        return [
            LostItem(
                flat[i].decode(),
                flat[i + 1].decode(),
                int(flat[i + 2]),
                float(flat[i + 3]),
                float(flat[i + 4]),
            )
            for i in range(0, len(flat), 5)
        ]

    def open_batches(self, now: float) -> list[str]:
        ids = self._call(
            self._open, "list open batches", [f"{self.prefix}expiry"], [repr(now), self.prefix]
        )
        return [i.decode() for i in ids]

    def load(self, batch_id: str, *, items: bool = True) -> BatchRecord | None:
        batch_key, items_key, order_key, *_ = self._keys(batch_id)
        self._refuse_closed(f"read batch {batch_id!r}")
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

    def version_of(self, batch_id: str) -> BatchVersion | None:
        # One HMGET of three short fields: no transaction, no stats, no items.
        self._refuse_closed(f"read batch {batch_id!r}")
        try:
            version, owner, expires = self._client.hmget(
                f"{self.prefix}b:{batch_id}", "version", "owner", "expires_at"
            )
        except RedisError as exc:
            raise StoreError(f"Redis failed to read batch {batch_id!r}: {exc}") from exc
        return _version_from(version, owner, expires)

    async def version_of_async(self, batch_id: str) -> BatchVersion | None:
        """:meth:`version_of` awaited on the running event loop, with a ``redis.asyncio``
        client of that loop's own (made from the store's URL on first use; closed by
        :meth:`aclose_async_reads`). What the ASGI app reads to answer a kept status body
        without a thread.

        Raises:
            StoreError: Redis failed, or the store was given a ``client`` instead of a
                URL (there are no settings to open another connection with).
        """
        if self.url is None:
            raise StoreError("an async read needs the store's Redis URL, not a client")
        loop = asyncio.get_running_loop()
        made = self._async_reads.get(loop)
        if made is None:
            client = redis.asyncio.Redis.from_url(
                self.url, socket_timeout=10, socket_connect_timeout=5
            )
            # Closed by aclose_async_reads, or else when the loop shuts down its async
            # generators (asyncio.run, uvicorn and uvloop do, before closing the loop):
            # a started generator is what the loop finalizes then.
            closer = _closing(self._async_reads, loop, client)
            await closer.__anext__()
            self._async_reads[loop] = made = (client, closer)
        client = made[0]
        try:
            reply: list[Any] = await client.hmget(
                f"{self.prefix}b:{batch_id}", "version", "owner", "expires_at"
            )
        except RedisError as exc:
            raise StoreError(f"Redis failed to read batch {batch_id!r}: {exc}") from exc
        return _version_from(*reply)

    async def aclose_async_reads(self) -> None:
        """Close the running event loop's client of :meth:`version_of_async`, if any."""
        made = self._async_reads.pop(asyncio.get_running_loop(), None)
        if made is not None:
            await made[1].aclose()

    def load_items(self, batch_id: str, query: ItemQuery) -> BatchRecord | None:
        reply = self._call(
            self._read,
            f"read batch {batch_id!r}",
            self._keys(batch_id),
            [
                "" if query.status is None else _CODE[query.status],
                query.after or "",
                "" if query.since is None else query.since,
                -1 if query.limit is None else query.limit,
            ],
        )
        if reply[0] == b"nobatch":
            return None
        if reply[0] == b"noitem":
            raise ItemNotFound(batch_id, query.after or "")
        if reply[0] == b"legacy":
            return super().load_items(batch_id, query)
        flat = reply[1]
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        pairs = reply[2:]
        items = tuple(_item(pairs[i].decode(), pairs[i + 1]) for i in range(0, len(pairs), 2))
        return _from_fields(batch_id, fields, items)

    def list_batches(
        self, owner: str | None, now: float, limit: int, after: str | None
    ) -> list[BatchRecord]:
        index = f"{self.prefix}by:all" if owner is None else f"{self.prefix}by:o:{owner}"
        reply = self._call(
            self._list, "list batches", [index], [repr(now), limit, after or "", self.prefix]
        )
        if reply[0] == b"noafter":
            raise BatchNotFound(after or "")
        found = []
        for n in range(1, len(reply), 2):
            flat = reply[n + 1]
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            found.append(_from_fields(reply[n].decode(), fields))
        return found

    def delete(self, batch_id: str) -> bool:
        self._constants.pop(batch_id, None)
        keys = self._keys(batch_id)
        p = self.prefix
        self._refuse_closed(f"delete batch {batch_id!r}")
        try:
            # The owner never changes: read first, it names the owner's index to clean.
            owner = self._client.hget(f"{p}listed", batch_id)
            with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(keys[0])
                pipe.delete(keys[1], keys[2], keys[5], keys[6])
                pipe.zrem(keys[3], batch_id)
                self._drop(keys=[], args=[self.prefix, batch_id], client=pipe)
                pipe.hdel(f"{p}listed", batch_id)
                pipe.zrem(f"{p}by:all", batch_id)
                if owner:
                    pipe.zrem(f"{p}by:o:{owner.decode()}", batch_id)
                pipe.publish(self._channel, batch_id)  # also when there was none: harmless
                removed = pipe.execute()[0]
        except RedisError as exc:
            raise StoreError(f"Redis failed to delete batch {batch_id!r}: {exc}") from exc
        return bool(removed)

    def expired(self, now: float, limit: int) -> list[str]:
        ids = self._call(
            self._expired,
            "list expired batches",
            [f"{self.prefix}expiry"],
            [repr(now), limit, self.prefix],
        )
        return [i.decode() for i in ids]

    def purge_expired(self, now: float) -> int:
        expiry = f"{self.prefix}expiry"
        removed = 0
        self._refuse_closed("purge expired batches")
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

    # -- the outbox ----------------------------------------------------------------------

    def _outbox_keys(self) -> list[str]:
        return [f"{self.prefix}outbox", f"{self.prefix}outbox:ready"]

    def outbox_claim(self, now: float, limit: int, lease_until: float) -> list[OutboxEntry]:
        reply = self._call(
            self._claim,
            "claim from the outbox",
            self._outbox_keys(),
            [repr(now), limit, repr(lease_until)],
        )
        return [_entry(reply[i].decode(), reply[i + 1]) for i in range(0, len(reply), 2)]

    def outbox_expand(self, entry_id: str, deliveries: Sequence[OutboxEntry], at: float) -> None:
        args: list[Any] = [entry_id, repr(at)]
        for e in deliveries:
            entry = {"b": e.batch_id, "v": e.version, "t": repr(e.ended_at), "a": e.attempts}
            args += [e.entry_id, json.dumps({**entry, "u": e.url, "y": e.body})]
        self._call(self._expand, f"expand outbox entry {entry_id!r}", self._outbox_keys(), args)

    def outbox_done(self, entry_id: str) -> None:
        outbox, ready = self._outbox_keys()
        self._refuse_closed(f"settle outbox entry {entry_id!r}")
        try:
            with self._client.pipeline(transaction=True) as pipe:
                pipe.hdel(outbox, entry_id)
                pipe.zrem(ready, entry_id)
                pipe.execute()
        except RedisError as exc:
            raise StoreError(f"Redis failed to settle outbox entry {entry_id!r}: {exc}") from exc

    def outbox_retry(self, entry_id: str, attempts: int, next_at: float) -> None:
        args = [entry_id, attempts, repr(next_at)]
        self._call(self._retry, f"retry outbox entry {entry_id!r}", self._outbox_keys(), args)

    def outbox_unsubscribe(self, url: str) -> None:
        keys = [*self._outbox_keys(), f"{self.prefix}webhooks_gone"]
        self._call(self._unsubscribe, f"unsubscribe {url!r}", keys, [url])

    def outbox_unsubscribed(self) -> frozenset[str]:
        self._refuse_closed("read unsubscribed URLs")
        try:
            members = self._client.smembers(f"{self.prefix}webhooks_gone")
        except RedisError as exc:
            raise StoreError(f"Redis failed to read unsubscribed URLs: {exc}") from exc
        return frozenset(m.decode() for m in members)


def _entry(entry_id: str, raw: bytes) -> OutboxEntry:
    """An outbox entry from its id and JSON (``b``, ``v``, ``t``, ``u``, ``y``, ``a``)."""
    e = json.loads(raw)
    return OutboxEntry(
        entry_id, e["b"], int(e["v"]), float(e["t"]), e.get("u"), e.get("y"), int(e.get("a", 0))
    )


async def _closing(reads: dict[Any, Any], loop: Any, client: Any) -> AsyncGenerator[None, None]:
    """Closes ``client`` and forgets it as ``loop``'s in ``reads`` when closed itself (its
    first step taken beforehand)."""
    try:
        yield
    finally:
        if reads.get(loop, (None,))[0] is client:
            del reads[loop]
        await client.aclose()
