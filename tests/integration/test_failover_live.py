"""Redis fails, PostgreSQL takes over, nothing is lost, and Redis comes back by itself.

One scenario against real parts owned by this module (never the machine's
shared services): a redis-server it kills, pauses and restarts, a PostgreSQL it
stops, an upstream, and the gateway under uvicorn with continuous load. The
limited route is `on_store_failure: closed`, so a store chain that ever failed
a request would show as a 503: the test forbids any 5xx.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from edgeway.gateway import create_app, load_text
from edgeway.gateway.app import Gateway
from tests.servers import PostgresServer, RedisServer, UvicornThread, apply_migration, ok_app

QUOTA = 20
TIMEOUT_S = 0.25

POLICY = """\
version: 1
store:
  url: redis://127.0.0.1:{redis_port}
  timeout: {timeout}s
  failures: 3
  failure_window: 10s
  probe_interval: 200ms
  fallback:
    - postgres: {{ dsn: "{dsn}" }}
    - memory
upstreams:
  up: {{ url: "{upstream}" }}
routes:
  - match: {{ path: /limited }}
    upstream: up
    limits: [{{ rate: {quota}/minute, key: "header:X-Client", algorithm: fixed-window, on_store_failure: closed }}]
  - match: {{ path: /* }}
    upstream: up
    limits: [{{ rate: 1000000/minute, key: ip, on_store_failure: closed }}]
"""


@dataclass
class Parts:
    redis: RedisServer
    postgres: PostgresServer
    gateway: Gateway
    served: UvicornThread


@pytest.fixture(scope="module")
def parts() -> Iterator[Parts]:
    with RedisServer() as redis, PostgresServer() as postgres, UvicornThread(ok_app) as upstream:
        apply_migration(postgres.dsn)
        policy = POLICY.format(redis_port=redis.port, dsn=postgres.dsn, upstream=upstream.url, quota=QUOTA,
                               timeout=TIMEOUT_S)
        gateway = create_app(load_text(policy))
        with UvicornThread(gateway) as served:
            yield Parts(redis, postgres, gateway, served)


@dataclass
class Load:
    """Continuous traffic on /free from a few concurrent clients, recording statuses and latencies."""

    url: str
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (start time, seconds)
    running: bool = True

    async def run(self, clients: int = 4) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as client:
            await asyncio.gather(*(self._client(client) for _ in range(clients)))

    async def _client(self, client: httpx.AsyncClient) -> None:
        while self.running:
            started = time.monotonic()
            response = await client.get("/free")
            self.latencies.append((started, time.monotonic() - started))
            self.statuses[response.status_code] += 1
            await asyncio.sleep(0.005)


async def wait_for_mode(gateway: Gateway, mode: str, timeout: float) -> float:
    started = time.monotonic()
    while gateway.store.kind != mode:
        if time.monotonic() - started > timeout:
            raise AssertionError(f"store mode is {gateway.store.kind}, not {mode}, after {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def admitted(url: str, client_id: str, attempts: int = QUOTA + 10) -> Counter[int]:
    """A burst on one fixed-window key, started well inside a minute (across an edge 2x is legitimate)."""
    if time.time() % 60 > 57:
        await asyncio.sleep(60 - time.time() % 60 + 0.1)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        responses = await asyncio.gather(
            *(client.get("/limited", headers={"x-client": client_id}) for _ in range(attempts))
        )
    return Counter(r.status_code for r in responses)


async def test_redis_down_postgres_takes_over_and_redis_comes_back(parts: Parts) -> None:
    load = Load(parts.served.url)
    traffic = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(0.3)
        assert parts.gateway.store.kind == "redis"
        assert await admitted(parts.served.url, "before") == {200: QUOTA, 429: 10}

        # kill Redis: PostgreSQL takes over at once, limits stay exact
        parts.redis.kill()
        await wait_for_mode(parts.gateway, "postgres", timeout=2)
        assert await admitted(parts.served.url, "during-postgres") == {200: QUOTA, 429: 10}
        ready = httpx.get(f"{parts.served.url}/_edgeway/readyz").json()
        assert ready["status"] == "degraded" and ready["store"]["mode"] == "postgres"

        # Redis restarts: the probe finds it and the gateway is back on it (backoff stays under 2 s here)
        parts.redis.restart()
        back_after = await wait_for_mode(parts.gateway, "redis", timeout=8)
        assert back_after < 8
        assert await admitted(parts.served.url, "after-restart") == {200: QUOTA, 429: 10}

        # pause Redis (a slow Redis): each request waits at most the store timeout until failover
        pause_started = time.monotonic()
        parts.redis.pause()
        try:
            await wait_for_mode(parts.gateway, "postgres", timeout=3)
            failed_over = time.monotonic()
            await asyncio.sleep(0.5)
        finally:
            resumed = time.monotonic()
            parts.redis.resume()
        during = [seconds for started, seconds in load.latencies if pause_started <= started < resumed]
        # each request pays at most the store timeout (then the same request goes to PostgreSQL)...
        assert during and max(during) < TIMEOUT_S + 0.35, max(during)
        # ...and once Redis is marked down, none pays it any more
        after = [seconds for started, seconds in load.latencies if failed_over + 0.05 <= started < resumed]
        assert after and max(after) < TIMEOUT_S, max(after)
        await wait_for_mode(parts.gateway, "redis", timeout=8)

        # Redis and PostgreSQL both gone: memory takes over, limits still enforced (per instance)
        parts.redis.kill()
        parts.postgres.stop()
        await wait_for_mode(parts.gateway, "memory", timeout=3)
        assert await admitted(parts.served.url, "during-memory") == {200: QUOTA, 429: 10}
    finally:
        load.running = False
        await traffic
    assert load.statuses and set(load.statuses) == {200}, load.statuses  # never a 5xx from the gateway
