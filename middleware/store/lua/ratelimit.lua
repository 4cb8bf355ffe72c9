-- Edgeway: check every limit of one request, then charge all of them or none.
-- KEYS[i]  the base key of limit i (all share one hash tag, so one Cluster slot)
-- ARGV[1]  "now" in ms, or "" to use the server clock (TIME): instances with skewed clocks agree
-- ARGV[2+6(i-1) ..]  algorithm, quota, window_ms, cost, burst, enforced (1|0) for limit i
-- Returns {allowed, then per limit: allowed, remaining, reset_ms, retry_after_ms}, or {2} (see the guard).
-- Semantics mirror middleware/store/memory.py exactly; the shared store suite checks both.

local SLACK = 1000
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A revocation guard (the session's Revoked check) may follow: its keys after the limits' keys, and
-- ARGV ends with issued_at_ms and the guard's key count. A revoked session is charged nothing: returns {2}.
local n, guards, issued = #KEYS, 0, 0
if (#ARGV - 1) % 6 == 2 then
  guards, issued = tonumber(ARGV[#ARGV]), tonumber(ARGV[#ARGV - 1])
  n = n - guards
end
local plans = {}
local all_ok = true
local ALGORITHMS = {['fixed-window'] = true, ['sliding-window'] = true, ['sliding-log'] = true,
                    ['token-bucket'] = true}
local LOG_CHUNK = 500  -- ZADD members per call: unpack() of thousands of arguments fails in Lua

-- validate every limit before touching any key: a bad argument must not leave earlier limits charged
local expected = 1 + 6 * n + (guards > 0 and 2 or 0)
if #ARGV ~= expected then
  return redis.error_reply('ERR edgeway: expected ' .. expected .. ' arguments, got ' .. #ARGV)
end
for i = 1, n do
  local base = 2 + (i - 1) * 6
  local quota, window = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local cost, burst = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
  if not ALGORITHMS[ARGV[base]] then
    return redis.error_reply('ERR edgeway: unknown rate-limit algorithm ' .. tostring(ARGV[base]))
  end
  if not (quota and window and cost and burst) or quota < 1 or window < 1 or cost < 0 or burst < 0
      or cost ~= math.floor(cost) then
    return redis.error_reply('ERR edgeway: bad limit ' .. KEYS[i] .. ': quota and window_ms must be positive, '
      .. 'cost and burst whole and not negative')
  end
end

-- phase 1: read and decide. The guard's keys and the fixed and sliding windows' counters are read with ONE
-- MGET (each redis.call costs the server more than the read itself); the other algorithms read their own
-- structures with type-checking commands, so a WRONGTYPE stops the script here, before any write.
local reads = {}
for g = n + 1, n + guards do reads[#reads + 1] = KEYS[g] end
for i = 1, n do
  local base = 2 + (i - 1) * 6
  local p = {
    key = KEYS[i], algo = ARGV[base], quota = tonumber(ARGV[base + 1]),
    window = tonumber(ARGV[base + 2]), cost = tonumber(ARGV[base + 3]),
    burst = tonumber(ARGV[base + 4]), enforced = ARGV[base + 5] == '1',
  }
  if p.algo == 'fixed-window' or p.algo == 'sliding-window' then
    local index = math.floor(now / p.window)
    p.index = index
    p.wkey = p.key .. ':' .. index
    reads[#reads + 1] = p.wkey
    p.at = #reads
    if p.algo == 'sliding-window' then reads[#reads + 1] = p.key .. ':' .. (index - 1) end
  end
  plans[i] = p
end
local values = #reads > 0 and redis.call('MGET', unpack(reads)) or {}
for g = 1, guards do
  local at = tonumber(values[g] or '')
  if at and at > issued then return {2} end
end

for i = 1, n do
  local p = plans[i]
  if p.algo == 'fixed-window' then
    p.count = tonumber(values[p.at] or '0')
    p.reset = p.index * p.window + p.window - now
    p.ok = p.count + p.cost <= p.quota
  elseif p.algo == 'sliding-window' then
    p.current = tonumber(values[p.at] or '0')
    p.previous = tonumber(values[p.at + 1] or '0')
    p.elapsed = now - p.index * p.window
    p.estimate = p.previous * (p.window - p.elapsed) / p.window + p.current
    p.ok = p.estimate + p.cost <= p.quota
  elseif p.algo == 'sliding-log' then
    redis.call('ZREMRANGEBYSCORE', p.key, '-inf', now - p.window)
    p.count = redis.call('ZCARD', p.key)
    p.ok = p.count + p.cost <= p.quota
  else -- token-bucket
    p.capacity = p.burst > 0 and p.burst or p.quota
    p.rate = p.quota / p.window
    local state = redis.call('HMGET', p.key, 't', 'ts')
    -- (bt, bts): the stored level and its time, from which every later read computes the level
    if state[1] then
      p.bt, p.bts = tonumber(state[1]), tonumber(state[2])
      p.tokens = math.min(p.capacity, p.bt + math.max(0, now - p.bts) * p.rate)
    else
      p.bt, p.bts = p.capacity, now
      p.tokens = p.capacity
    end
    p.ok = p.tokens >= p.cost
  end
  if p.enforced and not p.ok then all_ok = false end
end

local out = {all_ok and 1 or 0}
for i = 1, n do
  local p = plans[i]
  local remaining, reset, retry
  if p.algo == 'fixed-window' then
    if all_ok then
      p.count = p.count + p.cost
      redis.call('SET', p.wkey, p.count, 'PX', p.window + SLACK)
    end
    remaining = math.max(0, p.quota - p.count)
    retry = p.ok and 0 or p.reset
  elseif p.algo == 'sliding-window' then
    if all_ok then
      p.current = p.current + p.cost
      p.estimate = p.estimate + p.cost
      redis.call('SET', p.wkey, p.current, 'PX', 2 * p.window + SLACK)
    end
    remaining = math.max(0, math.floor(p.quota - p.estimate))
    reset = p.window - p.elapsed
    if p.ok then
      retry = 0
    elseif p.cost > p.quota then
      retry = p.window
    elseif p.current + p.cost <= p.quota then
      local need = p.window - (p.quota - p.current - p.cost) * p.window / p.previous
      retry = math.max(1, math.ceil(need - p.elapsed))
    else
      local need = p.window - (p.quota - p.cost) * p.window / p.current
      retry = math.max(1, math.ceil(p.window - p.elapsed + need))
    end
    p.reset = reset
  elseif p.algo == 'sliding-log' then
    if all_ok and p.cost > 0 then
      local args = {}
      for j = 0, p.cost - 1 do
        args[#args + 1] = now
        args[#args + 1] = now .. ':' .. (p.count + j)
        if #args >= 2 * LOG_CHUNK then
          redis.call('ZADD', p.key, unpack(args))
          args = {}
        end
      end
      if #args > 0 then redis.call('ZADD', p.key, unpack(args)) end
      redis.call('PEXPIRE', p.key, p.window + SLACK)
      p.count = p.count + p.cost
    end
    remaining = math.max(0, p.quota - p.count)
    local oldest = redis.call('ZRANGE', p.key, 0, 0, 'WITHSCORES')
    p.reset = oldest[2] and (tonumber(oldest[2]) + p.window - now) or 0
    if p.ok then
      retry = 0
    elseif p.cost > p.quota then
      retry = p.window
    else
      local idx = p.count + p.cost - p.quota - 1
      local entry = redis.call('ZRANGE', p.key, idx, idx, 'WITHSCORES')
      retry = math.max(1, tonumber(entry[2]) + p.window - now)
    end
  else -- token-bucket
    if all_ok then
      p.tokens = p.tokens - p.cost
      p.bt, p.bts = p.tokens, now
      redis.call('HSET', p.key, 't', string.format('%.17g', p.tokens), 'ts', now)
      -- live until refilled from the current level: shadow and cost_from debits push it below zero
      redis.call('PEXPIRE', p.key, math.ceil((p.capacity - p.tokens) / p.rate) + SLACK)
    end
    remaining = math.max(0, math.floor(p.tokens))
    p.reset = math.ceil((p.capacity - p.tokens) / p.rate)
    if p.ok then
      retry = 0
    elseif p.cost > p.capacity then
      retry = p.window
    else
      -- the first whole ms at which a later read (same arithmetic) finds the tokens: ceil can land one
      -- ms short in floating point
      local d = math.ceil((p.cost - p.bt) / p.rate)
      if p.bt + d * p.rate < p.cost then d = d + 1 end
      retry = math.max(1, p.bts + d - now)
    end
  end
  out[#out + 1] = p.ok and 1 or 0
  out[#out + 1] = remaining
  out[#out + 1] = math.floor(p.reset)
  out[#out + 1] = math.floor(retry)
end
return out
