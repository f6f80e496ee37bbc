-- Appends a batch of events, deduplicating by event id.
-- KEYS[1]: the stream; KEYS[1 + i]: the dedupe key of event i.
-- ARGV[1]: dedupe window (ms, 0 = none); ARGV[2]: MAXLEN (0 = unbounded);
-- then per event: ordering key ('' = none), encoded event.
-- Returns {stream id, duplicate (0|1), ...} in order.
local window = tonumber(ARGV[1])
local maxlen = tonumber(ARGV[2])
local out = {}
for i = 1, #KEYS - 1 do
  local dkey = KEYS[i + 1]
  local key, e = ARGV[1 + 2 * i], ARGV[2 + 2 * i]
  local existing = false
  if window > 0 then existing = redis.call('GET', dkey) end
  if existing then
    out[#out + 1] = existing
    out[#out + 1] = 1
  else
    local id
    if maxlen > 0 then
      id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', int(maxlen), '*', 'k', key, 'e', e)
    else
      id = redis.call('XADD', KEYS[1], '*', 'k', key, 'e', e)
    end
    if window > 0 then redis.call('SET', dkey, id, 'PX', int(window)) end
    out[#out + 1] = id
    out[#out + 1] = 0
  end
end
return out
