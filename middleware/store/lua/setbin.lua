-- Edgeway: Set of a binary value over Upstash REST, whose JSON carries no bytes: the value is sent
-- as the raw request body, which Upstash appends as the command's LAST argument. SET's own syntax
-- puts options after the value, hence this script with the value last.
-- KEYS[1]  the key; ARGV[1] ttl_ms; ARGV[2] 1 for NX (only if absent), else 0; ARGV[3] the value
if ARGV[2] == '1' then
  return redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[1], 'NX')
end
return redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[1])
