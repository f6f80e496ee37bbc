-- Moves dead letters back to their topic, each exactly once.
-- KEYS: dead-letter stream, topic stream.
-- ARGV: replay group, MAXLEN (0 = unbounded), then per dead letter: its stream id,
--       ordering key, encoded event (without the dead-letter attributes).
-- Returns how many were replayed (acknowledged by this call).
local dlq, target = KEYS[1], KEYS[2]
local group, maxlen = ARGV[1], tonumber(ARGV[2])
local n = 0
for i = 3, #ARGV, 3 do
  if redis.call('XACK', dlq, group, ARGV[i]) == 1 then
    if maxlen > 0 then
      redis.call('XADD', target, 'MAXLEN', '~', int(maxlen), '*', 'k', ARGV[i + 1], 'e', ARGV[i + 2])
    else
      redis.call('XADD', target, '*', 'k', ARGV[i + 1], 'e', ARGV[i + 2])
    end
    n = n + 1
  end
end
return n
