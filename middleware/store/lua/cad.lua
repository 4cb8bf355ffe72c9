-- Edgeway: compare-and-delete (Delete with if_value): delete the key only while it holds the value,
-- so a lock is released by its holder only, never after it expired and another took it.
-- KEYS[1]  the key; ARGV[1] the expected value (its last argument: Upstash may send it as raw bytes)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
