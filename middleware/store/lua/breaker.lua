-- Edgeway: one circuit breaker update, atomically (middleware/breaker_state.py `apply`, step for step).
-- KEYS[1]  the breaker's hash: p phase, f failures, s streak, u until_ms, k successes,
--          wi window index, wt/wf this window's total/failed, pt/pf the previous window's
-- ARGV[1]  "now" in ms, or "" for the server clock (TIME)
-- ARGV[2..9]   rule: failures, rate_bp, window_ms, min_requests, open_ms, max_open_ms, success_threshold, probe_ms
-- ARGV[10..18] event: successes, failures, probe, acquire, reset, seed_phase, seed_remaining_ms, seed_streak, jitter
-- Returns {phase, remaining_ms, failures, granted, reason, streak}.
-- A key of another type makes HGETALL fail: an error reply, which the caller treats as a store failure.

local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local r_failures, r_rate, r_window, r_min = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local r_open, r_max, r_threshold, r_probe = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local e_ok, e_fail = tonumber(ARGV[10]), tonumber(ARGV[11])
local e_probe, e_acquire, e_reset = ARGV[12] == '1', ARGV[13] == '1', ARGV[14] == '1'
local seed_phase, seed_remaining, seed_streak = tonumber(ARGV[15]), tonumber(ARGV[16]), tonumber(ARGV[17])
local jitter = tonumber(ARGV[18])
local CLOSED, OPEN, HALF_OPEN = 0, 1, 2

local function index_at(t) return math.floor(t / r_window) end
local function closed()
  return {p = CLOSED, f = 0, s = 0, u = 0, k = 0, wi = index_at(now), wt = 0, wf = 0, pt = 0, pf = 0}
end
local function opened(streak)
  local base = math.min(r_open * math.max(1, streak), r_max)
  local st = closed()
  st.p, st.s, st.u = OPEN, streak, now + base - math.floor(base * jitter / 1000)
  return st
end

local raw = redis.call('HGETALL', KEYS[1])
local st
local reason = 0
if #raw == 0 then
  st = closed()
  if seed_phase ~= CLOSED then
    st.p, st.s, st.u = OPEN, math.max(1, seed_streak), now + math.max(0, seed_remaining)
  end
else
  st = {}
  for i = 1, #raw, 2 do st[raw[i]] = tonumber(raw[i + 1]) end
end

if e_reset then
  if st.p ~= CLOSED then reason = 5 end
  st = closed()
end

local index = index_at(now)
if index ~= st.wi then
  if index == st.wi + 1 then
    st.pt, st.pf = st.wt, st.wf
  else
    st.pt, st.pf = 0, 0
  end
  st.wt, st.wf, st.wi = 0, 0, index
end

if st.p == CLOSED then
  if e_ok > 0 or e_fail > 0 then
    if e_ok > 0 then st.f = 0 end
    st.f = st.f + e_fail
    st.wt = st.wt + e_ok + e_fail
    st.wf = st.wf + e_fail
    if e_fail > 0 then
      if r_failures > 0 and st.f >= r_failures then
        reason = 1
      elseif r_rate > 0 then
        local weight = r_window - (now - st.wi * r_window)
        local total = st.pt * weight + st.wt * r_window
        local failed = st.pf * weight + st.wf * r_window
        if total >= r_min * r_window and failed * 10000 >= r_rate * total then reason = 2 end
      end
      if reason == 1 or reason == 2 then st = opened(1) end
    end
  end
elseif st.p == HALF_OPEN and e_probe then
  if e_fail > 0 then
    reason = 3
    st = opened(st.s + 1)
  elseif e_ok > 0 then
    local successes = st.k + e_ok
    if successes >= r_threshold then
      reason = 4
      st = closed()
    else
      st.k, st.u = successes, now
    end
  else
    st.u = math.min(st.u, now)
  end
end

local granted = st.p == CLOSED
if e_acquire and st.p ~= CLOSED and now >= st.u then
  if st.p == OPEN then
    reason = 6
    st.p, st.k = HALF_OPEN, 0
  end
  st.u = now + r_probe
  granted = true
end

redis.call('HSET', KEYS[1], 'p', st.p, 'f', st.f, 's', st.s, 'u', st.u, 'k', st.k,
  'wi', st.wi, 'wt', st.wt, 'wf', st.wf, 'pt', st.pt, 'pf', st.pf)
redis.call('PEXPIRE', KEYS[1], 2 * r_window + r_max + 60000)
local remaining = 0
if st.p ~= CLOSED then remaining = math.max(0, st.u - now) end
return {st.p, remaining, st.f, granted and 1 or 0, reason, st.s}
