-- Edgeway: record this instance as live and count the instances seen within the TTL.
-- KEYS[1]  the instances sorted set (member = instance id, score = last heartbeat ms)
-- ARGV[1]  instance id; ARGV[2] ttl_ms; ARGV[3] "now" in ms, or "" for the server clock
local now = tonumber(ARGV[3])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], ttl)
return redis.call('ZCARD', KEYS[1])
