"""The store suite: every backend must give the same answers to the same commands.

Backends (param ids): ``memory``; ``fakeredis`` (TcpFakeServer through RedisStore);
``redis`` (a private redis-server); ``upstash`` (UpstashStore against the
Upstash-compatible bridge, over that redis-server); ``postgres`` (PostgresStore
on a private PostgreSQL with the edgeway migration applied); ``supabase``
(SupabaseStore against the PostgREST stub, over that PostgreSQL). Rate-limit
scenarios run on a fake clock passed as ``clock=``, so window edges are walked
without sleeping, and every backend is held to the same literal expectations.
The PostgreSQL stores take the fake clock for every command of a batch (TTLs
too), like memory; the Redis ones for rate limits only.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis

from edgeway.middleware.breaker_state import State as BreakerState
from edgeway.middleware.breaker_state import apply as breaker_apply
from edgeway.middleware.store import (
    Algorithm,
    BreakerEvent,
    BreakerResult,
    BreakerRule,
    BreakerUpdate,
    CommandError,
    Delete,
    Get,
    Incr,
    IndexAdd,
    IndexPurge,
    LimitCheck,
    Publish,
    RateLimit,
    RateLimitResult,
    Revoke,
    Revoked,
    Set,
    Store,
    StoreError,
    StoreTimeout,
)
from edgeway.middleware.store.failover import FailoverStore
from edgeway.middleware.store.memory import MemoryStore
from edgeway.middleware.store.notify import stop
from edgeway.middleware.store.postgres import PostgresStore, SupabaseStore
from edgeway.middleware.store.redis import RedisStore
from edgeway.middleware.store.upstash import UpstashStore
from tests.servers import BRIDGE_TOKEN, SERVICE_KEY, RedisServer, UvicornThread, free_port

FIXED, SLIDING, LOG, BUCKET = (
    Algorithm.FIXED_WINDOW,
    Algorithm.SLIDING_WINDOW,
    Algorithm.SLIDING_LOG,
    Algorithm.TOKEN_BUCKET,
)

T0_MS = 1_700_000_040_000
"""A multiple of 60 s, so every window used below starts exactly at T0."""

SUITE_TIMEOUT = 5.0  # seconds; generous because fakeredis runs Lua in Python


class FakeClock:
    """A clock that moves only when told; reads half a millisecond in, so ``floor(t*1000)`` is exact."""

    def __init__(self, ms: int = T0_MS) -> None:
        self.ms = ms

    def __call__(self) -> float:
        return (self.ms + 0.5) / 1000

    def advance(self, ms: int) -> None:
        self.ms += ms


@dataclass
class Backend:
    name: str
    url: str | None  # the Redis behind a Redis backend, for out-of-band commands (SCRIPT FLUSH) and TTLs on its clock
    factory: Callable[..., Store]
    stores: list[Store] = field(default_factory=list)

    @property
    def remote(self) -> bool:
        return self.url is not None

    def make(self, *, clock: Callable[[], float] | None = None, timeout: float = SUITE_TIMEOUT) -> Store:
        store = self.factory(clock=clock, timeout=timeout)
        self.stores.append(store)
        return store


BACKENDS = ["memory", "fakeredis", "redis", "upstash", "postgres", "supabase"]
REMOTE = ["fakeredis", "redis", "upstash"]
remote_only = pytest.mark.parametrize("backend", REMOTE, indirect=True)
SHARED = [*REMOTE, "postgres", "supabase"]  # state shared by several clients over the network
CACHES = ["memory", *REMOTE]  # where cache commands go: the failover sends them to memory, never to PostgreSQL
caches_only = pytest.mark.parametrize("backend", CACHES, indirect=True)


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    name = request.param
    if name == "memory":
        made = Backend(name, None, lambda clock, timeout: MemoryStore(clock=clock))
    elif name in ("fakeredis", "redis"):
        url = request.getfixturevalue("fakeredis_url" if name == "fakeredis" else "redis_url")
        made = Backend(name, url, lambda clock, timeout: RedisStore(url, clock=clock, timeout=timeout))
    elif name == "upstash":
        bridge: UvicornThread = request.getfixturevalue("upstash_bridge")
        made = Backend(
            name,
            request.getfixturevalue("redis_url"),
            lambda clock, timeout: UpstashStore(bridge.url, token=BRIDGE_TOKEN, clock=clock, timeout=timeout),
        )
    elif name == "postgres":
        dsn: str = request.getfixturevalue("postgres_dsn")
        made = Backend(name, None, lambda clock, timeout: PostgresStore(dsn, clock=clock, timeout=timeout))
    else:
        stub: UvicornThread = request.getfixturevalue("postgrest_stub")
        made = Backend(
            name, None, lambda clock, timeout: SupabaseStore(stub.url, SERVICE_KEY, clock=clock, timeout=timeout)
        )
    yield made
    for store in made.stores:
        await store.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(backend: Backend, clock: FakeClock) -> Store:
    return backend.make(clock=clock)


@pytest.fixture
def key() -> str:
    """A key prefix no other test uses."""
    return f"edgeway-test:{uuid.uuid4().hex[:12]}:"


def limit(key: str, algorithm: Algorithm, quota: int, window_ms: int, **options: int | bool) -> LimitCheck:
    return LimitCheck(key, algorithm, quota, window_ms, **options)  # type: ignore[arg-type]


async def hit(store: Store, *checks: LimitCheck) -> RateLimitResult:
    (result,) = await store.execute([RateLimit(tuple(checks))])
    assert isinstance(result, RateLimitResult)
    return result


def state(result: RateLimitResult, index: int = 0) -> tuple[bool, int, int, int]:
    """``(allowed, remaining, reset_ms, retry_after_ms)`` of one limit."""
    s = result.states[index]
    return (s.allowed, s.remaining, s.reset_ms, s.retry_after_ms)


Step = tuple[int, int, tuple[bool, int, int, int]]
"""(advance the clock by ms, cost, expected state)."""


async def run_script(store: Store, clock: FakeClock, check: LimitCheck, steps: list[Step]) -> None:
    for number, (advance, cost, expected) in enumerate(steps):
        clock.advance(advance)
        result = await hit(store, check._replace(cost=cost))
        assert state(result) == expected, f"step {number} at +{clock.ms - T0_MS} ms"
        assert result.allowed == expected[0]


# -- plain values --------------------------------------------------------------


async def test_ping(store: Store) -> None:
    await store.ping()


async def test_set_get_delete_round_trip(store: Store, key: str) -> None:
    assert await store.execute([Set(key + "a", "one", 60_000)]) == [None]
    assert await store.execute([Get(key + "a")]) == ["one"]
    assert await store.execute([Set(key + "a", "two", 60_000), Get(key + "a")]) == [None, "two"]
    assert await store.execute([Delete(key + "a")]) == [1]
    assert await store.execute([Get(key + "a"), Delete(key + "a")]) == [None, 0]


@caches_only
async def test_index_purge_deletes_every_recorded_key(store: Store, key: str) -> None:
    entries = [Set(key + name, name.encode(), 60_000) for name in ("a", "b", "c")]
    recorded = [IndexAdd(key + "index", key + name, 60_000) for name in ("a", "b", "c")]
    await store.execute([*entries, *recorded, Set(key + "other", "x", 60_000), Delete(key + "c")])
    assert await store.execute([IndexPurge(key + "index")]) == [2]  # c was gone already
    assert await store.execute([Get(key + "a"), Get(key + "b"), Get(key + "other")]) == [None, None, "x"]
    assert await store.execute([IndexPurge(key + "index"), IndexPurge(key + "never")]) == [0, 0]


@caches_only
async def test_index_purge_by_label_deletes_only_that_labels_keys(store: Store, key: str) -> None:
    await store.execute([
        *(Set(key + name, name, 60_000) for name in ("a1", "a2", "b1")),
        IndexAdd(key + "index", key + "a1", 60_000, "a"),
        IndexAdd(key + "index", key + "a2", 60_000, "a"),
        IndexAdd(key + "index", key + "b1", 60_000, "b"),
    ])
    assert await store.execute([IndexPurge(key + "index", "a")]) == [2]
    assert await store.execute([Get(key + "a1"), Get(key + "b1"), IndexPurge(key + "index", "a")]) == [None, "b1", 0]
    assert await store.execute([IndexPurge(key + "index")]) == [1]


@caches_only
async def test_index_forgets_expired_members(backend: Backend, store: Store, clock: FakeClock, key: str) -> None:
    await store.execute([Set(key + "short", "1", 100), IndexAdd(key + "index", key + "short", 100),
                         Set(key + "long", "2", 60_000), IndexAdd(key + "index", key + "long", 60_000)])
    if backend.remote:
        await asyncio.sleep(0.25)
    else:
        clock.advance(150)
    # a member added later trims the expired one; a re-created key of that name is not purged through it
    await store.execute([IndexAdd(key + "index", key + "long", 60_000), Set(key + "short", "3", 60_000)])
    assert await store.execute([IndexPurge(key + "index"), Get(key + "short")]) == [1, "3"]


async def test_ttl_expiry(backend: Backend, store: Store, clock: FakeClock, key: str) -> None:
    await store.execute([Set(key + "short", "v", 100), Set(key + "long", "w", 60_000)])
    assert await store.execute([Get(key + "short")]) == ["v"]
    if backend.remote:
        await asyncio.sleep(0.25)  # the server's own clock expires keys
    else:
        clock.advance(99)
        assert await store.execute([Get(key + "short")]) == ["v"]
        clock.advance(1)
    assert await store.execute([Get(key + "short"), Get(key + "long")]) == [None, "w"]


async def test_mixed_batch_results_in_order(store: Store, key: str) -> None:
    commands = [
        Set(key + "x", "1", 60_000),
        Get(key + "x"),
        Get(key + "missing"),
        RateLimit((limit(key + "rl", FIXED, 2, 10_000),)),
        Delete(key + "x"),
        Get(key + "x"),
        Set(key + "y", "2", 60_000),
        RateLimit((limit(key + "rl", FIXED, 2, 10_000),)),
        Delete(key + "missing"),
        Get(key + "y"),
    ]
    results = await store.execute(commands)
    assert len(results) == len(commands)
    assert results[:3] == [None, "1", None]
    first, second = results[3], results[7]
    assert isinstance(first, RateLimitResult) and isinstance(second, RateLimitResult)
    assert state(first) == (True, 1, 10_000, 0)
    assert state(second) == (True, 0, 10_000, 0)
    assert results[4:7] == [1, None, None]
    assert results[8:] == [0, "2"]


@pytest.mark.parametrize(
    "value",
    ["héllo wörld", "日本語のテキスト", "emoji 🚀🔥 and مرحبا", "quotes \" ' \\ and\nnewlines\r\n", ""],
)
async def test_unicode_values(store: Store, key: str, value: str) -> None:
    name = key + "ключ-🔑"
    await store.execute([Set(name, value, 60_000)])
    assert await store.execute([Get(name)]) == [value]


# -- binary values, locks, counters ---------------------------------------------

ALL_BYTES = bytes(range(256)) * 2 + "välue 🚀".encode()


async def test_binary_values_round_trip(store: Store, key: str) -> None:
    assert await store.execute([Set(key + "b", ALL_BYTES, 60_000)]) == [None]
    assert await store.execute([Get(key + "b", binary=True), Get(key + "none", binary=True)]) == [ALL_BYTES, None]
    text = await store.execute([Get(key + "b")])
    assert text == [ALL_BYTES.decode(errors="replace")]  # a text read replaces what is not UTF-8
    await store.execute([Set(key + "t", "välue 🚀", 60_000)])
    assert await store.execute([Get(key + "t", binary=True), Get(key + "t")]) == ["välue 🚀".encode(), "välue 🚀"]
    await store.execute([Set(key + "ok", b"OK", 60_000), Set(key + "empty", b"", 60_000)])
    assert await store.execute([Get(key + "ok", binary=True), Get(key + "empty", binary=True)]) == [b"OK", b""]


async def test_binary_values_of_several_megabytes(store: Store, key: str) -> None:
    big = os.urandom(3 * 1024 * 1024)
    results = await store.execute([Set(key + "big", big, 60_000), Get(key + "big", binary=True)], timeout=30.0)
    assert results[0] is None and results[1] == big


async def test_set_only_if_absent_is_a_lock(backend: Backend, store: Store, clock: FakeClock, key: str) -> None:
    lock = key + "lock"
    first = await store.execute([Set(lock, "holder-a", 200, only_if_absent=True), Get(lock)])
    assert first == [True, "holder-a"]
    second = await store.execute([Set(lock, "holder-b", 200, only_if_absent=True), Get(lock)])
    assert second == [False, "holder-a"]  # taken: left untouched
    assert await store.execute([Set(lock + "bin", b"\xff\x00", 60_000, only_if_absent=True)]) == [True]
    assert await store.execute([Get(lock + "bin", binary=True)]) == [b"\xff\x00"]
    if backend.remote:
        await asyncio.sleep(0.3)  # the server's own clock expires the lock
    else:
        clock.advance(200)
    assert await store.execute([Set(lock, "holder-b", 200, only_if_absent=True), Get(lock)]) == [True, "holder-b"]


@pytest.mark.parametrize("value", ["token-1", b"\xfe\xff token"], ids=["text", "bytes"])
async def test_compare_and_delete(store: Store, key: str, value: str | bytes) -> None:
    lock = key + "lock"
    await store.execute([Set(lock, value, 60_000)])
    other = "token-2" if isinstance(value, str) else b"\xfe\xff other"
    expected = value.encode() if isinstance(value, str) else value
    assert await store.execute([Delete(lock, if_value=other), Get(lock, binary=True)]) == [0, expected]
    assert await store.execute([Delete(lock, if_value=value), Get(lock)]) == [1, None]
    assert await store.execute([Delete(lock, if_value=value)]) == [0]  # already gone
    await store.execute([Set(lock, "same bytes", 60_000)])
    assert await store.execute([Delete(lock, if_value=b"same bytes")]) == [1]  # text and bytes compare as bytes


async def test_incr_counts_and_sets_the_ttl_on_creation(
    backend: Backend, store: Store, clock: FakeClock, key: str
) -> None:
    counter = key + "n"
    assert await store.execute([Incr(counter, ttl_ms=300), Incr(counter, 5, ttl_ms=60_000)]) == [1, 6]
    assert await store.execute([Incr(counter, -2, ttl_ms=60_000), Get(counter)]) == [4, "4"]
    if backend.remote:
        await asyncio.sleep(0.45)  # the first increment's TTL holds: the later 60 s ones did not extend it
    else:
        clock.advance(300)
    assert await store.execute([Get(counter), Incr(counter, ttl_ms=60_000)]) == [None, 1]
    await store.execute([Set(key + "text", "not a number", 60_000)])
    (refused,) = await store.execute([Incr(key + "text", ttl_ms=60_000)])  # that command's error, not an outage
    assert isinstance(refused, CommandError)


# -- notifications ----------------------------------------------------------------

DELIVERY = 1.0  # seconds: the contract's bound for a message to reach another instance


def inbox() -> tuple[asyncio.Queue[str], Callable[[str], None]]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    return queue, queue.put_nowait


async def test_publish_reaches_subscribers_of_another_instance(backend: Backend, key: str) -> None:
    publisher = backend.make()
    subscriber = publisher if backend.name == "memory" else backend.make()  # memory: one process only
    assert subscriber.notifies
    received, handler = inbox()
    other, other_handler = inbox()
    subscription = await subscriber.subscribe(key + "a", handler)
    await subscriber.subscribe(key + "b", other_handler)
    counts = await publisher.execute([Publish(key + "a", "purge, then\nre-read"), Publish(key + "a", "second")])
    assert await asyncio.wait_for(received.get(), DELIVERY) == "purge, then\nre-read"
    assert await asyncio.wait_for(received.get(), DELIVERY) == "second"
    assert counts == ([None, None] if backend.name in ("postgres", "supabase") else [1, 1])
    await subscription.close()
    await publisher.execute([Publish(key + "a", "after close"), Publish(key + "b", "still here")])
    assert await asyncio.wait_for(other.get(), DELIVERY) == "still here"
    assert received.empty()


async def test_a_failing_handler_is_logged_and_others_still_receive(
    backend: Backend, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = backend.make()
    received, handler = inbox()

    def broken(message: str) -> None:
        raise RuntimeError("handler bug")

    await store.subscribe(key, broken)
    await store.subscribe(key, handler)
    with caplog.at_level(logging.ERROR, logger="edgeway.store"):
        await store.execute([Publish(key, "one"), Publish(key, "two")])
        assert [await asyncio.wait_for(received.get(), DELIVERY) for _ in range(2)] == ["one", "two"]
    assert "handler bug" in caplog.text


@pytest.mark.parametrize("kind", ["redis", "upstash"])
async def test_two_instances_hear_each_other_and_survive_a_restart(
    kind: str, own_redis: RedisServer, bridges: list[UvicornThread], key: str
) -> None:
    """Two store objects on one real redis-server; the subscription recovers after the server restarts."""
    publisher = remote_store(kind, own_redis.url, timeout=2.0, bridges=bridges)
    subscriber = remote_store(kind, own_redis.url, timeout=2.0, bridges=bridges)
    received, handler = inbox()
    try:
        await subscriber.subscribe(key, handler)
        assert await publisher.execute([Publish(key, "before")]) == [1]
        assert await asyncio.wait_for(received.get(), DELIVERY) == "before"
        own_redis.restart()
        # the subscriber reconnects with backoff; publish until it is back (bounded: fails, never hangs)
        deadline = time.monotonic() + 15.0
        while received.empty():
            assert time.monotonic() < deadline, "the subscription did not recover after the restart"
            with contextlib.suppress(StoreError):  # the publisher's own connection is re-established too
                await publisher.execute([Publish(key, "after")])
            await asyncio.sleep(0.1)
        assert received.get_nowait() == "after"
    finally:
        await publisher.close()
        await subscriber.close()


async def test_failover_delivers_messages_published_during_a_fallback(own_redis: RedisServer, key: str) -> None:
    memory = MemoryStore()
    store = FailoverStore(RedisStore(own_redis.url, timeout=0.5), [memory], failures=1, probe_initial=60)
    publisher = RedisStore(own_redis.url, timeout=2.0)
    received, handler = inbox()
    try:
        subscription = await store.subscribe(key, handler)
        assert await store.execute([Publish(key, "via redis"), Incr(key + "n", ttl_ms=60_000)]) == [1, 1]
        assert await asyncio.wait_for(received.get(), DELIVERY) == "via redis"
        assert await publisher.execute([Publish(key, "another instance")]) == [1]
        assert await asyncio.wait_for(received.get(), DELIVERY) == "another instance"
        own_redis.kill()
        await asyncio.sleep(0.05)
        # Redis is gone: the publish and the counter fall back to memory, and this instance still hears it
        results = await store.execute([Publish(key, "via memory"), Incr(key + "n", ttl_ms=60_000)])
        assert results == [1, 1] and store.kind == "memory"
        assert await asyncio.wait_for(received.get(), DELIVERY) == "via memory"
        await subscription.close()
    finally:
        await store.close()
        await publisher.close()


# -- algorithms, each walked on the fake clock against literal expectations ------


async def test_fixed_window_resets_at_the_window_edge(store: Store, clock: FakeClock, key: str) -> None:
    await run_script(store, clock, limit(key, FIXED, 3, 10_000), [
        (0, 1, (True, 2, 10_000, 0)),
        (0, 1, (True, 1, 10_000, 0)),
        (0, 1, (True, 0, 10_000, 0)),
        (0, 1, (False, 0, 10_000, 10_000)),
        (9_999, 1, (False, 0, 1, 1)),
        (1, 1, (True, 2, 10_000, 0)),  # a new window
        (2_500, 1, (True, 1, 7_500, 0)),
    ])


async def test_sliding_window_weighted_carry_over(store: Store, clock: FakeClock, key: str) -> None:
    steps: list[Step] = [(0, 1, (True, 9 - i, 60_000, 0)) for i in range(10)]
    steps += [
        (0, 1, (False, 0, 60_000, 66_000)),  # next window, once 10 * (1 - e) + 1 <= 10: e >= 10 %
        # 25 % into the next window the estimate is 10 * 0.75 + current: exactly 2 more fit
        (75_000, 1, (True, 1, 45_000, 0)),
        (0, 1, (True, 0, 45_000, 0)),
        (0, 1, (False, 0, 45_000, 3_000)),  # 10 * (1 - e) + 2 + 1 <= 10 once e >= 30 %
        (2_999, 1, (False, 0, 42_001, 1)),
        (1, 1, (True, 0, 42_000, 0)),
    ]
    await run_script(store, clock, limit(key, SLIDING, 10, 60_000), steps)


async def test_sliding_log_entries_leave_exactly_one_window_later(
    store: Store, clock: FakeClock, key: str
) -> None:
    await run_script(store, clock, limit(key, LOG, 3, 10_000), [
        (0, 1, (True, 2, 10_000, 0)),
        (1_000, 1, (True, 1, 9_000, 0)),
        (1_000, 1, (True, 0, 8_000, 0)),
        (1_000, 1, (False, 0, 7_000, 7_000)),
        (6_999, 1, (False, 0, 1, 1)),
        (1, 1, (True, 0, 1_000, 0)),  # the T0 entry left at exactly T0 + window
        (0, 1, (False, 0, 1_000, 1_000)),
        (1_000, 1, (True, 0, 1_000, 0)),
    ])


async def test_token_bucket_refill_rate_and_burst(store: Store, clock: FakeClock, key: str) -> None:
    check = limit(key, BUCKET, 10, 10_000, burst=5)  # 1 token per second, at most 5 banked
    burst: list[Step] = [(0, 1, (True, 4 - i, 1_000 * (i + 1), 0)) for i in range(5)]
    await run_script(store, clock, check, [
        *burst,
        (0, 1, (False, 0, 5_000, 1_000)),
        (500, 1, (False, 0, 4_500, 500)),
        (500, 1, (True, 0, 5_000, 0)),  # one token refilled after exactly 1 s
        (60_000, 1, (True, 4, 1_000, 0)),  # a long pause banks only `burst` tokens
        (0, 1, (True, 3, 2_000, 0)),
        (0, 1, (True, 2, 3_000, 0)),
        (0, 1, (True, 1, 4_000, 0)),
        (0, 1, (True, 0, 5_000, 0)),
        (0, 1, (False, 0, 5_000, 1_000)),
    ])


async def test_token_bucket_capacity_defaults_to_quota(store: Store, clock: FakeClock, key: str) -> None:
    steps: list[Step] = [(0, 1, (True, 9 - i, 1_000 * (i + 1), 0)) for i in range(10)]
    steps.append((0, 1, (False, 0, 10_000, 1_000)))
    await run_script(store, clock, limit(key, BUCKET, 10, 10_000), steps)


@pytest.mark.parametrize(
    ("algorithm", "steps"),
    [
        pytest.param(FIXED, [
            (0, 4, (True, 6, 10_000, 0)),
            (0, 4, (True, 2, 10_000, 0)),
            (0, 4, (False, 2, 10_000, 10_000)),
            (0, 2, (True, 0, 10_000, 0)),
            (0, 11, (False, 0, 10_000, 10_000)),
        ], id="fixed-window"),
        pytest.param(SLIDING, [
            (0, 6, (True, 4, 60_000, 0)),
            (0, 6, (False, 4, 60_000, 80_000)),  # next window, once 6 * (1 - e) + 6 <= 10
            (0, 11, (False, 4, 60_000, 60_000)),  # more than the quota: one whole window
            (0, 4, (True, 0, 60_000, 0)),
        ], id="sliding-window"),
        pytest.param(LOG, [
            (0, 3, (True, 7, 10_000, 0)),
            (1_000, 6, (True, 1, 9_000, 0)),
            (1_000, 3, (False, 1, 8_000, 8_000)),  # needs 2 of the 3 T0 entries gone
            (0, 11, (False, 1, 8_000, 10_000)),
            (8_000, 3, (True, 1, 1_000, 0)),
        ], id="sliding-log"),
        pytest.param(BUCKET, [
            (0, 7, (True, 3, 7_000, 0)),
            (0, 7, (False, 3, 7_000, 4_000)),
            (0, 11, (False, 3, 7_000, 10_000)),
            (4_000, 7, (True, 0, 10_000, 0)),
        ], id="token-bucket"),
    ],
)
async def test_cost_above_one(
    store: Store, clock: FakeClock, key: str, algorithm: Algorithm, steps: list[Step]
) -> None:
    window = 60_000 if algorithm is SLIDING else 10_000
    await run_script(store, clock, limit(key, algorithm, 10, window), steps)


@pytest.mark.parametrize("algorithm", list(Algorithm), ids=[a.value for a in Algorithm])
async def test_rejection_by_one_limit_charges_none(store: Store, key: str, algorithm: Algorithm) -> None:
    wide = limit(key + "wide", algorithm, 5, 10_000)
    narrow = limit(key + "narrow", FIXED, 2, 10_000)
    for remaining in (1, 0):
        result = await hit(store, wide, narrow)
        assert result.allowed
        assert state(result, 1)[:2] == (True, remaining)
    assert result.states[0].remaining == 3
    rejected = await hit(store, wide, narrow)
    assert not rejected.allowed
    assert rejected.states[0].allowed and rejected.states[0].remaining == 3  # would pass, not charged
    assert state(rejected, 1) == (False, 0, 10_000, 10_000)
    alone = await hit(store, wide)
    assert alone.allowed and alone.states[0].remaining == 2  # the rejected request left no trace


async def test_shadow_limits_report_but_never_reject(store: Store, key: str) -> None:
    shadow = limit(key + "shadow", FIXED, 1, 10_000, enforced=False)
    enforced = limit(key + "enforced", FIXED, 3, 10_000)
    first = await hit(store, shadow, enforced)
    assert first.allowed and state(first, 0) == (True, 0, 10_000, 0)
    for remaining in (1, 0):
        result = await hit(store, shadow, enforced)
        assert result.allowed, "a shadow limit must never reject"
        assert state(result, 0) == (False, 0, 10_000, 10_000)
        assert state(result, 1) == (True, remaining, 10_000, 0)
    blocked = await hit(store, shadow, enforced)
    assert not blocked.allowed and state(blocked, 1) == (False, 0, 10_000, 10_000)
    only_shadow = await hit(store, limit(key + "alone", LOG, 1, 10_000, enforced=False))
    assert only_shadow.allowed
    again = await hit(store, limit(key + "alone", LOG, 1, 10_000, enforced=False))
    assert again.allowed and not again.states[0].allowed


async def test_revocations_by_time_and_the_rate_limit_guard(store: Store, key: str) -> None:
    """A session is revoked when one of its keys holds a time after its iat; a guarded limit then charges nothing."""
    user, token = key + "rv:u", key + "rv:t"
    check = limit(key + "rl", FIXED, 5, 60_000)
    before, after = T0_MS - 10_000, T0_MS + 10_000
    assert await store.execute([Revoked((user, token), before)]) == [False]
    assert await store.execute([Revoke(user, T0_MS, 3_600_000)]) == [None]
    results = await store.execute([
        Revoked((token, user), before),
        Revoked((token, user), after),
        RateLimit((check,), guard=Revoked((token, user), before)),
        RateLimit((check,), guard=Revoked((token, user), after)),
    ])
    assert results[:2] == [True, False]
    assert results[2] == RateLimitResult(False, (), revoked=True)
    assert isinstance(results[3], RateLimitResult) and results[3].allowed and not results[3].revoked
    assert state(results[3]) == (True, 4, 60_000, 0)  # the guarded, revoked request above was not charged



async def test_a_revocation_check_and_the_limit_carrying_it_as_guard_in_one_batch(store: Store, key: str) -> None:
    """The batch a session and a rate limit send together: the check, and a limit with the same check as its
    guard. Redis answers the check from the script (no MGET of its own); every backend answers alike."""
    user, token = key + "rv:u", key + "rv:t"
    check = Revoked((token, user), T0_MS - 10_000)
    limited = RateLimit((limit(key + "rl", FIXED, 5, 60_000),), guard=check)
    answered = await store.execute([check, limited])
    assert answered[0] is False and state(answered[1]) == (True, 4, 60_000, 0)
    await store.execute([Revoke(user, T0_MS, 3_600_000)])
    assert await store.execute([check, limited]) == [True, RateLimitResult(False, (), revoked=True)]


@remote_only
async def test_a_refused_carrier_leaves_the_revocation_check_answered(store: Store, key: str) -> None:
    """When the store refuses the limit that carries the check, the check is read on its own after all."""
    user, token = key + "rv:u", key + "rv:t"
    check = Revoked((token, user), T0_MS - 10_000)
    refused = RateLimit((limit(key + "bad", FIXED, 0, 60_000),), guard=check)  # quota 0: the script refuses it
    answered = await store.execute([check, refused])
    assert answered[0] is False and isinstance(answered[1], CommandError)
    await store.execute([Revoke(token, T0_MS, 3_600_000)])
    answered = await store.execute([check, refused])
    assert answered[0] is True and isinstance(answered[1], CommandError)


async def test_all_algorithms_in_one_request(store: Store, clock: FakeClock, key: str) -> None:
    """One scripted run over every algorithm at once: the literal answers every backend must give."""
    checks = (
        limit(key + "f", FIXED, 4, 10_000),
        limit(key + "s", SLIDING, 4, 10_000),
        limit(key + "l", LOG, 4, 10_000),
        limit(key + "b", BUCKET, 10, 10_000, burst=3),  # 1 token/s, 3 banked
    )
    script: list[tuple[int, bool, list[tuple[bool, int, int, int]]]] = [
        # (advance ms, allowed, [fixed, sliding, log, bucket] as (allowed, remaining, reset, retry))
        (0, True, [(True, 3, 10_000, 0), (True, 3, 10_000, 0), (True, 3, 10_000, 0), (True, 2, 1_000, 0)]),
        (0, True, [(True, 2, 10_000, 0), (True, 2, 10_000, 0), (True, 2, 10_000, 0), (True, 1, 2_000, 0)]),
        (0, True, [(True, 1, 10_000, 0), (True, 1, 10_000, 0), (True, 1, 10_000, 0), (True, 0, 3_000, 0)]),
        # the bucket is empty: rejected, and nothing is charged anywhere
        (0, False, [(True, 1, 10_000, 0), (True, 1, 10_000, 0), (True, 1, 10_000, 0),
                    (False, 0, 3_000, 1_000)]),
        (1_000, True, [(True, 0, 9_000, 0), (True, 0, 9_000, 0), (True, 0, 9_000, 0), (True, 0, 3_000, 0)]),
        # windows full; sliding window waits for the next window's 25 % mark (4 * 0.75 + 1 <= 4)
        (1_000, False, [(False, 0, 8_000, 8_000), (False, 0, 8_000, 10_500), (False, 0, 8_000, 8_000),
                        (True, 1, 2_000, 0)]),
        # a new fixed window, but the sliding estimate still carries all 4 of the last one
        (8_000, False, [(True, 4, 10_000, 0), (False, 0, 10_000, 2_500), (True, 3, 1_000, 0),
                        (True, 3, 0, 0)]),
        (2_500, True, [(True, 3, 7_500, 0), (True, 0, 7_500, 0), (True, 3, 10_000, 0), (True, 2, 1_000, 0)]),
    ]
    for number, (advance, allowed, expected) in enumerate(script):
        clock.advance(advance)
        result = await hit(store, *checks)
        assert (result.allowed, [state(result, i) for i in range(4)]) == (allowed, expected), f"step {number}"


async def test_server_clock_when_no_clock_is_given(backend: Backend, key: str) -> None:
    store = backend.make()
    check = RateLimit((limit(key, LOG, 2, 60_000),))
    results = await store.execute([check, check, check])
    assert [r.allowed for r in results] == [True, True, False]  # type: ignore[attr-defined]
    rejected = results[2].states[0]  # type: ignore[attr-defined]
    assert 55_000 < rejected.retry_after_ms <= 60_000
    assert 55_000 < rejected.reset_ms <= 60_000


# -- remote backends: concurrency, script cache, failures ------------------------


@pytest.mark.parametrize("backend", SHARED, indirect=True)
@pytest.mark.parametrize("algorithm", list(Algorithm), ids=[a.value for a in Algorithm])
async def test_concurrent_requests_never_exceed_the_quota(
    backend: Backend, clock: FakeClock, key: str, algorithm: Algorithm
) -> None:
    stores = [backend.make(clock=clock) for _ in range(3)]  # three clients, three connections
    command = [RateLimit((limit(key, algorithm, 100, 60_000),))]
    results = await asyncio.gather(*(stores[i % 3].execute(command) for i in range(300)))
    allowed = sum(1 for (result,) in results if result.allowed)  # type: ignore[attr-defined]
    if algorithm is SLIDING:
        assert 0 < allowed <= 100
    else:
        assert allowed == 100


@remote_only
async def test_script_cache_flush_is_recovered(backend: Backend, store: Store, key: str) -> None:
    check = limit(key, FIXED, 5, 10_000)
    assert (await hit(store, check)).states[0].remaining == 4
    client = aioredis.Redis.from_url(backend.url)  # type: ignore[arg-type]
    try:
        await client.script_flush()
    finally:
        await client.aclose()
    assert (await hit(store, check)).states[0].remaining == 3  # NOSCRIPT, then EVAL with the source


@pytest.fixture
def own_redis() -> AsyncIterator[RedisServer]:
    """A redis-server for one test, free to pause, restart or kill."""
    with RedisServer() as server:
        yield server  # type: ignore[misc]


def remote_store(kind: str, redis_url: str, *, timeout: float, bridges: list[UvicornThread]) -> Store:
    if kind == "redis":
        return RedisStore(redis_url, timeout=timeout)
    bridge = UvicornThread(_bridge_app(redis_url)).start()
    bridges.append(bridge)
    return UpstashStore(bridge.url, token=BRIDGE_TOKEN, timeout=timeout)


def _bridge_app(redis_url: str) -> object:
    from edgeway.gateway.upstash_bridge import create_bridge_app

    return create_bridge_app(redis_url, BRIDGE_TOKEN)


@pytest.fixture
def bridges() -> AsyncIterator[list[UvicornThread]]:
    started: list[UvicornThread] = []
    yield started  # type: ignore[misc]
    for bridge in started:
        bridge.stop(grace=0.5)


@pytest.mark.parametrize("kind", ["redis", "upstash"])
async def test_paused_server_times_out(
    kind: str, own_redis: RedisServer, bridges: list[UvicornThread], key: str
) -> None:
    store = remote_store(kind, own_redis.url, timeout=0.2, bridges=bridges)
    try:
        await store.execute([Set(key, "v", 60_000)])  # connected
        own_redis.pause()
        started = time.monotonic()
        with pytest.raises(StoreTimeout):
            await store.execute([Get(key)])
        assert time.monotonic() - started < 1.0
        own_redis.resume()
        assert await store.execute([Get(key)], timeout=5.0) == ["v"]
    finally:
        if own_redis.paused:
            own_redis.resume()
        await store.close()


@pytest.mark.parametrize("kind", ["redis", "upstash"])
async def test_unreachable_server_is_a_store_error(kind: str, key: str) -> None:
    port = free_port()
    if kind == "redis":
        store: Store = RedisStore(f"redis://127.0.0.1:{port}", timeout=2.0)
    else:
        store = UpstashStore(f"http://127.0.0.1:{port}", token=BRIDGE_TOKEN, timeout=2.0)
    try:
        with pytest.raises(StoreError) as caught:
            await store.execute([Get(key)])
        assert not isinstance(caught.value, StoreTimeout)
        with pytest.raises(StoreError):
            await store.ping()
    finally:
        await store.close()


@pytest.mark.parametrize("kind", ["redis", "upstash"])
async def test_reconnects_after_the_server_restarts(
    kind: str, own_redis: RedisServer, bridges: list[UvicornThread], key: str
) -> None:
    store = remote_store(kind, own_redis.url, timeout=2.0, bridges=bridges)
    check = limit(key + "rl", FIXED, 5, 10_000)
    try:
        await store.execute([Set(key, "before", 60_000), RateLimit((check,))])
        own_redis.restart()  # empty, script cache gone, old connections closed
        await asyncio.sleep(0.05)
        results = await store.execute([Get(key), Set(key, "after", 60_000), Get(key), RateLimit((check,))])
        assert results[:3] == [None, None, "after"]
        assert results[3].allowed and results[3].states[0].remaining == 4  # type: ignore[attr-defined]
    finally:
        await store.close()


async def test_killed_server_fails_fast_then_recovers(own_redis: RedisServer, key: str) -> None:
    store = RedisStore(own_redis.url, timeout=2.0)
    try:
        await store.execute([Set(key, "v", 60_000)])
        own_redis.kill()
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(StoreError):
            await store.execute([Get(key)])
        assert time.monotonic() - started < 1.0
        own_redis.start()
        assert await store.execute([Get(key)]) == [None]
    finally:
        await store.close()


# -- circuit breakers: the same state machine on every backend ---------------------

RULE = BreakerRule(failures=3, rate_bp=0, window_ms=10_000, min_requests=20, open_ms=60_000, max_open_ms=150_000,
                   success_threshold=2, probe_ms=5_000)
RATE_RULE = RULE._replace(failures=0, rate_bp=5_000, min_requests=4)
FAIL, OK = BreakerEvent(failures=1), BreakerEvent(successes=1)
ACQUIRE = BreakerEvent(acquire=True)
PROBE_OK, PROBE_FAIL = BreakerEvent(successes=1, probe=True), BreakerEvent(failures=1, probe=True)
BreakerStep = tuple[int, BreakerEvent, tuple[int, int, int, bool, int, int]]
"""(advance ms, event, expected (phase, remaining_ms, failures, granted, reason, streak))."""

BREAKER_SCENARIOS: dict[str, tuple[BreakerRule, list[BreakerStep]]] = {
    "a success between failures resets the count": (RULE, [
        (0, FAIL, (0, 0, 1, True, 0, 0)), (0, FAIL, (0, 0, 2, True, 0, 0)), (0, OK, (0, 0, 0, True, 0, 0)),
        (0, FAIL, (0, 0, 1, True, 0, 0)), (0, FAIL, (0, 0, 2, True, 0, 0)),
        (0, FAIL, (1, 60_000, 0, False, 1, 1)),
    ]),
    "open, one probe, failed probe reopens longer (jitter off the top)": (RULE, [
        (0, BreakerEvent(failures=3), (1, 60_000, 0, False, 1, 1)),
        (1_000, ACQUIRE, (1, 59_000, 0, False, 0, 1)),
        (59_000, ACQUIRE, (2, 5_000, 0, True, 6, 1)),
        (10, ACQUIRE, (2, 4_990, 0, False, 0, 1)),
        (0, FAIL, (2, 4_990, 0, False, 0, 1)),  # not the probe: ignored
        (0, BreakerEvent(failures=1, probe=True, jitter=100), (1, 108_000, 0, False, 3, 2)),
        (108_000, ACQUIRE, (2, 5_000, 0, True, 6, 2)),
        (0, PROBE_FAIL, (1, 150_000, 0, False, 3, 3)),  # capped at max_open_ms
    ]),
    "success threshold: probes one at a time until it closes": (RULE, [
        (0, BreakerEvent(failures=3), (1, 60_000, 0, False, 1, 1)),
        (60_000, ACQUIRE, (2, 5_000, 0, True, 6, 1)),
        (100, PROBE_OK, (2, 0, 0, False, 0, 1)),
        (0, ACQUIRE, (2, 5_000, 0, True, 0, 1)),
        (0, PROBE_OK, (0, 0, 0, True, 4, 0)),
    ]),
    "a lost probe token expires; a probe that says nothing hands it back": (RULE, [
        (0, BreakerEvent(failures=3), (1, 60_000, 0, False, 1, 1)),
        (60_000, ACQUIRE, (2, 5_000, 0, True, 6, 1)),
        (5_000, ACQUIRE, (2, 5_000, 0, True, 0, 1)),
        (1_000, BreakerEvent(probe=True), (2, 0, 0, False, 0, 1)),
        (0, ACQUIRE, (2, 5_000, 0, True, 0, 1)),
    ]),
    "reset closes; a seed only fills an empty key": (RULE, [
        (0, BreakerEvent(seed_phase=1, seed_remaining_ms=7_000, seed_streak=2), (1, 7_000, 0, False, 0, 2)),
        (0, BreakerEvent(seed_phase=0), (1, 7_000, 0, False, 0, 2)),
        (0, BreakerEvent(reset=True), (0, 0, 0, True, 5, 0)),
        (0, BreakerEvent(seed_phase=1, seed_remaining_ms=9_000, seed_streak=1), (0, 0, 0, True, 0, 0)),
    ]),
    "failure rate trips only past min_requests, over the sliding window": (RATE_RULE, [
        (0, FAIL, (0, 0, 1, True, 0, 0)), (0, FAIL, (0, 0, 2, True, 0, 0)), (0, FAIL, (0, 0, 3, True, 0, 0)),
        (10_000, BreakerEvent(successes=3), (0, 0, 0, True, 0, 0)),
        # previous window 3/3 weighted 1/2 + this one 1/4: 2.5 of 5.5 requests failed, under 50%
        (5_000, FAIL, (0, 0, 1, True, 0, 0)),
        (0, FAIL, (1, 60_000, 0, False, 2, 1)),  # 3.5 of 6.5: over
    ]),
}


@pytest.mark.parametrize("scenario", list(BREAKER_SCENARIOS))
async def test_breaker_scenarios_match_the_reference(store: Store, clock: FakeClock, key: str,
                                                     scenario: str) -> None:
    rule, steps = BREAKER_SCENARIOS[scenario]
    reference: BreakerState | None = None
    for number, (advance, event, expected) in enumerate(steps):
        clock.advance(advance)
        (result,) = await store.execute([BreakerUpdate(key + "br", rule, event)])
        reference, want = breaker_apply(reference, rule, event, clock.ms)
        assert result == BreakerResult(*expected), f"step {number}"
        assert result == want, f"step {number}: the reference disagrees"


# PostgreSQL keeps breakers in a table of their own: no key there can hold another type
@pytest.mark.parametrize("backend", ["memory", *REMOTE], indirect=True)
async def test_breaker_key_of_another_type_is_that_commands_error(backend: Backend, store: Store, key: str) -> None:
    if backend.url is not None:
        client = aioredis.from_url(backend.url)
        await client.rpush(key + "br", "x")
        await client.aclose()
    else:
        await store.execute([Set(key + "br", "not a breaker", 60_000)])
    (result,) = await store.execute([BreakerUpdate(key + "br", RULE, FAIL)])
    assert isinstance(result, CommandError)


@pytest.mark.parametrize("backend", SHARED, indirect=True)
async def test_exactly_one_probe_among_concurrent_callers(backend: Backend, key: str) -> None:
    stores = [backend.make() for _ in range(5)]
    await stores[0].execute([BreakerUpdate(key + "br", RULE._replace(open_ms=1, max_open_ms=1),
                                           BreakerEvent(failures=3))])
    await asyncio.sleep(0.01)
    results = await asyncio.gather(*(
        s.execute([BreakerUpdate(key + "br", RULE, ACQUIRE)]) for s in stores for _ in range(10)
    ))
    granted = [r for (r,) in results if isinstance(r, BreakerResult) and r.granted]
    assert len(granted) == 1
# -- regressions of issue 8 (over-admission) ---------------------------------------------


async def test_bucket_debt_outlives_the_full_refill_time(backend: Backend, store: Store, clock: FakeClock,
                                                        key: str) -> None:
    """A 10/second bucket debited 500 tokens stays empty ~49 s, not until its 2 s full-refill TTL."""
    bucket = limit(key + "b", BUCKET, 10, 1_000)
    assert (await hit(store, bucket)).allowed
    debit = await hit(store, bucket._replace(cost=500, enforced=False))  # a shadow / cost_from debit
    assert debit.allowed and debit.states[0].reset_ms == 50_100  # -491 tokens, 10 per second: full in 50.1 s
    clock.advance(2_100)
    results = [await hit(store, bucket) for _ in range(10)]
    assert [r.allowed for r in results] == [False] * 10
    assert results[0].states[0].retry_after_ms == 47_100  # -470 now: one token in 47.1 s
    if backend.url is not None:  # Redis keeps TTLs on its own clock: the key must live until refilled
        client = aioredis.Redis.from_url(backend.url)
        try:
            assert await client.pttl(key + "b") > 49_000
        finally:
            await client.aclose()
    clock.advance(47_000)  # -470 + 470: exactly 0 tokens, still short of one
    assert not (await hit(store, bucket)).allowed
    clock.advance(100)
    assert (await hit(store, bucket)).allowed


@pytest.mark.parametrize(("quota", "window_ms", "burst", "cost"), [
    (7, 3_000, 4, 3), (3, 7_000, 0, 1), (10, 1_000, 0, 1), (13, 60_000, 5, 2), (1, 1_000, 0, 1), (97, 3_600_000, 0, 5),
])
async def test_bucket_retry_after_is_never_early(store: Store, clock: FakeClock, key: str, quota: int,
                                                 window_ms: int, burst: int, cost: int) -> None:
    """Waiting exactly retry_after always admits the same request, and one ms less never does."""
    bucket = limit(key, BUCKET, quota, window_ms, burst=burst, cost=cost)
    for step in range(40):
        clock.advance((step * 7919) % 1_237)
        result = await hit(store, bucket)
        if result.allowed:
            continue
        retry = result.states[0].retry_after_ms
        if retry > 1:
            clock.advance(retry - 1)
            assert not (await hit(store, bucket)).allowed, f"step {step}: admitted before retry_after"
            clock.advance(1)
        else:
            clock.advance(retry)
        assert (await hit(store, bucket)).allowed, f"step {step}: still refused at now + retry_after"


async def test_sliding_log_takes_large_costs(store: Store, key: str) -> None:
    """cost >= 4000 once broke the script (too many results to unpack) after charging earlier limits."""
    fixed = limit(key + "f", FIXED, 100_000, 60_000)
    log = limit(key + "l", LOG, 100_000, 60_000)
    result = await hit(store, fixed._replace(cost=5_000), log._replace(cost=5_000))
    assert result.allowed and [s.remaining for s in result.states] == [95_000, 95_000]
    again = await hit(store, fixed._replace(cost=1), log._replace(cost=90_000))
    assert again.allowed and [s.remaining for s in again.states] == [94_999, 5_000]


async def test_a_bad_limit_is_the_commands_error_and_charges_nothing(store: Store, key: str) -> None:
    good = limit(key + "good", FIXED, 5, 10_000)
    bad = limit(key + "bad", LOG, 0, 10_000)  # quota 0: refused before anything is charged
    results = await store.execute([RateLimit((good, bad)), Set(key + "x", "1", 10_000)])
    assert isinstance(results[0], CommandError)
    after = await hit(store, good)
    assert after.states[0].remaining == 4  # the first request left no trace


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
async def test_wrongtype_is_the_commands_error_and_charges_nothing(backend: Backend, store: Store,
                                                                   key: str) -> None:
    client = aioredis.Redis.from_url(backend.url)  # type: ignore[arg-type]
    try:
        await client.set(key + "bucket", "not a hash", px=60_000)
    finally:
        await client.aclose()
    fixed = limit(key + "f", FIXED, 5, 10_000)
    results = await store.execute([RateLimit((fixed, limit(key + "bucket", BUCKET, 5, 10_000))), Get(key + "x")])
    assert isinstance(results[0], CommandError) and "WRONGTYPE" in str(results[0])
    assert results[1] is None  # the rest of the batch keeps its results
    assert (await hit(store, fixed)).states[0].remaining == 4


async def test_sliding_window_guarantee_as_documented(store: Store, clock: FakeClock, key: str) -> None:
    """At most the quota per aligned window; up to about 2x (never more) in an unaligned window-long span."""
    check = limit(key, SLIDING, 10, 1_000)
    clock.advance(999)
    burst = [(await hit(store, check)).allowed for _ in range(10)]
    assert burst == [True] * 10  # all at 999 ms, the end of window 0
    admitted = [clock.ms] * 10
    for _ in range(100):  # then one attempt every 10 ms as the previous window's weight fades
        clock.advance(10)
        if (await hit(store, check)).allowed:
            admitted.append(clock.ms)
    spans = [sum(1 for t in admitted if start <= t < start + 1_000) for start in admitted]
    assert max(spans) == 19  # the known worst case of the weighted estimate: under 2x, well over 1x
    per_window: dict[int, int] = {}
    for t in admitted:
        per_window[t // 1_000] = per_window.get(t // 1_000, 0) + 1
    assert max(per_window.values()) <= 10


async def test_postgres_listener_survives_a_restart(key: str) -> None:
    """LISTEN on a private PostgreSQL that is stopped and started again: the listener reconnects."""
    from tests.servers import PostgresServer, apply_migration

    with PostgresServer() as server:
        apply_migration(server.dsn)
        publisher = PostgresStore(server.dsn, timeout=2.0)
        subscriber = PostgresStore(server.dsn, timeout=2.0)
        received, handler = inbox()
        try:
            await subscriber.subscribe(key, handler)
            await publisher.execute([Publish(key, "before")])
            assert await asyncio.wait_for(received.get(), DELIVERY) == "before"
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(server.start)
            deadline = time.monotonic() + 20.0
            while received.empty():
                assert time.monotonic() < deadline, "the listener did not recover after the restart"
                with contextlib.suppress(StoreError):  # the publisher's pool reconnects too
                    await publisher.execute([Publish(key, "after")])
                await asyncio.sleep(0.1)
            assert received.get_nowait() == "after"
        finally:
            await publisher.close()
            await subscriber.close()


# -- closing a store closes its subscriptions ---------------------------------------

CLOSE_BOUND = 5.0  # seconds: a bound that proves "never hangs", not a speed target


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, object]]]:
    """What reaches the loop's exception handler ("Task was destroyed but it is pending", "never retrieved")."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    yield seen
    gc.collect()  # a pending task dropped by a closed store is reported when it is collected
    loop.set_exception_handler(previous)


