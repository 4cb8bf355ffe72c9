-- Edgeway: record a key in an index (a cache route or tag) so a purge can find it.
-- KEYS[1]  the index: sorted set, member = "LABEL|KEY", score = when the key expires (ms)
-- ARGV[1]  "LABEL|KEY" (the label never holds "|"); ARGV[2] the key's ttl_ms (on the server's clock,
--          like the key's own TTL)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
-- members whose key expired would only grow the index
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[1], math.max(1, tonumber(last[2]) - now))
return 1
