"""No stampede across instances: 50 concurrent identical misses on two gateway processes, one upstream call.

Real parts only: a private redis-server (and the Upstash-REST bridge over it), two `edgeway serve`
processes, an upstream under uvicorn that counts what reaches it and takes a while to answer (so every
client arrives while the fill is in flight), and 50 concurrent HTTP clients. Also measured here: what one
1 KB JSON entry costs in Redis memory (`MEMORY USAGE`), printed for bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from edgeway.middleware import CacheMiddleware
from edgeway.middleware.store.redis import RedisStore
from tests.servers import BRIDGE_TOKEN, Gateways, UvicornThread, lifespan, read_body

CLIENTS = 50
ENTRIES = 100

POLICY = """\
version: 1
store: {{ url: "{store}", timeout: 5s, key_prefix: "{prefix}" }}
upstreams:
  ai: {{ url: "{upstream}", timeout: {{ read: 10s }} }}
routes:
  - match: {{ path: /v1/chat, methods: [POST] }}
    upstream: ai
    cache: {{ ttl: 1h, key: [method, path, body], body_exclude: [user], lock_timeout: 8s }}
"""


class SlowModel:
    """An expensive AI endpoint: every call takes 1.5 s and answers a body no other call repeats."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        await read_body(receive)
        self.calls += 1
        await asyncio.sleep(1.5)
        body = json.dumps({"answer": uuid.uuid4().hex, "call": self.calls}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def model() -> Iterator[tuple[SlowModel, UvicornThread]]:
    app = SlowModel()
    with UvicornThread(app) as server:
        yield app, server


@pytest.fixture(params=["redis", "upstash"])
def gateways(request: pytest.FixtureRequest, model: tuple[SlowModel, UvicornThread], redis_url: str,
             tmp_path: Path) -> Iterator[Gateways]:
    if request.param == "redis":
        store = redis_url
    else:
        bridge = request.getfixturevalue("upstash_bridge")
        store = f"upstash+http://{BRIDGE_TOKEN}@127.0.0.1:{bridge.port}"
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(store=store, prefix=f"stampede-{uuid.uuid4().hex[:8]}:", upstream=model[1].url))
    pair = Gateways(policy, tmp_path)
    try:
        yield pair
    finally:
        pair.close()


async def test_fifty_concurrent_misses_on_two_gateways_make_one_upstream_call(
    gateways: Gateways, model: tuple[SlowModel, UvicornThread]
) -> None:
    app, _ = model
    before = app.calls
    question = {"model": "m", "messages": [{"role": "user", "content": f"why? {uuid.uuid4().hex}"}]}
    limits = httpx.Limits(max_connections=CLIENTS)
    clients = [httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=30)
               for port in gateways.ports]
    try:
        responses = await asyncio.gather(*(
            clients[i % 2].post("/v1/chat", json={**question, "user": f"u{i}"}, headers={"host": "api.example"})
            for i in range(CLIENTS)
        ))
    finally:
        for client in clients:
            await client.aclose()
    statuses = Counter(r.headers.get("cache-status") for r in responses)
    assert app.calls - before == 1, statuses
    assert {r.status_code for r in responses} == {200}
    assert len({r.content for r in responses}) == 1
    statuses = Counter(r.headers["cache-status"] for r in responses)
    assert statuses["edgeway; fwd=miss; stored"] == 1
    assert statuses["edgeway; hit; collapsed"] == CLIENTS - 1, statuses


async def test_redis_memory_and_ttls_of_1kb_json_entries(redis_url: str) -> None:
    rng = random.Random(7)  # text-like, so compression saves what it would on a real answer, not more
    words = " ".join("".join(rng.choice("etaoinshrdlucmfw") for _ in range(rng.randint(2, 9))) for _ in range(200))
    body = json.dumps({"id": "chatcmpl-1", "model": "m", "choices": [{"message": {"content": words}}]}).encode()
    body = body[:1024 - 2] + b'"}' if len(body) > 1024 else body

    async def origin(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    store = RedisStore(redis_url, timeout=5.0)
    prefix = f"mem-{uuid.uuid4().hex[:8]}:"
    app = CacheMiddleware(origin, store=store, ttl=3600, key_prefix=prefix)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as client:
            for page in range(ENTRIES):
                await client.get(f"/answer?page={page}")
                while app._background:
                    await asyncio.gather(*app._background)
            hit = await client.get("/answer?page=0")
    finally:
        await store.close()
    assert hit.headers["cache-status"].startswith("edgeway; hit") and hit.content == body
    redis = aioredis.Redis.from_url(redis_url)
    try:
        keys = [key async for key in redis.scan_iter(f"{prefix}cache:*") if b":ix:" not in key]
        assert len(keys) == ENTRIES
        stored = await redis.strlen(keys[0])
        usage = await redis.memory_usage(keys[0])
        (index,) = [key async for key in redis.scan_iter(f"{prefix}cache:ix:*")]
        index_usage = await redis.memory_usage(index, samples=0)
        ttls = [await redis.pttl(key) async for key in redis.scan_iter(f"{prefix}*")]
    finally:
        await redis.aclose()
    assert usage is not None and index_usage is not None and stored < len(body) + 200
    assert len(ttls) == ENTRIES + 1 and all(0 < ttl <= 3_600_000 for ttl in ttls)  # every key expires
    print(f"\nMEMORY USAGE of one {len(body)} B JSON entry: value {stored} B (compressed), key+value {usage} B; "
          f"plus {index_usage / ENTRIES:.0f} B in the route's purge index (its {index_usage} B / {ENTRIES} entries)")