async def close_within_bound(store: Store) -> None:
    """Close ``store``; fails (never hangs) unless it has ended within CLOSE_BOUND."""
    closing = asyncio.ensure_future(store.close())
    done, _ = await asyncio.wait((closing,), timeout=CLOSE_BOUND)
    if not done:
        closing.cancel()
        pytest.fail(f"{store.describe()}: close() did not end within {CLOSE_BOUND} s")
    closing.result()


def left_running(before: set[asyncio.Task[Any]]) -> list[str]:
    return [repr(task.get_coro()) for task in asyncio.all_tasks() - before
            if task is not asyncio.current_task() and not task.done()]


async def test_closing_the_store_ends_its_subscriptions(backend: Backend, key: str) -> None:
    before = asyncio.all_tasks()
    store = backend.make()
    old, old_handler = inbox()
    first = await store.subscribe(key, old_handler)
    await store.subscribe(key + "b", old_handler)
    await close_within_bound(store)  # the subscriptions are still open
    assert left_running(before) == []
    await first.close()  # already ended with the store: nothing to do, nothing restarted
    assert left_running(before) == []
    # the store may be used again; what was subscribed before the close hears nothing
    new, new_handler = inbox()
    await store.subscribe(key, new_handler)
    publisher = store if backend.name == "memory" else backend.make()
    await publisher.execute([Publish(key + "b", "to the ended one"), Publish(key, "after the close")])
    assert await asyncio.wait_for(new.get(), DELIVERY) == "after the close"  # published after the other
    assert old.empty()


