"""What the gateway says about its store is true, and instances count from startup (issue 8, items 2, 8, 10).

Real parts: a redis-server per test, the gateway and the in-app middleware built from policy text.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from edgeway.gateway import create_app, load_text
from edgeway.gateway.embed import Edgeway
from edgeway.gateway.errors import PolicyError
from edgeway.middleware.store.failover import FailoverStore
from tests.servers import RedisServer, UvicornThread, ok_app

POLICY = """\
version: 1
store:
  url: {redis_url}
  timeout: 200ms
  failures: 1
  probe_interval: 50ms
  key_prefix: "{prefix}"
upstreams:
  up: {{ url: "{upstream}" }}
routes:
  - match: {{ path: /limited }}
    upstream: up
    limits: [{{ rate: 10/minute }}]
  - match: {{ path: /* }}
    upstream: up
"""


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def upstream() -> Iterator[UvicornThread]:
    with UvicornThread(ok_app) as server:
        yield server


def policy(redis: RedisServer, upstream: str, prefix: str = "edgeway:") -> str:
    return POLICY.format(redis_url=redis.url, upstream=upstream, prefix=prefix)


def sample(metrics: str, name: str, label: str) -> float | None:
    for line in metrics.splitlines():
        if line.startswith(f"{name}{{{label}}}"):
            return float(line.rsplit(" ", 1)[1])
    return None


async def poll(client: httpx.AsyncClient, path: str, condition: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        body = (await client.get(path)).json()
        if condition(body):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never satisfied the condition; last: {body}")
        await asyncio.sleep(0.05)


async def test_readyz_and_metrics_follow_health_without_limited_traffic(redis: RedisServer,
                                                                       upstream: UvicornThread) -> None:
    gateway = create_app(load_text(policy(redis, upstream.url)))
    transport = httpx.ASGITransport(app=gateway)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            ready = (await client.get("/_edgeway/readyz")).json()
            assert (ready["status"], ready["store"]["mode"]) == ("ready", "redis")
            redis.kill()
            down = await poll(client, "/_edgeway/readyz", lambda b: b["store"]["mode"] == "memory")
            assert down["status"] == "degraded" and down["store"]["chain"][0]["healthy"] is False
            metrics = (await client.get("/_edgeway/metrics")).text
            assert sample(metrics, "edgeway_store_up", 'store="redis"') == 0.0
            assert sample(metrics, "edgeway_store_mode", 'mode="memory"') == 1.0
            redis.start()
            # no request touches the store: the probe alone brings readyz and the metrics back
            back = await poll(client, "/_edgeway/readyz", lambda b: b["store"]["mode"] == "redis")
            assert back["status"] == "ready"
            metrics = (await client.get("/_edgeway/metrics")).text
            assert sample(metrics, "edgeway_store_up", 'store="redis"') == 1.0
            assert sample(metrics, "edgeway_store_mode", 'mode="redis"') == 1.0
            assert sample(metrics, "edgeway_store_mode", 'mode="memory"') == 0.0
    finally:
        await gateway.close()


async def instances_seen(redis: RedisServer, key: str) -> set[str]:
    client = aioredis.Redis.from_url(redis.url, decode_responses=True)
    try:
        return set(await client.zrange(key, 0, -1))
    finally:
        await client.aclose()


async def test_gateways_heartbeat_from_startup_before_serving_anything(redis: RedisServer,
                                                                      upstream: UvicornThread) -> None:
    gateways = [create_app(load_text(policy(redis, upstream.url, "gw:"))) for _ in range(2)]
    ids = set()
    for gateway in gateways:
        assert isinstance(gateway.store, FailoverStore)
        ids.add(gateway.store.instance_id)
    with UvicornThread(gateways[0]), UvicornThread(gateways[1]):  # lifespan startup only, no request
        deadline = time.monotonic() + 5
        while await instances_seen(redis, "gw:default:instances") != ids:  # store.key_prefix, then name
            assert time.monotonic() < deadline, "the instances did not heartbeat at startup"
            await asyncio.sleep(0.05)


async def test_in_app_use_heartbeats_from_the_first_request_of_any_route(redis: RedisServer,
                                                                        upstream: UvicornThread,
                                                                        tmp_path: Any) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(policy(redis, upstream.url, "app:"))
    edgeway = Edgeway.from_policy(path)
    assert isinstance(edgeway.store, FailoverStore)
    app = edgeway.wrap(ok_app)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            assert (await client.get("/unlimited/page")).status_code == 200  # no limit on this route
        deadline = time.monotonic() + 5
        while await instances_seen(redis, "app:default:instances") != {edgeway.store.instance_id}:
            assert time.monotonic() < deadline, "no heartbeat after the first request"
            await asyncio.sleep(0.05)
    finally:
        await edgeway.store.close()


def test_probe_interval_has_a_floor() -> None:
    text = POLICY.format(redis_url="redis://127.0.0.1:1", upstream="http://127.0.0.1:9", prefix="x:")
    with pytest.raises(PolicyError) as caught:
        load_text(text.replace("probe_interval: 50ms", "probe_interval: 0s"), "p.yaml", {})
    assert str(caught.value) == ("p.yaml:6:19: store.probe_interval: probe_interval must be at least 50ms (a down "
                                 "store would be probed in a busy loop); got 0ms")
    assert load_text(text, "p.yaml", {}).policy.store.probe_interval == 0.05
