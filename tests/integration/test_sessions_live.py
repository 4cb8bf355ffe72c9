"""Sessions end to end: the gateway, a real upstream, the Supabase Auth stand-in, and real redis-servers.

- the identity the upstream receives (and the forged one it never does), on
  session routes, optional routes and routes without sessions;
- the admin revoke endpoint;
- the store cost of a ``session: required`` + ``key: user`` route: one batch per
  request, counted by the store and by ``INFO commandstats`` on a private
  redis-server;
- two ``edgeway serve`` processes asking the provider exactly once for 100
  concurrent requests carrying one new token.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from edgeway.gateway import Edgeway, create_app
from edgeway.gateway.loader import load_text
from edgeway.middleware import cache
from edgeway.middleware.store import Command, Store
from edgeway.middleware.store.memory import MemoryStore
from edgeway.middleware.store.redis import RedisStore
from tests.auth_server import ANON_KEY, USER_PATH, AuthServer
from tests.servers import Gateways, RedisServer, UvicornThread, lifespan

ADMIN = "admin-secret-token"

POLICY = """\
version: 1
store: {{ url: "{store}", timeout: 5s, key_prefix: "{prefix}" }}
upstreams:
  up: {{ url: "{upstream}" }}
routes:
  - match: {{ path: /private }}
    upstream: up
    session: required
    limits: [{{ rate: 1000/minute, key: user }}]
  - match: {{ path: /cached }}
    upstream: up
    session: required
    limits: [{{ rate: 1000/minute, key: user }}]
    cache: {{ ttl: 1h, key: [method, path, user] }}
  - match: {{ path: /maybe }}
    upstream: up
    session: optional
  - match: {{ path: /open }}
    upstream: up
sessions:
  url: "{auth}"
  anon_key: "{anon}"
  headers: {{ X-Edgeway-Role: role }}
admin: {{ token: "{admin}" }}
"""


class Recorder:
    """An upstream that answers with the X-Edgeway-* headers it received."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        seen = [[k.decode(), v.decode()] for k, v in scope["headers"] if k.startswith(b"x-edgeway-")]
        body = json.dumps(seen).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def auth() -> Iterator[AuthServer]:
    with AuthServer() as server:
        yield server


@pytest.fixture(scope="module")
def upstream() -> Iterator[UvicornThread]:
    with UvicornThread(Recorder(), interface="asgi3") as server:
        yield server


def policy_text(store: str, upstream: UvicornThread, auth: AuthServer) -> str:
    return POLICY.format(store=store, prefix=f"s-{uuid.uuid4().hex[:8]}:", upstream=upstream.url, auth=auth.url,
                         anon=ANON_KEY, admin=ADMIN)


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("198.51.100.9", 1)),
                             base_url="http://gw.test")


FORGED = {"X-Edgeway-User": "admin", "X-Edgeway-Role": "service_role", "X-Edgeway-Anything": "x"}


async def test_upstream_sees_only_the_verified_identity(auth: AuthServer, upstream: UvicornThread) -> None:
    gateway = create_app(load_text(policy_text("memory://", upstream, auth)))
    token = auth.issue("alice")
    async with client(gateway) as http:
        private = await http.get("/private", headers={**FORGED, "authorization": f"Bearer {token}"})
        anonymous = await http.get("/private", headers=FORGED)
        maybe = await http.get("/maybe", headers=FORGED)
        opened = await http.get("/open", headers=FORGED)
    await gateway.close()
    assert private.status_code == 200
    assert private.json() == [["x-edgeway-user", "alice"], ["x-edgeway-role", "authenticated"]]
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "unauthorized"
    assert maybe.status_code == 200 and maybe.json() == []
    assert opened.status_code == 200 and opened.json() == []


async def test_in_app_strips_forged_identity_on_every_path(auth: AuthServer, upstream: UvicornThread,
                                                           tmp_path: Path) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await Recorder()(scope, receive, send)

    path = tmp_path / "policy.yaml"
    path.write_text(policy_text("memory://", upstream, auth))
    wrapped = Edgeway.from_policy(path).wrap(app)
    async with client(wrapped) as http:
        unmatched = await http.get("/not-a-route", headers=FORGED)
        private = await http.get("/private", headers={**FORGED, "authorization": f"Bearer {auth.issue('bob')}"})
    assert unmatched.json() == []
    assert private.json() == [["x-edgeway-user", "bob"], ["x-edgeway-role", "authenticated"]]


