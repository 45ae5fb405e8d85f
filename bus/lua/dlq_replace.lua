-- Replace a DLQ entry by an edited copy (streams cannot be updated in place), atomically.
-- KEYS[1] dlq stream; ARGV[1] old id, ARGV[2..] field/value pairs of the new entry.
-- Returns the new DLQ id, or false when the old entry is already gone.
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then
  return false
end
return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
