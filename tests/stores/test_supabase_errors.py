"""SupabaseStore and PostgresStore when things go wrong: every failure is a StoreError, never a hang.

SupabaseStore speaks httpx, so respx plays Supabase: the request's shape
(endpoint, apikey and Bearer headers, JSON body) and each error answer are
checked without a server. PostgresStore is tried against a port where nothing
listens, a database without the migration, and a key held locked by another
session (a query that cannot finish in time).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import asyncpg
import httpx
import pytest
import respx

from edgeway.middleware.store import (
    Algorithm,
    CommandError,
    Delete,
    Get,
    Heartbeat,
    LimitCheck,
    RateLimit,
    Set,
    StoreError,
    StoreTimeout,
)
from edgeway.middleware.store.postgres import MIGRATION, PostgresStore, SupabaseStore
from tests.servers import SERVICE_KEY, UvicornThread, free_port

URL = "https://abcdefgh.supabase.co"
ENDPOINT = f"{URL}/rest/v1/rpc/edgeway_batch"
KEY = "service-role-secret"
CHECK = LimitCheck("rl:ip:1", Algorithm.FIXED_WINDOW, 10, 60_000)
WAITING = """select count(*) from pg_stat_activity
             where application_name = 'edgeway' and state = 'active' and query like 'select edgeway.batch%'"""


@pytest.fixture
async def supabase() -> AsyncIterator[Callable[..., SupabaseStore]]:
    stores: list[SupabaseStore] = []

    def make(*, timeout: float = 2.0, clock: Callable[[], float] | None = None, url: str = URL) -> SupabaseStore:
        store = SupabaseStore(url, KEY, timeout=timeout, clock=clock)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as router:
        yield router


async def test_request_shape(supabase: Callable[..., SupabaseStore], mock: respx.MockRouter) -> None:
    answer = ["v", None, 1, [1, 1, 9, 60_000, 0], 2]
    route = mock.post(ENDPOINT).mock(return_value=httpx.Response(200, json=answer))
    store = supabase(clock=lambda: 1_700_000_040.1234)
    commands = [Get("a"), Set("a", "v", 500), Delete("a"), RateLimit((CHECK,)), Heartbeat("live", "i-1", 15_000)]
    results = await store.execute(commands)
    assert results[:3] == ["v", None, 1] and results[4] == 2
    request = route.calls.last.request
    assert str(request.url) == ENDPOINT
    assert request.headers["apikey"] == KEY
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == {
        "commands": [
            {"op": "get", "key": "a"},
            {"op": "set", "key": "a", "value": "v", "ttl_ms": 500},
            {"op": "del", "key": "a"},
            {"op": "ratelimit", "checks": [{
                "key": "rl:ip:1", "algorithm": "fixed-window", "quota": 10, "window_ms": 60_000,
                "cost": 1, "burst": 0, "enforced": True,
            }]},
            {"op": "heartbeat", "key": "live", "instance": "i-1", "ttl_ms": 15_000},
        ],
        "now_ms": 1_700_000_040_123,  # floor(clock() * 1000), like the Redis stores
    }


async def test_server_clock_sends_null_now(supabase: Callable[..., SupabaseStore], mock: respx.MockRouter) -> None:
    route = mock.post(ENDPOINT).mock(return_value=httpx.Response(200, json=[]))
    await supabase().ping()
    assert json.loads(route.calls.last.request.content) == {"commands": [], "now_ms": None}


async def test_cookies_are_never_stored(supabase: Callable[..., SupabaseStore], mock: respx.MockRouter) -> None:
    route = mock.post(ENDPOINT).mock(
        return_value=httpx.Response(200, json=[None], headers={"set-cookie": "session=abc; Path=/"})
    )
    store = supabase()
    await store.execute([Get("a")])
    await store.execute([Get("a")])
    assert "cookie" not in route.calls.last.request.headers


def test_describe_has_no_key() -> None:
    store = SupabaseStore(URL + "/", KEY)
    assert store.describe() == "supabase+https://abcdefgh.supabase.co"
    assert KEY not in store.describe()


async def test_data_exception_is_the_commands_error_not_an_outage(
    supabase: Callable[..., SupabaseStore], mock: respx.MockRouter
) -> None:
    mock.post(ENDPOINT).mock(return_value=httpx.Response(400, json={"code": "22023", "message": "unknown op"}))
    (result,) = await supabase().execute([RateLimit((CHECK,))])
    assert isinstance(result, CommandError) and "unknown op" in str(result)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        pytest.param(httpx.Response(401, json={"message": "Invalid API key"}), "service role key", id="401"),
        pytest.param(httpx.Response(403, json={"code": "42501", "message": "permission denied for function"}),
                     "service role key", id="403"),
        pytest.param(httpx.Response(404, json={"code": "PGRST202", "message": "Could not find the function"}),
                     MIGRATION, id="404"),
        pytest.param(httpx.Response(500, text="internal trouble"), "HTTP 500: internal trouble", id="500"),
        pytest.param(httpx.Response(503, json={"message": "upstream unavailable"}), "HTTP 503", id="503"),
        pytest.param(httpx.Response(200, text="this is not json"), "invalid JSON", id="invalid-json"),
        pytest.param(httpx.Response(200, json={"result": "OK"}), "unexpected", id="not-a-list"),
        pytest.param(httpx.Response(200, json=[None, None]), "unexpected", id="too-long"),
        pytest.param(httpx.Response(200, json=[[1, 2]]), "unexpected", id="short-rate-limit"),
        pytest.param(httpx.Response(200, json=[[1, 1, 9, "x", 0]]), "unexpected", id="bad-rate-limit"),
    ],
)
async def test_error_answers(
    supabase: Callable[..., SupabaseStore], mock: respx.MockRouter, response: httpx.Response, expected: str
) -> None:
    mock.post(ENDPOINT).mock(return_value=response)
    with pytest.raises(StoreError) as caught:
        await supabase().execute([RateLimit((CHECK,))])
    assert not isinstance(caught.value, StoreTimeout)
    assert expected in str(caught.value)
    assert KEY not in str(caught.value)


@pytest.mark.parametrize("error", [httpx.ReadTimeout, httpx.ConnectTimeout, httpx.PoolTimeout])
async def test_httpx_timeouts_are_store_timeouts(
    supabase: Callable[..., SupabaseStore], mock: respx.MockRouter, error: type[httpx.TimeoutException]
) -> None:
    mock.post(ENDPOINT).mock(side_effect=error("slow"))
    with pytest.raises(StoreTimeout):
        await supabase().execute([Get("a")])


async def test_connection_errors_are_store_errors(
    supabase: Callable[..., SupabaseStore], mock: respx.MockRouter
) -> None:
    mock.post(ENDPOINT).mock(side_effect=httpx.ConnectError("connection refused"))
    with pytest.raises(StoreError) as caught:
        await supabase().execute([Get("a")])
    assert not isinstance(caught.value, StoreTimeout)


async def test_a_hanging_server_times_out(supabase: Callable[..., SupabaseStore], mock: respx.MockRouter) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return httpx.Response(200, json=[None])

    mock.post(ENDPOINT).mock(side_effect=hang)
    store = supabase(timeout=0.1)
    started = time.monotonic()
    with pytest.raises(StoreTimeout):
        await store.execute([Get("a")])
    with pytest.raises(StoreTimeout):
        await store.ping()  # ping waits at least 1 s
    assert time.monotonic() - started < 2.0
    await store.close()  # the abandoned requests are cancelled, not awaited for 30 s
    assert time.monotonic() - started < 3.0


async def test_unreachable_supabase_fails_fast(supabase: Callable[..., SupabaseStore]) -> None:
    store = supabase(url=f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        await store.execute([Get("a")])
    assert not isinstance(caught.value, StoreTimeout)
    assert time.monotonic() - started < 1.0


async def test_the_stub_rejects_a_wrong_key(postgrest_stub: UvicornThread) -> None:
    store = SupabaseStore(postgrest_stub.url, "not-the-key", timeout=2.0)
    try:
        with pytest.raises(StoreError, match="service role key"):
            await store.execute([Get("a")])
    finally:
        await store.close()
    good = SupabaseStore(postgrest_stub.url, SERVICE_KEY, timeout=2.0)
    try:
        await good.ping()
    finally:
        await good.close()


# -- PostgresStore -------------------------------------------------------------------


async def test_postgres_nothing_listening_is_a_store_error() -> None:
    store = PostgresStore(f"postgresql://postgres:secret@127.0.0.1:{free_port()}/postgres", timeout=2.0)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError) as caught:
            await store.execute([Get("a")])
        assert not isinstance(caught.value, StoreTimeout)
        assert "secret" not in str(caught.value)
        with pytest.raises(StoreError):
            await store.ping()
        assert time.monotonic() - started < 1.0
    finally:
        await store.close()
    assert store.describe().startswith("postgresql://127.0.0.1:")


async def test_postgres_without_the_migration(postgres_dsn: str) -> None:
    name = f"bare_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(postgres_dsn)
    try:
        await admin.execute(f"create database {name}")
        store = PostgresStore(postgres_dsn.rsplit("/", 1)[0] + f"/{name}", timeout=2.0)
        try:
            with pytest.raises(StoreError, match="migration is not applied"):
                await store.ping()
        finally:
            await store.close()
    finally:
        await admin.execute(f"drop database {name}")
        await admin.close()


async def test_postgres_slow_query_times_out_then_recovers(postgres_dsn: str) -> None:
    """Another session holds the key's advisory lock: the call stops waiting at its deadline."""
    key = f"locked:{uuid.uuid4().hex}"
    holder = await asyncpg.connect(postgres_dsn)
    store = PostgresStore(postgres_dsn, timeout=0.2, pool_size=2)
    try:
        await store.ping()
        await holder.execute("select pg_advisory_lock(hashtextextended($1, 0))", key)
        started = time.monotonic()
        for _ in range(3):  # more calls than pool connections: cancelled queries must give theirs back
            with pytest.raises(StoreTimeout):
                await store.execute([RateLimit((CHECK._replace(key=key),))])
        assert time.monotonic() - started < 1.5
        # the cancel requests land asynchronously: unlocking before they do would let a call finish late
        deadline = time.monotonic() + 5.0
        while await holder.fetchval(WAITING) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await holder.execute("select pg_advisory_unlock(hashtextextended($1, 0))", key)
        (result,) = await store.execute([RateLimit((CHECK._replace(key=key),))], timeout=5.0)
        # the timed-out calls were cancelled in the database: none of them charged the limit
        assert result.allowed and result.states[0].remaining == 9  # type: ignore[attr-defined]
    finally:
        await holder.close()
        await store.close()


async def test_postgres_recovers_after_its_connections_are_killed(postgres_dsn: str) -> None:
    """Connections dropped under the pool (a restart, a pooler failover): one failure at most, then fresh ones."""
    key = f"killed:{uuid.uuid4().hex}"
    admin = await asyncpg.connect(postgres_dsn)
    store = PostgresStore(postgres_dsn, timeout=2.0)
    try:
        await store.execute([Set(key, "v", 60_000)])
        killed = await admin.fetchval(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity where application_name = 'edgeway'"
        )
        assert killed >= 1
        await asyncio.sleep(0.05)
        outcomes: list[object] = []
        for _ in range(3):
            try:
                outcomes.append(await store.execute([Get(key)]))
            except StoreError as exc:
                assert not isinstance(exc, StoreTimeout)
                outcomes.append("error")
        assert outcomes[-2:] == [["v"], ["v"]]
    finally:
        await admin.close()
        await store.close()
