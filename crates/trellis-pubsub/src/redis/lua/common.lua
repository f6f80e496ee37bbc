-- Helpers shared by the scripts (prepended to each of them).
--
-- Per (topic, group) the scripts keep, besides the stream's consumer group:
--   inflight  ZSET  stream id -> ack deadline (ms, server clock)
--   retry     ZSET  stream id -> not before (ms): nacked or expired, or next of its key
--   holders   HASH  'k:'..key -> the stream id holding the key,
--                   'i:'..id  -> the key that id holds
--   counters  HASH  'parked' (entries waiting for their key), 'dead' (dead-lettered)
--   qprefix..key   LIST of stream ids waiting for the key, oldest first

-- Milliseconds, by the server's clock (shared by every Trellis process).
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A number as an integer argument.
local function int(n)
  return string.format('%.0f', n)
end

-- The delivery count of `id` in the group's PEL; nil if it is not pending, false if
-- there is no such group.
local function pel_count(stream, group, id)
  local r = redis.pcall('XPENDING', stream, group, id, id, 1)
  if type(r) == 'table' and r.err then return false end
  if #r == 0 then return nil end
  return tonumber(r[1][4])
end

-- The fields of a stream entry {id, {f1, v1, ...}} as a table.
local function fields_of(entry)
  local f = {}
  local kv = entry[2]
  if type(kv) ~= 'table' then return f end
  for i = 1, #kv, 2 do f[kv[i]] = kv[i + 1] end
  return f
end

-- `id` gives up its key: the oldest entry waiting for the key (if any) holds it now
-- and is due at once.
local function release(holders, retry, counters, qprefix, id, now)
  local key = redis.call('HGET', holders, 'i:' .. id)
  if not key then return end
  redis.call('HDEL', holders, 'i:' .. id)
  if redis.call('HGET', holders, 'k:' .. key) ~= id then return end
  local nxt = redis.call('LPOP', qprefix .. key)
  if nxt then
    redis.call('HSET', holders, 'k:' .. key, nxt, 'i:' .. nxt, key)
    redis.call('ZADD', retry, int(now), nxt)
    redis.call('HINCRBY', counters, 'parked', -1)
  else
    redis.call('HDEL', holders, 'k:' .. key)
  end
end

-- Settles `id` for the group: acknowledged, no longer tracked, its key passed on.
local function settle(stream, group, inflight, retry, holders, counters, qprefix, id, now)
  redis.call('XACK', stream, group, id)
  redis.call('ZREM', inflight, id)
  redis.call('ZREM', retry, id)
  release(holders, retry, counters, qprefix, id, now)
end

