"""FailoverStore: health tracking, fallback routing by command kind, recovery, degraded limits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest
from prometheus_client import REGISTRY

from edgeway.middleware.store import (
    Algorithm,
    Command,
    CommandError,
    Delete,
    Get,
    Incr,
    LimitCheck,
    Publish,
    RateLimit,
    RateLimitResult,
    Revoke,
    Revoked,
    Set,
    Store,
    StoreError,
)
from edgeway.middleware.store.failover import FailoverStore
from edgeway.middleware.store.memory import MemoryStore


class Shared(Store):
    """A shared (non-memory) store that can be switched off, counting the batches it receives.

    ``writable`` False plays a server that answers reads and PING but refuses writes (a replica, OOM).
    """

    def __init__(self, kind: str = "redis", inner: Store | None = None) -> None:
        self.kind = kind
        self.inner = inner or MemoryStore()
        self.up = True
        self.writable = True
        self.batches: list[list[Command]] = []

    async def execute(self, commands: Sequence[Command], *, timeout: float | None = None) -> list[object]:
        self.batches.append(list(commands))
        if not self.up:
            raise StoreError(f"{self.kind} is down")
        if not self.writable and any(not isinstance(c, Get) for c in commands):
            raise StoreError("READONLY You can't write against a read only replica.")
        return await self.inner.execute(commands, timeout=timeout)

    async def ping(self) -> None:
        if not self.up:
            raise StoreError(f"{self.kind} is down")

    def describe(self) -> str:
        return f"{self.kind}://test"


def limit(quota: int = 10, key: str = "k") -> RateLimit:
    return RateLimit((LimitCheck(key, Algorithm.FIXED_WINDOW, quota, 60_000),))


async def admitted(store: Store, command: RateLimit, times: int) -> int:
    count = 0
    for _ in range(times):
        (result,) = await store.execute([command])
        assert isinstance(result, RateLimitResult)
        count += result.allowed
    return count


async def test_failures_mark_the_primary_down_and_later_calls_skip_it() -> None:
    primary, fallback = Shared("redis"), Shared("postgres")
    store = FailoverStore(primary, [fallback], failures=3, probe_initial=60)
    primary.up = False
    for _ in range(5):
        await store.execute([limit()])
    assert len(primary.batches) == 3  # the first three paid for the failure, then it was skipped
    assert len(fallback.batches) == 5
    assert store.kind == "postgres"
    await store.close()


async def test_the_probe_brings_the_primary_back() -> None:
    primary, fallback = Shared("redis"), Shared("postgres")
    store = FailoverStore(primary, [fallback], failures=1, probe_initial=0.01, probe_max=0.02)
    primary.up = False
    await store.execute([limit()])
    assert store.kind == "postgres"
    primary.up = True
    for _ in range(100):
        await asyncio.sleep(0.01)
        if store.status()[0]["healthy"]:
            break
    await store.execute([limit()])
    assert store.kind == "redis"
    await store.close()


async def test_caches_fall_back_to_memory_while_limits_go_to_the_shared_fallback() -> None:
    primary, fallback = Shared("redis"), Shared("postgres")
    store = FailoverStore(primary, [fallback, MemoryStore()], failures=1, probe_initial=60)
    primary.up = False
    results = await store.execute([Set("c", "cached", 60_000), limit(), Get("c")])
    assert results[0] is None and results[2] == "cached"
    assert isinstance(results[1], RateLimitResult) and results[1].allowed
    assert fallback.batches[-1] == [limit()]  # only the shared command went to postgres
    await store.close()


async def test_locks_and_counters_are_caches_while_publish_follows_the_chain() -> None:
    primary, fallback = Shared("redis"), Shared("postgres")
    store = FailoverStore(primary, [fallback, MemoryStore()], failures=1, probe_initial=60)
    primary.up = False
    commands: list[Command] = [
        Set("lock", "me", 5_000, only_if_absent=True), Incr("n", ttl_ms=60_000), Publish("events", "changed"),
        Delete("lock", if_value="me"),
    ]
    assert await store.execute(commands) == [True, 1, 0, 1]
    assert fallback.batches[-1] == [Publish("events", "changed")]  # only the notification went to postgres
    await store.close()


async def test_subscribe_covers_every_store_that_notifies() -> None:
    primary, memory = MemoryStore(), MemoryStore()
    shared = Shared("redis", inner=primary)  # Shared itself carries no notifications
    store = FailoverStore(shared, [memory], failures=1, probe_initial=60)
    received: list[str] = []
    subscription = await store.subscribe("events", received.append)
    assert store.notifies
    shared.up = False
    assert await store.execute([Publish("events", "during the fallback")]) == [1]
    await asyncio.sleep(0)  # memory delivers on the next loop turn
    assert received == ["during the fallback"]
    await subscription.close()
    assert await store.execute([Publish("events", "after close")]) == [0]
    with pytest.raises(StoreError, match="notifications"):
        await FailoverStore(Shared("redis"), []).subscribe("events", received.append)
    await store.close()


async def test_cache_only_batches_do_not_touch_the_fallback() -> None:
    primary, fallback = Shared("redis"), Shared("postgres")
    store = FailoverStore(primary, [fallback], failures=1, probe_initial=60)
    primary.up = False
    await store.execute([limit()])
    before = len(fallback.batches)
    assert await store.execute([Get("nothing")]) == [None]
    assert len(fallback.batches) == before
    await store.close()


async def test_every_store_down_falls_to_memory_with_limits_divided_by_live_instances() -> None:
    primary, fallback = Shared("redis"), Shared("postgres")
    store = FailoverStore(primary, [fallback, MemoryStore()], failures=1, probe_initial=60, instances=3)
    primary.up = fallback.up = False
    assert await admitted(store, limit(quota=10), 10) == 3  # 10 // 3 instances
    assert store.kind == "memory"
    await store.close()


async def test_heartbeats_count_live_instances_in_the_shared_store() -> None:
    shared_state = MemoryStore()
    one = FailoverStore(Shared("redis", shared_state), [MemoryStore()])
    two = FailoverStore(Shared("redis", shared_state), [MemoryStore()])
    await one.execute([Get("x")])  # starts its heartbeat: it sees itself
    for _ in range(50):
        await asyncio.sleep(0.01)
        if one.live_instances == 1 and one._live == 1:
            break
    await two.execute([Get("x")])  # the second instance sees both
    for _ in range(50):
        await asyncio.sleep(0.01)
        if two.live_instances == 2:
            break
    assert (one.live_instances, two.live_instances) == (1, 2)
    await one.close()
    await two.close()


async def test_no_fallback_means_the_error_reaches_the_policy() -> None:
    primary = Shared("redis")
    store = FailoverStore(primary, [], failures=1, probe_initial=60)
    primary.up = False
    with pytest.raises(StoreError, match="no store left"):
        await store.execute([limit()])
    await store.close()


async def test_readiness_and_description_show_the_chain() -> None:
    primary = Shared("redis")
    store = FailoverStore(primary, [MemoryStore()], failures=1, probe_initial=60)
    await store.ping()
    primary.up = False
    await store.execute([limit()])
    await store.ping()  # memory answers
    assert [entry["healthy"] for entry in store.status()] == [False, True]
    assert "(down)" in store.describe()
    await store.close()


async def test_revocations_are_written_everywhere_and_survive_the_primary_failing() -> None:
    primary, fallback, memory = Shared("redis"), Shared("postgres"), MemoryStore()
    store = FailoverStore(primary, [fallback, memory], failures=1, probe_initial=60)
    assert await store.execute([Revoke("rv:u:1", 1_000, 60_000)]) == [None]
    assert len(primary.batches) == len(fallback.batches) == 1
    primary.up = False
    assert await store.execute([Revoked(("rv:u:1",), 500)]) == [True]  # read from the fallback
    guarded = RateLimit(limit().checks, Revoked(("rv:u:1",), 500))
    assert await store.execute([guarded]) == [RateLimitResult(False, (), revoked=True)]
    fallback.up = False
    # only this instance's memory is left: it cannot know about revocations made elsewhere
    assert await store.execute([Revoked(("rv:u:1",), 500), Get("x")]) == [None, None]
    with pytest.raises(StoreError, match="no shared store took the revocation"):
        await store.execute([Revoke("rv:u:2", 1_000, 60_000)])
    await store.close()


async def test_revocations_made_while_the_primary_is_down_are_replayed_when_it_returns() -> None:
    primary, fallback = Shared("redis"), Shared("postgres")
    store = FailoverStore(primary, [fallback], failures=1, probe_initial=0.01, probe_max=0.02)
    primary.up = False
    await store.execute([limit()])  # marks it down
    await store.execute([Revoke("rv:t:1", 2_000, 60_000)])
    primary.up = True
    for _ in range(200):  # until the probe finds it answering (bounded: a few seconds at most)
        await store.execute([limit()])
        if store.kind == "redis":
            break
        await asyncio.sleep(0.01)
    assert await primary.inner.execute([Revoked(("rv:t:1",), 1_000)]) == [True]
    assert await store.execute([Revoked(("rv:t:1",), 1_000)]) == [True]
    await store.close()


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


def store_up(kind: str) -> float | None:
    return REGISTRY.get_sample_value("edgeway_store_up", {"store": kind})


def store_mode(kind: str) -> float | None:
    return REGISTRY.get_sample_value("edgeway_store_mode", {"mode": kind})


async def test_failed_writes_mark_the_store_down_even_while_reads_succeed() -> None:
    primary, fallback = Shared("redis"), Shared("postgres")
    store = FailoverStore(primary, [fallback], failures=3, probe_initial=60)
    primary.writable = False
    for _ in range(3):  # every cache read works; it must not hide the failing writes
        assert await store.execute([Get("c")]) == [None]
        await store.execute([limit()])
    assert store.kind == "postgres"
    assert store.status()[0]["healthy"] is False and store.status()[0]["failing"] == ["write"]
    await store.close()


async def test_the_probe_does_the_failed_work_and_mode_and_up_follow_health() -> None:
    """A PING answers on a replica: only a real write brings the store back; no request is needed for it."""
    primary, fallback = Shared("redis"), Shared("postgres")
    store = FailoverStore(primary, [fallback], failures=1, probe_initial=0.05, probe_max=0.05)
    primary.writable = False
    await store.execute([limit()])
    assert (store.kind, store_up("redis"), store_mode("postgres"), store_mode("redis")) == ("postgres", 0, 1, 0)
    probes = len(primary.batches)
    await wait_until(lambda: len(primary.batches) >= probes + 3)  # probes keep writing, and failing
    assert store.kind == "postgres" and not store.status()[0]["healthy"]
    primary.writable = True
    await wait_until(lambda: store.status()[0]["healthy"] is True)
    assert (store.kind, store_up("redis"), store_mode("redis"), store_mode("postgres")) == ("redis", 1, 1, 0)
    assert all(isinstance(c, Set) for batch in primary.batches[probes:] for c in batch)  # probe writes only
    await store.close()


class Refusing(Shared):
    """A working store that refuses every rate-limit command on its merits (a script error)."""

    async def execute(self, commands: Sequence[Command], *, timeout: float | None = None) -> list[object]:
        self.batches.append(list(commands))
        return [CommandError("ERR too many results to unpack") if isinstance(c, RateLimit) else None
                for c in commands]


async def test_a_command_error_is_never_an_outage_nor_run_on_the_fallback() -> None:
    primary, fallback = Refusing("redis"), Shared("postgres")
    store = FailoverStore(primary, [fallback], failures=1, probe_initial=60)
    for _ in range(5):
        (result,) = await store.execute([limit()])
        assert isinstance(result, CommandError)
    assert store.kind == "redis" and store.status()[0]["healthy"] is True
    assert fallback.batches == []
    await store.close()


async def test_start_heartbeats_before_any_request() -> None:
    shared_state = MemoryStore()
    idle = FailoverStore(Shared("redis", shared_state), [MemoryStore()])
    busy = FailoverStore(Shared("redis", shared_state), [MemoryStore()])
    await idle.start()  # application startup: this instance has served nothing yet
    await busy.start()
    await wait_until(lambda: busy._live == 2 or idle._live == 2)
    await idle.close()
    await busy.close()


async def test_a_batch_that_falls_over_is_decided_by_the_fallbacks_counters_and_counted() -> None:
    """Counters don't move between stores, for one request either: a batch the primary failed (a timeout
    under load, the primary still healthy) is decided by the next store, whose counter has not seen the
    primary's traffic. That is the whole of the over-admission a burst can get, and it is counted."""
    primary, fallback = Shared("redis"), Shared("postgres")
    store = FailoverStore(primary, [fallback], failures=3, probe_initial=60)
    sample = ("edgeway_store_fallbacks_total", {"store": "redis"})
    before = REGISTRY.get_sample_value(*sample) or 0.0
    assert await admitted(store, limit(quota=5), 7) == 5
    primary.up = False
    assert await admitted(store, limit(quota=5), 2) == 2  # decided by the fallback's own, empty counter
    primary.up = True
    assert await admitted(store, limit(quota=5), 1) == 0  # back on the primary's exact count
    assert store.kind == "redis"
    assert REGISTRY.get_sample_value(*sample) == before + 2
