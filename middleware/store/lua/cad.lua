-- Edgeway: compare-and-delete (Delete with if_value): delete the key only while it holds the value,
-- so a lock is released by its holder only, never after it expired and another took it.
-- KEYS[1]  the key; ARGV[1] the expected value; ARGV[2] "1" when ARGV[1] is bytes sent as Latin-1
-- text (over Upstash's JSON, see setbin.lua), "" otherwise
local expected = ARGV[1]
if ARGV[2] == '1' then
  local bytes = {}
  for b = 128, 255 do
    bytes[string.char(192 + math.floor(b / 64), 128 + b % 64)] = string.char(b)
  end
  expected = string.gsub(expected, '[\194\195][\128-\191]', bytes)
end
if redis.call('GET', KEYS[1]) == expected then
  return redis.call('DEL', KEYS[1])
end
return 0
