"""Shared fixtures: private servers started once per test session, never the machine's own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import BRIDGE_TOKEN, FakeRedisThread, FlakyUpstream, RedisServer, UvicornThread


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server on a random port for the whole session (fails, never skips, without one)."""
    try:
        server = RedisServer()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    with server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def fakeredis_url() -> Iterator[str]:
    """fakeredis (with Lua) served over TCP, for the same client code as a real Redis."""
    with FakeRedisThread() as server:
        yield server.url


@pytest.fixture(scope="session")
def upstash_bridge(redis_url: str) -> Iterator[UvicornThread]:
    """The Upstash-compatible bridge over the session's redis-server, served by uvicorn."""
    from edgeway.gateway.upstash_bridge import create_bridge_app

    with UvicornThread(create_bridge_app(redis_url, BRIDGE_TOKEN)) as server:
        yield server


# -- PostgreSQL and the PostgREST stub (the postgres and supabase stores) ---------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[object]:
    """A private PostgreSQL cluster for the whole session (fails, never skips, without PostgreSQL)."""
    from tests.servers import PostgresServer

    try:
        server = PostgresServer()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    with server:
        yield server


@pytest.fixture(scope="session")
def postgres_dsn(postgres_server: object) -> str:
    """The session's PostgreSQL with supabase/migrations/20261122000000_edgeway.sql applied."""
    from tests.servers import PostgresServer, apply_migration

    assert isinstance(postgres_server, PostgresServer)
    apply_migration(postgres_server.dsn)
    return postgres_server.dsn


@pytest.fixture(scope="session")
def postgrest_stub(postgres_dsn: str) -> Iterator[UvicornThread]:
    """tests.postgrest_stub (PostgREST's RPC endpoint) over the session's PostgreSQL, served by uvicorn."""
    from tests.postgrest_stub import create_postgrest_app
    from tests.servers import SERVICE_KEY

    with UvicornThread(create_postgrest_app(postgres_dsn, SERVICE_KEY)) as server:
        yield server


@pytest.fixture(scope="module")
def flaky() -> Iterator[tuple[FlakyUpstream, UvicornThread]]:
    """One :class:`FlakyUpstream` per test module, served by uvicorn."""
    upstream = FlakyUpstream()
    with UvicornThread(upstream) as server:
        yield upstream, server


@pytest.fixture
def upstream(flaky: tuple[FlakyUpstream, UvicornThread]) -> FlakyUpstream:
    """The module's flaky upstream, answering 200 at once again and with its counts cleared."""
    app = flaky[0]
    app.status, app.hang, app.gate, app.calls = 200, 0.0, None, {}
    return app
