"""MemoryStore past ``max_keys``: expired keys go first, then the least recently used (reads count)."""

from __future__ import annotations

from edgeway.middleware.store import Algorithm, Get, LimitCheck, RateLimit, RateLimitResult, Set
from edgeway.middleware.store.memory import MemoryStore
from tests.clock import Clock

T0 = 1_700_000_040.0


async def allowed(store: MemoryStore, check: LimitCheck) -> bool:
    (result,) = await store.execute([RateLimit((check,))])
    assert isinstance(result, RateLimitResult)
    return result.allowed


async def test_an_abuser_only_rejected_is_not_forgotten_when_the_store_is_full() -> None:
    store = MemoryStore(clock=Clock(T0), max_keys=1_000)
    abuser = LimitCheck("rl:abuser", Algorithm.FIXED_WINDOW, 5, 60_000)
    assert [await allowed(store, abuser) for _ in range(5)] == [True] * 5
    for i in range(3_000):  # three times the capacity in distinct clients, the abuser retrying meanwhile
        assert await allowed(store, LimitCheck(f"rl:client{i}", Algorithm.FIXED_WINDOW, 5, 60_000))
        if i % 50 == 0:
            assert not await allowed(store, abuser)
    assert [await allowed(store, abuser) for _ in range(5)] == [False] * 5


async def test_expired_keys_are_evicted_before_live_ones() -> None:
    clock = Clock(T0)
    store = MemoryStore(clock=clock, max_keys=100)
    await store.execute([Set(f"live{i}", "v", 600_000) for i in range(50)])
    await store.execute([Set(f"short{i}", "v", 1_000) for i in range(50)])
    clock.now += 2  # the short ones expired; the live ones are now the least recently used
    await store.execute([Set(f"new{i}", "v", 600_000) for i in range(50)])
    live = await store.execute([Get(f"live{i}") for i in range(50)])
    assert live == ["v"] * 50


async def test_least_recently_used_goes_first_and_reads_count() -> None:
    store = MemoryStore(clock=Clock(T0), max_keys=3)
    await store.execute([Set("a", "1", 60_000), Set("b", "2", 60_000), Set("c", "3", 60_000)])
    assert await store.execute([Get("a")]) == ["1"]  # a read makes "a" recent: "b" is now the oldest
    await store.execute([Set("d", "4", 60_000)])
    assert await store.execute([Get("a"), Get("b"), Get("c"), Get("d")]) == ["1", None, "3", "4"]


async def test_rewrites_keep_the_expiry_index_bounded() -> None:
    clock = Clock(T0)
    store = MemoryStore(clock=clock, max_keys=100)
    for step in range(5_000):  # each write moves the expiry: a stale index entry each time
        clock.now += 0.001
        await store.execute([Set(f"k{step % 10}", "v", 60_000)])
    assert len(store._expiries) <= 2 * 100 + 1
    assert await store.execute([Get(f"k{i}") for i in range(10)]) == ["v"] * 10
