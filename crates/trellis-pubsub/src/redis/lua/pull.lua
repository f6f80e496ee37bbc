-- One step of a pull: expires deliveries past their deadline, hands out due
-- redeliveries, then new entries, within max_in_flight and the ordering keys.
-- KEYS: stream, inflight, retry, holders, counters.
-- ARGV: group, consumer, qprefix, ack_deadline_ms, max_deliveries, min_backoff_ms,
--       max_backoff_ms, max_in_flight, max, park_cap.
-- Returns {
--   {id, attempt, encoded event, ...}           deliveries,
--   {id, delivery count, encoded event, why, ...} to dead-letter ('expired' | 'max'),
--   ms until the next deadline or due redelivery (-1: none),
--   the stream id to wait for entries after ('' when new entries can't be taken now),
-- }
local stream, inflight, retry, holders, counters = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local group, consumer, qprefix = ARGV[1], ARGV[2], ARGV[3]
local deadline_ms = tonumber(ARGV[4])
local max_deliveries = tonumber(ARGV[5])
local min_backoff, max_backoff = tonumber(ARGV[6]), tonumber(ARGV[7])
local max_in_flight, max = tonumber(ARGV[8]), tonumber(ARGV[9])
local park_cap = tonumber(ARGV[10])

-- A new group reads the stream from its beginning.
redis.pcall('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
local now = now_ms()
local out, dead = {}, {}

local function backoff(attempt)
  local b = min_backoff * 2 ^ math.min(attempt - 1, 30)
  if b > max_backoff then b = max_backoff end
  return b
end

local function gone(id)
  settle(stream, group, inflight, retry, holders, counters, qprefix, id, now)
end

local function to_dead_letter(id, count, why)
  local entry = redis.call('XRANGE', stream, id, id)
  if #entry == 0 then
    gone(id)
  else
    dead[#dead + 1] = id
    dead[#dead + 1] = count
    dead[#dead + 1] = fields_of(entry[1]).e or ''
    dead[#dead + 1] = why
  end
end

-- 0. Entries pending in the group but tracked nowhere (their state was lost, e.g.
-- keys deleted or evicted) are adopted for redelivery, a bounded scan per pull.
local summary = redis.call('XPENDING', stream, group)
local tracked = redis.call('ZCARD', inflight) + redis.call('ZCARD', retry)
  + tonumber(redis.call('HGET', counters, 'parked') or '0')
if tonumber(summary[1]) > tracked then
  local from = redis.call('HGET', counters, 'scan') or '-'
  local idle = redis.call('XPENDING', stream, group, 'IDLE', int(deadline_ms), from, '+', 100)
  for _, p in ipairs(idle) do
    local id = p[1]
    if tonumber(p[4]) > 0 and not redis.call('ZSCORE', inflight, id)
        and not redis.call('ZSCORE', retry, id) then
      redis.call('ZADD', retry, int(now), id)
    end
  end
  if #idle < 100 then
    redis.call('HDEL', counters, 'scan')
  else
    redis.call('HSET', counters, 'scan', '(' .. idle[#idle][1])
  end
end

-- 1. Deliveries past their deadline wait out a backoff, or leave on their last one.
local expired = redis.call('ZRANGEBYSCORE', inflight, '-inf', int(now), 'WITHSCORES', 'LIMIT', 0, 1000)
for i = 1, #expired, 2 do
  local id, deadline = expired[i], tonumber(expired[i + 1])
  local count = pel_count(stream, group, id)
  if not count then
    gone(id)
  elseif count >= max_deliveries then
    to_dead_letter(id, count, 'expired')
  else
    redis.call('ZREM', inflight, id)
    redis.call('ZADD', retry, int(deadline + backoff(count)), id)
  end
end

-- 2. Due redeliveries (and entries whose key was passed on), while there is room.
local room = math.min(max_in_flight - redis.call('ZCARD', inflight), max)
local delivered = 0
if room > 0 then
  local due = redis.call('ZRANGEBYSCORE', retry, '-inf', int(now), 'LIMIT', 0, room)
  for _, id in ipairs(due) do
    local count = pel_count(stream, group, id)
    if not count then
      gone(id)
    elseif count >= max_deliveries then
      to_dead_letter(id, count, 'max')
    else
      local claimed = redis.call('XCLAIM', stream, group, consumer, 0, id, 'RETRYCOUNT', int(count + 1))
      if #claimed == 0 or type(claimed[1]) ~= 'table' then
        -- Trimmed away: XCLAIM dropped it from the PEL.
        gone(id)
      else
        redis.call('ZREM', retry, id)
        redis.call('ZADD', inflight, int(now + deadline_ms), id)
        out[#out + 1] = id
        out[#out + 1] = count + 1
        out[#out + 1] = fields_of(claimed[1]).e or ''
        delivered = delivered + 1
      end
    end
  end
end

-- 3. New entries. One whose key is held waits in the key's queue (in the PEL with a
-- delivery count of 0) until the holder is settled.
local watch = ''
while delivered < room do
  local parked = tonumber(redis.call('HGET', counters, 'parked') or '0')
  if parked >= park_cap then break end
  local read = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', int(room - delivered), 'STREAMS', stream, '>')
  if not read or #read[1][2] == 0 then
    local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
    if #last > 0 then watch = last[1][1] else watch = '0-0' end
    break
  end
  for _, entry in ipairs(read[1][2]) do
    local id = entry[1]
    local f = fields_of(entry)
    local key = f.k or ''
    if key ~= '' and redis.call('HEXISTS', holders, 'k:' .. key) == 1 then
      redis.call('RPUSH', qprefix .. key, id)
      redis.call('XCLAIM', stream, group, consumer, 0, id, 'RETRYCOUNT', 0, 'JUSTID')
      redis.call('HINCRBY', counters, 'parked', 1)
    else
      if key ~= '' then redis.call('HSET', holders, 'k:' .. key, id, 'i:' .. id, key) end
      redis.call('ZADD', inflight, int(now + deadline_ms), id)
      out[#out + 1] = id
      out[#out + 1] = 1
      out[#out + 1] = f.e or ''
      delivered = delivered + 1
    end
  end
end

-- 4. When time alone may make something deliverable.
local wake = -1
local first = redis.call('ZRANGE', inflight, 0, 0, 'WITHSCORES')
if #first > 0 then wake = math.max(0, tonumber(first[2]) - now) end
if room > delivered then
  local r = redis.call('ZRANGE', retry, 0, 0, 'WITHSCORES')
  if #r > 0 then
    local w = math.max(0, tonumber(r[2]) - now)
    if wake < 0 or w < wake then wake = w end
  end
end
return {out, dead, int(wake), watch}