async def test_admin_revoke_endpoint(auth: AuthServer, upstream: UvicornThread) -> None:
    gateway = create_app(load_text(policy_text("memory://", upstream, auth)))
    token = auth.issue("carol")
    bearer = {"authorization": f"Bearer {token}"}
    admin = {"authorization": f"Bearer {ADMIN}"}
    async with client(gateway) as http:
        assert (await http.get("/private", headers=bearer)).status_code == 200
        refused = await http.post("/_edgeway/sessions/revoke", json={"token": token})
        bad = await http.post("/_edgeway/sessions/revoke", content=b"{not json", headers=admin)
        wrong = await http.post("/_edgeway/sessions/revoke", json={"token": token, "user": "x"}, headers=admin)
        done = await http.post("/_edgeway/sessions/revoke", json={"user": "carol"}, headers=admin)
        after = await http.get("/private", headers=bearer)
    await gateway.close()
    assert refused.status_code == 401
    assert bad.status_code == 400 and bad.headers["edgeway-error"] == "bad_request"
    assert wrong.status_code == 400 and wrong.json()["error"] == "bad_request"
    assert done.status_code == 200 and done.json() == {"revoked": True}
    assert after.status_code == 401 and after.json()["reason"] == "revoked"


class CountingStore(Store):
    """Counts the batches (round trips) a store is asked for."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.batches: list[list[str]] = []
        self.kind = inner.kind

    async def execute(self, commands: Sequence[Command], *, timeout: float | None = None) -> list[object]:
        try:
            return await self.inner.execute(commands, timeout=timeout)
        finally:  # recorded once done: a test can wait for a deferred write to have landed
            self.batches.append([type(command).__name__ for command in commands])

    async def ping(self) -> None:
        await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


# per route: the batch of one warm request, and the Redis commands it runs (commandstats counts a script's own
# calls too): the guarded rate-limit script (EVALSHA: TIME, ONE MGET of the three revocation keys and the two
# sliding-window counters, the current window written), which also answers the session's revocation check (no
# read of its own), and on /cached the entry's GET
ROUND_TRIP = {
    "/private": (["Revoked", "RateLimit"], {"evalsha": 1, "time": 1, "mget": 1, "set": 1}),
    "/cached": (["Revoked", "RateLimit", "Get"], {"evalsha": 1, "time": 1, "mget": 1, "get": 1, "set": 1}),
}


@pytest.mark.parametrize("path", list(ROUND_TRIP))
async def test_one_store_round_trip_per_request_with_session_user_limit_and_cache(
        auth: AuthServer, upstream: UvicornThread, own_redis: RedisServer, path: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """session: required + key: user limit (+ cache), token verified locally: one batch per request."""
    monkeypatch.setattr(cache, "HOT_FOR", 0.0)  # every hit reads its entry (none answered from memory)
    store = CountingStore(RedisStore(own_redis.url, timeout=5))
    gateway = create_app(load_text(policy_text(own_redis.url, upstream, auth)), store=store)
    bearer = {"authorization": f"Bearer {auth.issue('dave')}"}
    requests = 25
    admin = redis.Redis.from_url(own_redis.url)
    async with client(gateway) as http:
        first = await http.get(path, headers=bearer)  # warm: JWKS, scripts, the cache entry
        for _ in range(200):  # the cache fill is a deferred write: wait (bounded) until it has landed
            if path != "/cached" or any("IndexAdd" in batch for batch in store.batches):
                break
            await asyncio.sleep(0.01)
        admin.config_resetstat()
        store.batches.clear()
        responses = [await http.get(path, headers=bearer) for _ in range(requests)]
    stats = admin.info("commandstats")
    await gateway.close()
    admin.close()
    assert first.status_code == 200 and [r.status_code for r in responses] == [200] * requests
    batch, per_request = ROUND_TRIP[path]
    assert store.batches == [batch] * requests  # ONE round trip per request
    calls = {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}
    calls.pop("config|resetstat", None)
    assert calls == {name: count * requests for name, count in per_request.items()}
    if path == "/cached":
        assert all(r.headers["cache-status"].startswith("edgeway; hit") for r in responses)


async def test_two_gateways_ask_the_provider_once_for_a_burst(auth: AuthServer, upstream: UvicornThread,
                                                              redis_url: str, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(redis_url, upstream, auth))
    pair = Gateways(policy, tmp_path)
    token = auth.issue("erin", "HS256")  # no jwt_secret configured: only the provider can judge it
    auth.calls.clear()
    clients = [httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30,
                                 limits=httpx.Limits(max_connections=50)) for port in pair.ports]
    try:
        responses = await asyncio.gather(*(
            clients[i % 2].get("/private", headers={"authorization": f"Bearer {token}"}) for i in range(100)))
    finally:
        for http in clients:
            await http.aclose()
        pair.close()
    assert [r.status_code for r in responses] == [200] * 100
    assert {r.json()[0][1] for r in responses} == {"erin"}
    assert auth.calls[USER_PATH] == 1


async def test_memory_store_policy_keeps_working_without_redis(auth: AuthServer, upstream: UvicornThread) -> None:
    """The embedded default: sessions on memory:// need nothing else installed."""
    gateway = create_app(load_text(policy_text("memory://", upstream, auth)), store=MemoryStore())
    async with client(gateway) as http:
        response = await http.get("/private", headers={"authorization": f"Bearer {auth.issue('frank', 'RS256')}"})
    await gateway.close()
    assert response.status_code == 200
