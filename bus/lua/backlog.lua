-- The backlog of each stream: what its slowest consumer group has not finished, i.e. the
-- largest (lag + pending) over its groups; a stream without a group: its length (nobody has
-- read any of it); a missing stream: 0. One consistent snapshot per call, so a producer in
-- any language can EVAL this before it XADDs (docs/wire-format.md, "Backpressure").
-- KEYS: stream_1, stream_2, ...
-- ARGV[1]: cap. When Redis cannot tell a group's lag (it lost the read counter, e.g. after
-- an AOF reload, or entries were deleted past the group), the entries after its last
-- delivered id are counted, at most cap + 1 of them.
-- Returns: per stream its backlog.
local cap = tonumber(ARGV[1])
local out = {}
for i, stream in ipairs(KEYS) do
  if redis.call('EXISTS', stream) == 0 then
    out[i] = 0
  else
    local groups = redis.call('XINFO', 'GROUPS', stream)
    if #groups == 0 then
      out[i] = redis.call('XLEN', stream)
    else
      local worst = 0
      for _, g in ipairs(groups) do
        local info = {}
        for j = 1, #g, 2 do
          info[g[j]] = g[j + 1]
        end
        local lag = info['lag']
        if not lag then
          local last = info['last-delivered-id']
          lag = #redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', cap + 1)
        end
        local backlog = lag + info['pending']
        if backlog > worst then
          worst = backlog
        end
      end
      out[i] = worst
    end
  end
end
return out
