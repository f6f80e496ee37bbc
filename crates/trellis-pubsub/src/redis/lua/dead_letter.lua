-- Moves one delivery to the dead-letter topic, if it is still in the state the caller
-- saw: appends the dead letter and settles the original, atomically.
-- KEYS: stream, inflight, retry, holders, counters, dead-letter stream.
-- ARGV: group, qprefix, stream id, delivery count, mode ('expired': in flight past its
--       deadline; 'inflight': in flight; 'any': in flight or waiting for redelivery),
--       ordering key of the dead letter, encoded dead letter, MAXLEN (0 = unbounded).
-- Returns 1 if dead-lettered, 0 if the delivery changed meanwhile.
local stream, inflight, retry, holders, counters, dlq = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local group, qprefix, id = ARGV[1], ARGV[2], ARGV[3]
local expected, mode = tonumber(ARGV[4]), ARGV[5]
local maxlen = tonumber(ARGV[8])
if pel_count(stream, group, id) ~= expected then return 0 end
local now = now_ms()
local deadline = redis.call('ZSCORE', inflight, id)
if mode == 'expired' then
  if not deadline or tonumber(deadline) > now then return 0 end
elseif mode == 'inflight' then
  if not deadline then return 0 end
elseif not deadline and not redis.call('ZSCORE', retry, id) then
  return 0
end
if maxlen > 0 then
  redis.call('XADD', dlq, 'MAXLEN', '~', int(maxlen), '*', 'k', ARGV[6], 'e', ARGV[7])
else
  redis.call('XADD', dlq, '*', 'k', ARGV[6], 'e', ARGV[7])
end
settle(stream, group, inflight, retry, holders, counters, qprefix, id, now)
redis.call('HINCRBY', counters, 'dead', 1)
return 1
