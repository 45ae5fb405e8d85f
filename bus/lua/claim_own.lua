-- Keep or count the claim on entries this consumer still owns, atomically.
-- A plain XCLAIM with min-idle 0 would steal an entry another consumer reclaimed meanwhile;
-- checking the owner first in the same script closes that race.
-- KEYS[1]: stream; ARGV: group, consumer, mode ('touch' keeps the delivery count,
-- 'count' adds one delivery, as a redelivery does), id_1, id_2, ...
-- Returns: per id the delivery count after the call, or -1 when the entry is no longer ours.
local stream, group, consumer, mode = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local out = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if #p == 1 and p[1][2] == consumer then
    if mode == 'count' then
      redis.call('XCLAIM', stream, group, consumer, 0, id)
      out[#out + 1] = p[1][4] + 1
    else
      redis.call('XCLAIM', stream, group, consumer, 0, id, 'JUSTID')
      out[#out + 1] = p[1][4]
    end
  else
    out[#out + 1] = -1
  end
end
return out
