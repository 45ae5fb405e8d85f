-- Trim a stream without ever dropping an entry some group still needs.
-- XADD MAXLEN drops the oldest entries whether or not they were acked; this computes, in
-- one atomic step, the lowest id any group still needs (its oldest pending entry, or the
-- first entry after its last-delivered id) and trims strictly below it with XTRIM MINID.
-- KEYS[1]: stream; ARGV[1]: the highest MINID allowed by retention ("ms-seq").
-- Returns the MINID used, or false when the stream has no groups (nothing is trimmed then).
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local stream = KEYS[1]
if redis.call('EXISTS', stream) == 0 then return false end
local groups = redis.call('XINFO', 'GROUPS', stream)
if #groups == 0 then return false end
local minid = ARGV[1]
for _, g in ipairs(groups) do
  local name, last
  for j = 1, #g, 2 do
    if g[j] == 'name' then name = g[j + 1] end
    if g[j] == 'last-delivered-id' then last = g[j + 1] end
  end
  local summary = redis.call('XPENDING', stream, name)
  local need
  if tonumber(summary[1]) > 0 then
    need = summary[2]
  else
    local ms, seq = parse(last)
    need = string.format('%.0f-%.0f', ms, seq + 1)
  end
  if less(need, minid) then minid = need end
end
redis.call('XTRIM', stream, 'MINID', minid)
return minid
