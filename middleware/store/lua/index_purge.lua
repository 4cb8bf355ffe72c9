-- Edgeway: delete the keys recorded in an index (see index_add.lua) and forget them; returns how many
-- of those keys existed.
-- KEYS[1]  the index; ARGV[1] "1" to delete only the members recorded with the label ARGV[2], "" for all
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local keys, forget = {}, {}
for _, member in ipairs(members) do
  local bar = string.find(member, '|', 1, true)
  if ARGV[1] ~= '1' or string.sub(member, 1, bar - 1) == ARGV[2] then
    keys[#keys + 1] = string.sub(member, bar + 1)
    forget[#forget + 1] = member
  end
end
local deleted = 0
-- unpack() has a stack limit: work in slices
for first = 1, #keys, 500 do
  local last = math.min(first + 499, #keys)
  deleted = deleted + redis.call('DEL', unpack(keys, first, last))
  if ARGV[1] == '1' then
    redis.call('ZREM', KEYS[1], unpack(forget, first, last))
  end
end
if ARGV[1] ~= '1' then
  redis.call('DEL', KEYS[1])
end
return deleted
