-- Edgeway: delete every key recorded in an index, then the index; returns how many keys existed.
-- KEYS[1]  the index (see index_add.lua)
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local deleted = 0
-- unpack() has a stack limit: delete in slices
for first = 1, #members, 500 do
  deleted = deleted + redis.call('DEL', unpack(members, first, math.min(first + 499, #members)))
end
redis.call('DEL', KEYS[1])
return deleted
