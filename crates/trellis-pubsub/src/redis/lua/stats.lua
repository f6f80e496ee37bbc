-- A topic's figures.
-- KEYS: stream. ARGV: prefixes of the inflight, retry and counters keys (the group
-- name completes them).
-- Returns {last generated id, first entry id ('' if none), {group, pending (PEL size),
-- unread entries, last delivered id, smallest pending id ('' if none), in flight,
-- waiting for redelivery, dead-lettered}...}; {} if the stream does not exist.
local stream = KEYS[1]

-- Compares stream ids: -1, 0 or 1.
local function cmp_ids(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  if ams ~= bms then
    if ams < bms then return -1 else return 1 end
  end
  if aseq ~= bseq then
    if aseq < bseq then return -1 else return 1 end
  end
  return 0
end

local info = redis.pcall('XINFO', 'STREAM', stream)
if type(info) ~= 'table' or info.err then return {} end
local s = {}
for i = 1, #info, 2 do s[info[i]] = info[i + 1] end
local first = ''
if type(s['first-entry']) == 'table' then first = s['first-entry'][1] end
local groups = {}
for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local f = {}
  for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
  local name = f['name']
  -- Entries not yet read by the group. Redis's own `lag` is exact for a stream that
  -- lost no entries; after trimming it may over-count (or be nil), so: none when the
  -- group read up to the last id, all when it is behind the oldest entry kept, else
  -- Redis's figure, at most the stream's length.
  local last = f['last-delivered-id']
  local lag
  if cmp_ids(last, s['last-generated-id']) >= 0 then
    lag = 0
  elseif first == '' or cmp_ids(last, first) < 0 then
    lag = s['length']
  elseif type(f['lag']) == 'number' then
    lag = math.min(f['lag'], s['length'])
  else
    lag = s['length']
  end
  local summary = redis.call('XPENDING', stream, name)
  local smallest = summary[2]
  if type(smallest) ~= 'string' then smallest = '' end
  groups[#groups + 1] = {
    name,
    f['pending'],
    lag,
    f['last-delivered-id'],
    smallest,
    redis.call('ZCARD', ARGV[1] .. name),
    redis.call('ZCARD', ARGV[2] .. name),
    tonumber(redis.call('HGET', ARGV[3] .. name, 'dead') or '0'),
  }
end
return {s['last-generated-id'], first, groups}
