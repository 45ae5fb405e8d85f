-- Put a dead-lettered envelope back onto its stream, atomically with removing it from the DLQ.
-- KEYS[1] dlq stream, KEYS[2] target stream, KEYS[3] failure-history hash
-- ARGV[1] dlq entry id, ARGV[2] envelope bytes
-- Returns the new entry id, or false when the DLQ entry is already gone (someone else acted).
-- Refuses (an error reply, nothing changed) unless the DLQ entry itself names KEYS[2] as its
-- stream and holds exactly ARGV[2]: the caller checked that stream against the registry, and
-- only the bytes it checked can go back.
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then
  return false
end
local fields, stream, envelope = found[1][2], nil, nil
for i = 1, #fields, 2 do
  if fields[i] == 'stream' then stream = fields[i + 1] end
  if fields[i] == 'envelope' then envelope = fields[i + 1] end
end
if stream ~= KEYS[2] then
  return redis.error_reply('DLQ entry ' .. ARGV[1] .. ' names another stream than ' .. KEYS[2])
end
if envelope ~= ARGV[2] then
  return redis.error_reply('DLQ entry ' .. ARGV[1] .. ' holds other bytes than the ones checked')
end
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[3])
return redis.call('XADD', KEYS[2], '*', 'envelope', ARGV[2])
