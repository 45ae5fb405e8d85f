-- A token bucket shared by every replica that names one dependency, in one atomic step.
-- Time is the Redis server's (TIME), never a client's clock: replicas on hosts whose clocks
-- disagree still share one refill rate.
-- KEYS[1]: the bucket (a hash: tokens, ts, rate, burst, granted, refused, exhausted, empty,
-- since: when it was created, full).
-- ARGV: mode, rate (units per second), burst (capacity), amount, max_wait_s, ttl_s
--   'take'   reserve `amount` units. Granted at once when the bucket holds them; granted with
--            a wait (the units are taken now and the balance goes below zero) when they refill
--            within `max_wait_s`; refused otherwise (nothing taken).
--            Returns {1|0, wait_s (granted: sleep this long first; refused: ask again after
--            it), tokens after}.
--   'charge' take `amount` more units (negative: give back) after a call, from its result;
--            may leave the balance below zero. Returns tokens after.
--   'peek'   (no ARGV but the mode) Returns {tokens, rate, burst, granted, refused,
--            exhausted, since}, or false when the bucket does not exist.
-- Floats travel as strings: Redis would truncate a Lua number to an integer.
-- A field someone overwrote with garbage (not a finite number) counts as missing, so a forged
-- bucket resets instead of failing every call (or granting every call, for a NaN).
local function num(x, default)
  local n = tonumber(x)
  if n == nil or n ~= n or n == math.huge or n == -math.huge then
    return default
  end
  return n
end
local key, mode = KEYS[1], ARGV[1]
local h = redis.call('HMGET', key, 'tokens', 'ts', 'rate', 'burst', 'empty')
if mode == 'peek' and not h[1] then
  return false
end
local rate = num(ARGV[2], num(h[3], 0))
local burst = num(ARGV[3], num(h[4], 0))
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tokens = num(h[1], burst)
local ts = num(h[2], now)
local function incr(field)
  redis.call('HSET', key, field, math.floor(num(redis.call('HGET', key, field), 0)) + 1)
end
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate)
else
  now = ts -- the server clock went back (a failover): no refill until it catches up
end
local function f(x)
  return string.format('%.6f', x)
end
if mode == 'peek' then
  local c = redis.call('HMGET', key, 'granted', 'refused', 'exhausted', 'since')
  return {f(tokens), f(rate), f(burst), f(num(c[1], 0)), f(num(c[2], 0)), f(num(c[3], 0)),
    f(num(c[4], 0))}
end
if not h[1] then
  redis.call('HSET', key, 'since', f(now))
end
local amount = num(ARGV[4], 0)
local ttl = tonumber(ARGV[6])
if mode == 'charge' then
  tokens = math.min(burst, tokens - amount)
  redis.call('HSET', key, 'tokens', f(tokens), 'ts', f(now), 'rate', f(rate), 'burst', f(burst))
  redis.call('EXPIRE', key, ttl)
  return f(tokens)
end
local max_wait = tonumber(ARGV[5])
local granted, wait = 1, 0
if tokens < amount then
  -- empty: one more exhaustion when the previous take still found units
  if h[5] ~= '1' then
    incr('exhausted')
    redis.call('HSET', key, 'empty', '1')
  end
  wait = (amount - tokens) / rate
  if wait > max_wait then
    granted = 0
    wait = wait - max_wait
  end
elseif h[5] == '1' then
  redis.call('HSET', key, 'empty', '0')
end
if granted == 1 then
  tokens = tokens - amount
  incr('granted')
else
  incr('refused')
end
redis.call('HSET', key, 'tokens', f(tokens), 'ts', f(now), 'rate', f(rate), 'burst', f(burst))
redis.call('EXPIRE', key, ttl)
return {granted, f(wait), f(tokens)}