STOPPED = ["alive", "killed", "unreachable"]
CHAINS = ["redis", "upstash", "redis+memory", "redis+postgres"]


@pytest.mark.parametrize("state", STOPPED)
@pytest.mark.parametrize("chain", CHAINS)
async def test_closing_a_store_with_a_live_subscription_ends_promptly(
    chain: str, state: str, own_redis: RedisServer, bridges: list[UvicornThread], key: str,
    request: pytest.FixtureRequest, loop_errors: list[dict[str, object]],
) -> None:
    """Subscribed, then closed without closing the subscription, while Redis is up, killed, or never was."""
    before = asyncio.all_tasks()
    url = own_redis.url if state != "unreachable" else f"redis://127.0.0.1:{free_port()}"
    primary = remote_store("upstash" if chain == "upstash" else "redis", url, timeout=0.5, bridges=bridges)
    store = primary
    if chain == "redis+memory":
        store = FailoverStore(primary, [MemoryStore()], failures=1, probe_initial=0.05)
    elif chain == "redis+postgres":
        fallback = PostgresStore(request.getfixturevalue("postgres_dsn"), timeout=2.0)
        store = FailoverStore(primary, [fallback, MemoryStore()], failures=1, probe_initial=0.05)
    received, handler = inbox()
    await store.subscribe(key, handler)
    if state == "killed":
        own_redis.kill()
    with contextlib.suppress(StoreError):  # a failover store answers from its fallback; Redis alone fails
        await store.execute([Publish(key, "one"), Incr(key + "n", ttl_ms=60_000)])
    if state == "alive":
        assert await asyncio.wait_for(received.get(), DELIVERY) == "one"
    else:
        await asyncio.sleep(0.2)  # the listener is reconnecting with backoff, probes are running
    await close_within_bound(store)
    assert left_running(before) == []
    gc.collect()
    assert [context.get("message") for context in loop_errors] == []


async def test_close_while_a_subscribe_is_connecting_never_hangs(redis_url: str, key: str) -> None:
    """close() lands at every point of the subscriber's connect, also as it completes.

    On Python 3.11 ``asyncio.wait_for`` returns the result of an awaited connect when
    the cancellation lands just as it completes; the listener then lived on and close()
    waited for it forever.
    """
    before = asyncio.all_tasks()
    for turns in range(40):
        store = RedisStore(redis_url, timeout=2.0)
        subscribing = asyncio.ensure_future(store.subscribe(key, lambda message: None))
        for _ in range(turns):
            await asyncio.sleep(0)
        await close_within_bound(store)
        await asyncio.wait_for(subscribing, CLOSE_BOUND)
        assert left_running(before) == [], f"after {turns} loop turns"


async def test_stop_repeats_a_cancellation_that_was_swallowed() -> None:
    swallowed = asyncio.Event()

    async def listener() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()  # as 3.11's wait_for does when the awaited connect completes with the cancellation
        await asyncio.sleep(3600)

    task = asyncio.ensure_future(listener())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop(task, "a listener"), CLOSE_BOUND)
    assert swallowed.is_set() and task.cancelled()
