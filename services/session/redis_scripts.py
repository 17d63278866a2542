"""The Lua scripts of the Redis session store (redis_store.py), one per write that
must be all-or-nothing. Keys are described in redis_store's docstring; each
script's KEYS and ARGV in the comment above it.
"""

from __future__ import annotations

# Lua's unpack() is bounded by the C stack (LUAI_MAXCSTACK, 8000): variadic
# commands get their arguments in chunks below it.
_PUSH_IN_CHUNKS = """
local function push_chunks(command, key, first, last)
  local i = first
  while i <= last do
    local j = math.min(i + 999, last)
    redis.call(command, key, unpack(ARGV, i, j))
    i = j + 1
  end
end
"""

# KEYS: meta, log, calls, requests, request_order, tenant zset, by_updated zset
# ARGV: tenant, expected_head, request_id, result JSON, new head, new message_count,
#       updated_at, first_user_seq or "", session_id, request memory, message count n,
#       n message JSONs, then the batch's tool call ids.
APPEND = (
    _PUSH_IN_CHUNKS
    + """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then
  return {'missing'}
end
-- The request id before the head: a retry whose first attempt landed gets that
-- result back, although that very append moved the head.
if ARGV[3] ~= '' then
  local prior = redis.call('HGET', KEYS[4], ARGV[3])
  if prior then
    return {'retry', prior}
  end
end
local head = redis.call('HGET', KEYS[1], 'head')
if head ~= ARGV[2] then
  return {'moved', head}
end
local n = tonumber(ARGV[11])
local length = redis.call('LLEN', KEYS[2])
if length ~= tonumber(ARGV[6]) - n then
  -- The log and its meta disagree (a key lost to eviction?): appending would
  -- bury the damage under valid-looking entries.
  return {'corrupt', tostring(length)}
end
push_chunks('RPUSH', KEYS[2], 12, 11 + n)
push_chunks('SADD', KEYS[3], 12 + n, #ARGV)
redis.call('HSET', KEYS[1], 'head', ARGV[5], 'message_count', ARGV[6], 'updated_at', ARGV[7])
if ARGV[8] ~= '' then
  redis.call('HSETNX', KEYS[1], 'first_user_seq', ARGV[8])
end
redis.call('ZADD', KEYS[6], ARGV[7], ARGV[9])
redis.call('ZADD', KEYS[7], ARGV[7], ARGV[9])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[3], ARGV[4])
  redis.call('RPUSH', KEYS[5], ARGV[3])
  local memory = tonumber(ARGV[10])
  while redis.call('LLEN', KEYS[5]) > memory do
    redis.call('HDEL', KEYS[4], redis.call('LPOP', KEYS[5]))
  end
end
return {'ok'}
"""
)

# KEYS: meta, log, calls, requests, request_order, tenant zset, by_updated zset
# ARGV: session_id, updated_at, f (field names and values, counted together), n
#       (messages), the f field names and values, n message JSONs, then tool call ids.
CREATE = (
    _PUSH_IN_CHUNKS
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
-- Leftovers of an earlier session with this id (an import) must not leak in.
redis.call('UNLINK', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
local f = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], unpack(ARGV, 5, 4 + f))
push_chunks('RPUSH', KEYS[2], 5 + f, 4 + f + n)
push_chunks('SADD', KEYS[3], 5 + f + n, #ARGV)
redis.call('ZADD', KEYS[6], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[7], ARGV[2], ARGV[1])
return 1
"""
)

# KEYS: meta, log, calls, requests, request_order, tenant zset, by_updated zset,
#       erasure hash, the tenant's unfinished erasures set, then each owner's pending zset
# ARGV: tenant, session_id, reason, deleted_at, then the owners (as many as pending zsets)
DELETE = """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then
  return 0
end
-- UNLINK frees a long log in the background instead of blocking Redis.
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('ZREM', KEYS[6], ARGV[2])
redis.call('ZREM', KEYS[7], ARGV[2])
-- The tombstone and the work left to each owner, in the same script as the delete.
redis.call('HSET', KEYS[8], 'tenant', ARGV[1], 'reason', ARGV[3], 'deleted_at', ARGV[4],
  'completed_at', '0')
redis.call('SADD', KEYS[9], ARGV[2])
for i = 5, #ARGV do
  redis.call('HSET', KEYS[8], 'owner:' .. ARGV[i], '')
  redis.call('ZADD', KEYS[i + 5], ARGV[4], ARGV[2])
end
return 1
"""

# KEYS: erasure hash, the owner's pending zset, the tenant's unfinished erasures set,
#       the tenant's erasure totals hash
# ARGV: owner, removed (JSON), session_id, completed_at
ACKNOWLEDGE_ERASURE = """
local field = 'owner:' .. ARGV[1]
local state = redis.call('HGET', KEYS[1], field)
if not state then
  return 'missing'
end
if state ~= '' then
  return 'repeated'
end
redis.call('HSET', KEYS[1], field, ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[3])
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, 6) == 'owner:' and fields[i + 1] == '' then
    return 'waiting'
  end
end
redis.call('HSET', KEYS[1], 'completed_at', ARGV[4])
redis.call('SREM', KEYS[3], ARGV[3])
-- A tenant erasure's totals, added up here once (no index finds a tenant's tombstones).
if redis.call('HGET', KEYS[1], 'reason') == 'tenant_erased' then
  redis.call('HINCRBY', KEYS[4], 'sessions', 1)
  for i = 1, #fields, 2 do
    if string.sub(fields[i], 1, 6) == 'owner:' then
      local owner = string.sub(fields[i], 7)
      for kind, count in pairs(cjson.decode(fields[i + 1])) do
        redis.call('HINCRBY', KEYS[4], owner .. ':' .. kind, count)
      end
    end
  end
end
return 'done'
"""

# KEYS: meta of the session the key belongs to, the key. Re-checked here, atomically:
# an import may have re-created the session since the scan saw the key.
REMOVE_ORPHAN_KEY = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
return redis.call('UNLINK', KEYS[2])
"""

# KEYS: a sorted set, then the meta key of each member; ARGV: the members.
REMOVE_ORPHAN_MEMBERS = """
local removed = 0
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return removed
"""
