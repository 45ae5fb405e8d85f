-- Put a dead-lettered envelope back onto its stream, atomically with removing it from the DLQ.
-- KEYS[1] dlq stream, KEYS[2] target stream, KEYS[3] failure-history hash
-- ARGV[1] dlq entry id, ARGV[2] envelope bytes
-- Returns the new entry id, or false when the DLQ entry is already gone (someone else acted).
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then
  return false
end
redis.call('DEL', KEYS[3])
return redis.call('XADD', KEYS[2], '*', 'envelope', ARGV[2])
