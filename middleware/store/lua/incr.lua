-- Edgeway: Incr. Add to a counter and give it a TTL when this increment created it.
-- KEYS[1]  the counter; ARGV[1] amount; ARGV[2] ttl_ms for a new key
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
-- -1: no expiry, i.e. the key was just created (every key Edgeway writes has one)
if redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return value
