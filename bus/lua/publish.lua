-- Idempotent XADD of a batch of events: an event id is added to its stream at most once
-- while its dedup key lives, so a redelivered input that re-publishes its stored handoffs
-- leaves exactly one copy in the target stream.
-- KEYS: stream_1, dedup_1, stream_2, dedup_2, ...
-- ARGV: ttl_seconds, envelope_1, envelope_2, ...
-- Returns: per event the new entry id, or false when it was already published.
local ttl = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS / 2 do
  local stream = KEYS[2 * i - 1]
  local dedup = KEYS[2 * i]
  if redis.call('SET', dedup, '1', 'NX', 'EX', ttl) then
    local id = redis.call('XADD', stream, '*', 'envelope', ARGV[i + 1])
    redis.call('SET', dedup, id, 'KEEPTTL')
    out[i] = id
  else
    out[i] = false
  end
end
return out
