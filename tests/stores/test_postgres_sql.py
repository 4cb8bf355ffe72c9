"""The SQL of supabase/migrations/20261122000000_edgeway.sql, called directly.

Security (SECURITY DEFINER, fixed search_path, EXECUTE for service_role only),
cleanup(), window and TTL boundaries with an explicit ``now_ms``, input
validation, idempotent re-application, deadlock freedom, and a random walk that
must give the same answers as the Lua script in a real Redis (and MemoryStore).
Heartbeats are checked the same way. The module works in a database of its own, so cleanup() sees only its rows.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncpg
import pytest

from edgeway.middleware.store import (
    Algorithm,
    Delete,
    Get,
    Heartbeat,
    LimitCheck,
    RateLimit,
    RateLimitResult,
    Set,
    Store,
    StoreError,
)
from edgeway.middleware.store.memory import MemoryStore
from edgeway.middleware.store.postgres import PostgresStore
from edgeway.middleware.store.redis import RedisStore
from tests.servers import MIGRATION_PATH, apply_migration

T0 = 1_700_000_040_000  # a multiple of 60 s
FUNCTIONS = ["edgeway.batch(jsonb,bigint)", "edgeway.cleanup(bigint)", "public.edgeway_batch(jsonb,bigint)"]


def _admin(dsn: str, *statements: str) -> None:
    async def run() -> None:
        connection = await asyncpg.connect(dsn)
        try:
            for statement in statements:
                await connection.execute(statement)
        finally:
            await connection.close()

    with ThreadPoolExecutor(1) as pool:  # outside any running event loop
        pool.submit(asyncio.run, run()).result(timeout=60)


def _database(dsn: str, name: str) -> str:
    return dsn.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="module")
def dsn(postgres_dsn: str) -> Iterator[str]:
    name = f"edgeway_sql_{uuid.uuid4().hex[:8]}"
    _admin(postgres_dsn, f"create database {name}")
    apply_migration(_database(postgres_dsn, name))
    yield _database(postgres_dsn, name)
    _admin(postgres_dsn, f"drop database {name} with (force)")


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(dsn)
    await connection.execute("truncate edgeway.entries, edgeway.log_entries, edgeway.heartbeats")
    yield connection
    await connection.close()


async def batch(db: asyncpg.Connection, commands: list[dict[str, Any]], now_ms: int | None) -> list[Any]:
    result = await db.fetchval("select edgeway.batch($1::jsonb, $2)::text", json.dumps(commands), now_ms)
    decoded: list[Any] = json.loads(result)
    return decoded


def rl(key: str, algorithm: str, quota: int, window_ms: int, cost: int = 1, burst: int = 0) -> dict[str, Any]:
    check = {"key": key, "algorithm": algorithm, "quota": quota, "window_ms": window_ms, "cost": cost,
             "burst": burst, "enforced": True}
    return {"op": "ratelimit", "checks": [check]}


# -- security ----------------------------------------------------------------------


async def test_functions_are_security_definer_with_a_fixed_search_path(db: asyncpg.Connection) -> None:
    for signature in FUNCTIONS:
        row = await db.fetchrow("select prosecdef, proconfig from pg_proc where oid = $1::regprocedure", signature)
        assert row["prosecdef"], signature
        assert row["proconfig"] == ["search_path=edgeway, pg_catalog, pg_temp"], signature


async def test_public_cannot_execute_nor_read(db: asyncpg.Connection) -> None:
    await db.execute("do $$ begin if not exists (select from pg_roles where rolname = 'edgeway_nobody') "
                     "then create role edgeway_nobody nologin; end if; end $$")
    for signature in FUNCTIONS:
        assert not await db.fetchval("select has_function_privilege('public', $1, 'execute')", signature)
        assert not await db.fetchval("select has_function_privilege('edgeway_nobody', $1, 'execute')", signature)
    async with db.transaction():
        await db.execute("set local role edgeway_nobody")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await db.fetchval("select public.edgeway_batch('[]'::jsonb)")
    async with db.transaction():
        await db.execute("set local role edgeway_nobody")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await db.fetchval("select count(*) from edgeway.entries")


async def test_service_role_executes_but_cannot_touch_the_tables(db: asyncpg.Connection) -> None:
    async with db.transaction():
        await db.execute("set local role service_role")
        assert await db.fetchval("select edgeway.batch($1::jsonb, $2)::text", '[{"op":"get","key":"k"}]', T0) \
            == "[null]"
        assert await db.fetchval("select public.edgeway_batch('[]'::jsonb)::text") == "[]"
        assert await db.fetchval("select edgeway.cleanup()") == 0
    for table in ("edgeway.entries", "edgeway.log_entries", "edgeway.heartbeats"):
        async with db.transaction():
            await db.execute("set local role service_role")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await db.fetchval(f"select count(*) from {table}")


async def test_supabase_roles_lose_the_default_grants(postgres_dsn: str) -> None:
    """Supabase grants new functions in public to anon and authenticated by default; the migration revokes."""
    name = f"edgeway_roles_{uuid.uuid4().hex[:8]}"
    roles = ("anon", "authenticated")
    setup = [f"do $$ begin if not exists (select from pg_roles where rolname = '{role}') "
             f"then create role {role} nologin; end if; end $$" for role in roles]
    await asyncio.to_thread(_admin, postgres_dsn, *setup, f"create database {name}")
    try:
        dsn = _database(postgres_dsn, name)
        await asyncio.to_thread(
            _admin, dsn, "alter default privileges in schema public grant execute on functions to anon, authenticated"
        )
        await asyncio.to_thread(apply_migration, dsn)
        connection = await asyncpg.connect(dsn)
        try:
            for signature in FUNCTIONS:
                for role in roles:
                    assert not await connection.fetchval(
                        "select has_function_privilege($1, $2, 'execute')", role, signature
                    ), (role, signature)
                assert await connection.fetchval("select has_function_privilege('service_role', $1, 'execute')",
                                                 signature)
        finally:
            await connection.close()
    finally:
        await asyncio.to_thread(_admin, postgres_dsn, f"drop database {name} with (force)")


async def test_a_temp_table_cannot_shadow_the_state(db: asyncpg.Connection) -> None:
    await batch(db, [{"op": "set", "key": "k", "value": "real", "ttl_ms": 60_000}], T0)
    await db.execute("create temp table entries (key text, value text, counter bigint, tokens float8, "
                     "ts_ms bigint, expires_at timestamptz)")
    await db.execute("insert into entries values ('k', 'evil', null, null, null, 'infinity')")
    assert await batch(db, [{"op": "get", "key": "k"}], T0) == ["real"]


async def test_only_read_committed(db: asyncpg.Connection) -> None:
    async with db.transaction(isolation="repeatable_read"):
        with pytest.raises(asyncpg.FeatureNotSupportedError, match="READ COMMITTED"):
            await batch(db, [], T0)


# -- cleanup and boundaries -------------------------------------------------------------


async def rows(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval(
        "select (select count(*) from edgeway.entries) + (select count(*) from edgeway.log_entries) "
        "+ (select count(*) from edgeway.heartbeats)"
    )
    return count


async def test_cleanup_removes_expired_rows_and_returns_the_count(db: asyncpg.Connection) -> None:
    await batch(db, [
        {"op": "set", "key": "a", "value": "1", "ttl_ms": 100},
        {"op": "set", "key": "b", "value": "2", "ttl_ms": 10_000},
        rl("f", "fixed-window", 5, 10_000),  # counter row: window + 1 s
        rl("l", "sliding-log", 5, 10_000, cost=2),  # two log rows: window + 1 s
        rl("t", "token-bucket", 10, 10_000, cost=4),  # bucket row: 4 tokens refilled after 4 s, + 1 s
        {"op": "heartbeat", "key": "h", "instance": "one", "ttl_ms": 5_000},
    ], T0)
    assert await rows(db) == 7
    assert await db.fetchval("select edgeway.cleanup($1)", T0 + 99) == 0
    assert await batch(db, [{"op": "get", "key": "a"}, {"op": "del", "key": "a"}], T0 + 100) == [None, 0]
    await batch(db, [{"op": "set", "key": "a", "value": "1", "ttl_ms": 100}], T0)
    assert await rows(db) == 7  # expired rows are ignored before cleanup() removes them
    assert await db.fetchval("select edgeway.cleanup($1)", T0 + 100) == 1
    assert await db.fetchval("select edgeway.cleanup($1)", T0 + 4_999) == 0
    assert await db.fetchval("select edgeway.cleanup($1)", T0 + 5_000) == 2  # the bucket and the heartbeat
    assert await db.fetchval("select edgeway.cleanup($1)", T0 + 10_999) == 1
    assert await db.fetchval("select edgeway.cleanup($1)", T0 + 11_000) == 3
    assert await rows(db) == 0
    await batch(db, [{"op": "set", "key": "c", "value": "3", "ttl_ms": 60_000}, rl("f", "fixed-window", 5, 1000)], T0)
    assert await db.fetchval("select edgeway.cleanup()") == 2  # the database clock is long past T0


@pytest.mark.parametrize(
    ("algorithm", "steps"),
    [
        # (ms after T0, expected [allowed, then allowed, remaining, reset_ms, retry_after_ms])
        pytest.param("fixed-window", [(0, [1, 1, 0, 1000, 0]), (999, [0, 0, 0, 1, 1]), (1000, [1, 1, 0, 1000, 0])],
                     id="fixed-window"),
        pytest.param("sliding-log", [(0, [1, 1, 0, 1000, 0]), (999, [0, 0, 0, 1, 1]), (1000, [1, 1, 0, 1000, 0])],
                     id="sliding-log"),
        pytest.param("sliding-window", [
            (0, [1, 1, 0, 1000, 0]),
            (999, [0, 0, 0, 1, 1001]),  # only the next window helps, once its weight has faded entirely
            (1000, [0, 0, 0, 1000, 1000]),
            (1999, [0, 0, 0, 1, 1]),
            (2000, [1, 1, 0, 1000, 0]),
        ], id="sliding-window"),
        # double arithmetic, as in Lua: 999 * (1/1000) tokens fall a hair short, so reset says 2 ms; retry is
        # worked out from the stored level as the next read will, and that read (at 1000) is admitted
        pytest.param("token-bucket", [(0, [1, 1, 0, 1000, 0]), (999, [0, 0, 0, 2, 1]), (1000, [1, 1, 0, 1000, 0])],
                     id="token-bucket"),
    ],
)
async def test_window_boundaries(db: asyncpg.Connection, algorithm: str, steps: list[tuple[int, list[int]]]) -> None:
    for offset, expected in steps:
        assert await batch(db, [rl("k", algorithm, 1, 1000)], T0 + offset) == [expected], offset


async def test_heartbeats_count_live_instances(db: asyncpg.Connection) -> None:
    def beat(instance: str) -> dict[str, Any]:
        return {"op": "heartbeat", "key": "instances", "instance": instance, "ttl_ms": 15_000}

    assert await batch(db, [beat("a"), beat("a"), beat("b")], T0) == [1, 1, 2]
    assert await batch(db, [beat("c")], T0 + 14_999) == [3]
    assert await batch(db, [beat("c")], T0 + 15_000) == [1]  # a and b beat exactly one TTL ago: gone
    assert await batch(db, [{"op": "get", "key": "instances"}, {"op": "del", "key": "instances"}], T0 + 15_000) \
        == [None, 1]
    assert await batch(db, [beat("a")], T0 + 15_000) == [1]


async def test_ttl_boundary(db: asyncpg.Connection) -> None:
    await batch(db, [{"op": "set", "key": "k", "value": "v", "ttl_ms": 250}], T0)
    assert await batch(db, [{"op": "get", "key": "k"}], T0 + 249) == ["v"]
    assert await batch(db, [{"op": "get", "key": "k"}, {"op": "del", "key": "k"}], T0 + 250) == [None, 0]
    await batch(db, [{"op": "set", "key": "k", "value": "v", "ttl_ms": 0}], T0)  # like SET PX max(1, ttl)
    assert await batch(db, [{"op": "get", "key": "k"}], T0) == ["v"]
    assert await batch(db, [{"op": "get", "key": "k"}], T0 + 1) == [None]


@pytest.mark.parametrize(
    "commands",
    [
        pytest.param({"op": "get"}, id="not-an-array"),
        pytest.param([{"op": "lpush", "key": "k"}], id="unknown-op"),
        pytest.param([rl("k", "leaky-bucket", 1, 1000)], id="unknown-algorithm"),
        pytest.param([rl("k", "fixed-window", 1, 0)], id="zero-window"),
        pytest.param([rl("k", "token-bucket", 0, 1000)], id="zero-quota"),
        pytest.param([{"op": "heartbeat", "key": "k", "instance": "a", "ttl_ms": 0}], id="zero-heartbeat-ttl"),
    ],
)
async def test_bad_input_is_rejected(db: asyncpg.Connection, commands: object) -> None:
    with pytest.raises(asyncpg.InvalidParameterValueError):
        await db.fetchval("select edgeway.batch($1::jsonb, $2)", json.dumps(commands), T0)


async def test_the_migration_is_idempotent(dsn: str, db: asyncpg.Connection) -> None:
    await batch(db, [{"op": "set", "key": "kept", "value": "v", "ttl_ms": 60_000}], T0)
    for _ in range(2):
        await db.execute(MIGRATION_PATH.read_text())
    assert await batch(db, [{"op": "get", "key": "kept"}], T0) == ["v"]
    count = await db.fetchval(
        "select count(*) from pg_proc p join pg_namespace n on n.oid = p.pronamespace "
        "where n.nspname in ('edgeway', 'public') and p.proname in ('batch', 'cleanup', 'edgeway_batch')"
    )
    assert count == 3
    await test_functions_are_security_definer_with_a_fixed_search_path(db)
    await test_public_cannot_execute_nor_read(db)


# -- concurrency and parity with the Lua script -------------------------------------------


async def test_opposite_key_orders_do_not_deadlock(dsn: str) -> None:
    # a fixed clock: 200 calls straddling a real minute edge would reset the fixed windows mid-test
    stores = [PostgresStore(dsn, timeout=10.0, clock=lambda: (T0 + 123.5) / 1000) for _ in range(3)]
    one, two = (LimitCheck(f"dl:{uuid.uuid4().hex}:{i}", Algorithm.FIXED_WINDOW, 1000, 60_000) for i in (1, 2))
    forward = [RateLimit((one,)), RateLimit((two,))]
    backward = [RateLimit((two, one))]
    try:
        calls = [stores[i % 3].execute(forward if i % 2 else backward) for i in range(200)]
        await asyncio.gather(*calls)
        (result,) = await stores[0].execute([RateLimit((one, two))])
        assert isinstance(result, RateLimitResult)
        assert [s.remaining for s in result.states] == [799, 799]
    finally:
        for store in stores:
            await store.close()


class WalkClock:
    def __init__(self) -> None:
        self.ms = T0 + 123

    def __call__(self) -> float:
        return (self.ms + 0.5) / 1000


@pytest.mark.parametrize("seed", [20261122, 7])  # 40 seeds x 400 steps agreed when this was written
async def test_random_walk_matches_the_lua_script(dsn: str, redis_url: str, seed: int) -> None:
    """The same random requests through Postgres, the Lua script in Redis and MemoryStore: same answers."""
    rng = random.Random(seed)
    clock = WalkClock()
    prefix = f"walk:{uuid.uuid4().hex}:"
    stores: list[Store] = [
        PostgresStore(dsn, clock=clock, timeout=5.0),
        RedisStore(redis_url, clock=clock, timeout=5.0),  # the Lua script
        MemoryStore(clock=clock),
    ]
    limits = [
        LimitCheck(prefix + "f", Algorithm.FIXED_WINDOW, 7, 7_000),
        LimitCheck(prefix + "s", Algorithm.SLIDING_WINDOW, 9, 6_000),
        LimitCheck(prefix + "s2", Algorithm.SLIDING_WINDOW, 3, 1_000),
        LimitCheck(prefix + "l", Algorithm.SLIDING_LOG, 5, 4_000),
        LimitCheck(prefix + "b", Algorithm.TOKEN_BUCKET, 7, 3_000, burst=4),
        LimitCheck(prefix + "b2", Algorithm.TOKEN_BUCKET, 3, 7_000),
    ]
    # Shadow limits and cost_from debits (enforced=False, charged past the quota) drive buckets below zero:
    # their keys must then live until refilled, by the fake clock here and in memory as by the real one in Redis.
    seen: set[tuple[bool, bool]] = set()
    try:
        for step in range(400):
            clock.ms += rng.choice([0, 0, 1, 7, 99, 250, 333, 1000, rng.randrange(0, 9000)])
            checks = tuple(
                check._replace(cost=rng.choice([1, 1, 1, 2, 3, 8]), enforced=rng.random() > 0.2)
                for check in rng.sample(limits, rng.randint(1, 3))
            )
            if rng.random() < 0.15:  # what finish() sends for a cost_from limit: the rest of the real cost
                debits = RateLimit(tuple(check._replace(cost=rng.choice([5, 40, 600]), enforced=False)
                                         for check in rng.sample(limits, rng.randint(1, 2))))
                debited = [await store.execute([debits]) for store in stores]
                assert debited[0] == debited[1] == debited[2], f"debit at step {step}: {debits}"
            value = f"v{step}"
            beat = Heartbeat(prefix + "instances", rng.choice("abc"), 5_000)
            commands = [RateLimit(checks), Set(prefix + "x", value, 60_000), Get(prefix + "x"), Delete(prefix + "y"),
                        beat]
            answers = [await store.execute(commands) for store in stores]
            assert answers[0] == answers[1] == answers[2], f"step {step} at +{clock.ms - T0} ms: {checks}"
            result = answers[0][0]
            assert isinstance(result, RateLimitResult)
            seen.add((result.allowed, all(state.allowed for state in result.states)))
        assert seen == {(True, True), (True, False), (False, False)}  # admitted, admitted over a shadow, rejected
    finally:
        for store in stores:
            await store.close()


async def test_a_connection_dropped_mid_protocol_is_a_store_error(dsn: str) -> None:
    """asyncpg's InternalClientError ("cannot switch to state ...") is a failing store, never a 500."""
    store = PostgresStore(dsn, timeout=5.0)

    class Broken:
        def acquire(self) -> Any:
            raise asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress")

    await store.execute([Get("edgeway-test:k")])  # opens the pool
    pool = store._pool.value
    store._pool.value = Broken()  # type: ignore[assignment]
    try:
        with pytest.raises(StoreError, match="InternalClientError"):
            await store.execute([Get("edgeway-test:k")])
    finally:
        store._pool.value = pool
        await store.close()
