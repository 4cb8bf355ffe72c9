"""Shared fixtures: private servers started once per test session, never the machine's own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import BRIDGE_TOKEN, FakeRedisThread, RedisServer, UvicornThread


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
    from gateway.upstash_bridge import create_bridge_app

    with UvicornThread(create_bridge_app(redis_url, BRIDGE_TOKEN)) as server:
        yield server
