"""Two gateway processes share one breaker per upstream through the store, and keep it when the store fails.

Real parts owned by this module: a private redis-server it kills, a private PostgreSQL (the fallback)
it stops, an upstream it makes fail and hang, and two `edgeway serve` processes. Open times are real
here (processes have no injectable clock), so they are short; the transitions themselves are tested
with a fake clock in tests/middleware/test_breaker*.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.servers import FlakyUpstream, Gateways, PostgresServer, RedisServer, UvicornThread, apply_migration

SYNC = 1.0  # how stale an instance's copy of a breaker may be (CircuitBreaker.sync_interval)

POLICY = """\
version: 1
store:
  url: redis://127.0.0.1:{redis_port}
  key_prefix: "{prefix}"
  timeout: 250ms
  probe_interval: 200ms
  fallback:
    - postgres: {{ dsn: "{dsn}" }}
    - memory
upstreams:
  up:
    url: "{upstream}"
    timeout: {{ connect: 1s, read: 5s }}
    breaker: {{ failures: 3, open_for: {open_for} }}
  spare:
    url: "{upstream}"
    breaker: {{ failures: 3, open_for: 60s }}
routes:
  - match: {{ path: /spare/* }}
    upstream: spare
  - match: {{ path: /* }}
    upstream: up
"""


def start(tmp_path: Path, redis: RedisServer, postgres: PostgresServer, upstream_url: str, *,
          open_for: str) -> tuple[Gateways, str]:
    prefix = f"live-{uuid.uuid4().hex[:8]}:"
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(redis_port=redis.port, dsn=postgres.dsn, upstream=upstream_url, prefix=prefix,
                                    open_for=open_for))
    return Gateways(policy, tmp_path), prefix


@pytest.fixture(scope="module")
def stores() -> Iterator[tuple[RedisServer, PostgresServer]]:
    with RedisServer() as redis, PostgresServer() as postgres:
        apply_migration(postgres.dsn)
        yield redis, postgres


def error_of(response: httpx.Response) -> str | None:
    return response.headers.get("edgeway-error")


async def test_one_breaker_across_two_gateways(stores: tuple[RedisServer, PostgresServer], upstream: FlakyUpstream,
                                               flaky: tuple[FlakyUpstream, UvicornThread], tmp_path: Path) -> None:
    redis, postgres = stores
    gateways, _ = start(tmp_path, redis, postgres, flaky[1].url, open_for="2s")
    a, b = gateways.urls
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(f"{b}/x")).status_code == 200  # B now holds a fresh "closed" copy

            # A sees three failures in a row and opens the breaker
            upstream.status = 503
            assert [error_of(await client.get(f"{a}/x")) for _ in range(3)] == [None] * 3
            await asyncio.sleep(0.3)  # A's deferred write
            assert error_of(await client.get(f"{a}/x")) == "upstream_unavailable"
            calls = upstream.total

            # within one sync interval B short-circuits too, without calling the upstream
            await asyncio.sleep(SYNC + 0.1)
            refused = [await client.get(f"{b}/x") for _ in range(5)]
            assert {error_of(r) for r in refused} == {"upstream_unavailable"}
            assert upstream.total == calls

            # open time over: 50 concurrent requests over both gateways, exactly one reaches the upstream
            await asyncio.sleep(2.1)
            upstream.status = 200
            upstream.gate = threading.Event()
            burst = [asyncio.ensure_future(client.get(f"{(a, b)[i % 2]}/x")) for i in range(50)]
            answered = []
            for _ in range(500):
                answered = [task for task in burst if task.done()]
                if len(answered) == 49:
                    break
                await asyncio.sleep(0.01)
            probes = upstream.total - calls
            upstream.gate.set()
            responses = await asyncio.gather(*burst)
            assert probes == 1
            assert Counter((r.status_code, error_of(r)) for r in responses) == {
                (200, None): 1, (503, "upstream_unavailable"): 49}

            # the probe closed it everywhere
            await asyncio.sleep(SYNC + 0.1)
            assert [(await client.get(f"{url}/x")).status_code for url in (a, b, a, b)] == [200] * 4

            # opened again, a failed probe reopens it for longer (open_for x 2, less up to 10% jitter)
            upstream.status = 503
            for _ in range(3):
                await client.get(f"{a}/x")
            await asyncio.sleep(2.1)
            assert error_of(await client.get(f"{a}/x")) is None  # the probe, failing
            await asyncio.sleep(0.3)  # its deferred write
            reopened = await client.get(f"{a}/x")
            assert error_of(reopened) == "upstream_unavailable"
            assert int(reopened.headers["retry-after"]) >= 3
    finally:
        gateways.close()
    log = gateways.log(0)
    assert "breaker up -> open: consecutive failures (instance " in log
    assert "breaker up -> open: the half-open probe failed (instance " in log


async def test_breaker_survives_redis_then_every_store_failing(stores: tuple[RedisServer, PostgresServer],
                                                               upstream: FlakyUpstream,
                                                               flaky: tuple[FlakyUpstream, UvicornThread],
                                                               tmp_path: Path) -> None:
    redis, postgres = stores
    gateways, prefix = start(tmp_path, redis, postgres, flaky[1].url, open_for="60s")
    a, b = gateways.urls
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(f"{b}/x")).status_code == 200
            upstream.status = 503
            for _ in range(3):
                await client.get(f"{a}/x")
            await asyncio.sleep(SYNC + 0.1)
            assert error_of(await client.get(f"{b}/x")) == "upstream_unavailable"
            calls = upstream.total

            # Redis dies: the breaker state continues on PostgreSQL, B keeps short-circuiting
            redis.kill()
            deadline = time.monotonic() + 2 * SYNC + 1
            while time.monotonic() < deadline:  # several re-reads, which now go to PostgreSQL
                assert error_of(await client.get(f"{b}/x")) == "upstream_unavailable"
                assert error_of(await client.get(f"{a}/x")) == "upstream_unavailable"
                await asyncio.sleep(0.1)
            assert upstream.total == calls
            connection = await asyncpg.connect(postgres.dsn)
            try:
                phase = await connection.fetchval("select phase from edgeway.breakers where key = $1",
                                                  f"{prefix}default:br:{{up}}")
            finally:
                await connection.close()
            assert phase == 1

            # PostgreSQL dies too: every instance still has a real breaker of its own
            postgres.stop()
            await asyncio.sleep(0.5)
            for url in (a, b):
                statuses = []
                for _ in range(4):
                    statuses.append(error_of(await client.get(f"{url}/spare/x")))
                    await asyncio.sleep(0.4)  # its write: past the dead fallback (<= store timeout) to memory
                assert statuses == [None, None, None, "upstream_unavailable"]
            assert error_of(await client.get(f"{b}/x")) == "upstream_unavailable"
    finally:
        gateways.close()
