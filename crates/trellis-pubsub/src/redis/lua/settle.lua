-- Acks, nacks, extends or rejects deliveries of one topic for a group.
-- KEYS: stream, inflight, retry, holders, counters.
-- ARGV: op ('ack' | 'nack' | 'extend' | 'reject' | 'release'), group, qprefix,
--       max_deliveries,
--       then per delivery: stream id, attempt, ms (nack: delay; extend: new deadline
--       from now; else unused).
-- Returns per delivery {code, encoded event}: code 0 = done, 1 = not found (no such
-- group), 2 = expired (settled, or superseded by a redelivery), 3 = to be
-- dead-lettered (the event is returned; the caller stores it with dead_letter.lua).
local stream, inflight, retry, holders, counters = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local op, group, qprefix = ARGV[1], ARGV[2], ARGV[3]
local max_deliveries = tonumber(ARGV[4])
local now = now_ms()
local out = {}
for i = 5, #ARGV, 3 do
  local id, attempt, ms = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local code, e = 2, ''
  local count = pel_count(stream, group, id)
  if count == false then
    code = 1
  elseif count ~= nil and count == attempt then
    local in_flight = redis.call('ZSCORE', inflight, id)
    local waiting = redis.call('ZSCORE', retry, id)
    if op == 'ack' then
      settle(stream, group, inflight, retry, holders, counters, qprefix, id, now)
      code = 0
    elseif op == 'nack' then
      if in_flight then
        if attempt >= max_deliveries then
          code = 3
        else
          redis.call('ZREM', inflight, id)
          redis.call('ZADD', retry, int(now + ms), id)
          code = 0
        end
      elseif waiting then
        -- Already waiting for its redelivery.
        code = 0
      else
        -- Pending but untracked (its state was lost): redeliver it after the delay.
        redis.call('ZADD', retry, int(now + ms), id)
        code = 0
      end
    elseif op == 'extend' then
      if in_flight then
        redis.call('ZADD', inflight, 'XX', int(now + ms), id)
        code = 0
      end
    elseif op == 'reject' then
      if in_flight or waiting then code = 3 end
    elseif op == 'release' then
      -- Its consumer went away: due for redelivery at once.
      if in_flight then
        redis.call('ZREM', inflight, id)
        redis.call('ZADD', retry, int(now), id)
        code = 0
      end
    end
    if code == 3 then
      local entry = redis.call('XRANGE', stream, id, id)
      if #entry == 0 then
        -- Trimmed away: nothing left to dead-letter; settled.
        settle(stream, group, inflight, retry, holders, counters, qprefix, id, now)
        code = 0
      else
        e = fields_of(entry[1]).e or ''
      end
    end
  end
  out[#out + 1] = code
  out[#out + 1] = e
end
return out
