-- Edgeway: Set of a binary value over a JSON transport (Upstash REST). JSON strings carry text,
-- so the client sends each byte as the character of the same code point (Latin-1); the transport
-- turns that into UTF-8, where bytes 0x80-0xFF became the pairs C2/C3 80-BF. gsub with a lookup
-- table (C speed, no Lua call per byte) turns the pairs back into single bytes.
-- KEYS[1]  the key; ARGV[1] the value as Latin-1 text; ARGV[2] ttl_ms; ARGV[3] "1" for NX
local bytes = {}
for b = 128, 255 do
  bytes[string.char(192 + math.floor(b / 64), 128 + b % 64)] = string.char(b)
end
local value = string.gsub(ARGV[1], '[\194\195][\128-\191]', bytes)
if ARGV[3] == '1' then
  return redis.call('SET', KEYS[1], value, 'PX', ARGV[2], 'NX')
end
return redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
