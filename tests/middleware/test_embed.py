"""The policy file inside an app (`Edgeway.from_policy(...).wrap(app)`) and `add_middleware` use."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from edgeway.gateway import Edgeway
from edgeway.middleware.cache import CacheMiddleware
from edgeway.middleware.ratelimit import Limit, RateLimitMiddleware
from edgeway.middleware.store.memory import MemoryStore
from tests.garbage import contexts_left

POLICY = """\
version: 1
upstreams:
  api: { url: "http://127.0.0.1:9" }
routes:
  - match: { path: /api/ai/*, methods: [POST] }
    upstream: api
    limits: [{ rate: 2/minute, key: ip }]
"""


async def chat(request):  # type: ignore[no-untyped-def]
    return JSONResponse({"answer": 42})


def starlette_app() -> Starlette:
    return Starlette(routes=[Route("/api/ai/chat", chat, methods=["POST"]), Route("/health", chat)])


def client(app) -> httpx.AsyncClient:  # type: ignore[no-untyped-def]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("198.51.100.1", 1)), base_url="http://t")


async def test_wrap_applies_the_policy_routes_and_passes_other_paths(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    app = Edgeway.from_policy(path, store=MemoryStore()).wrap(starlette_app())
    async with client(app) as http:
        chats = [await http.post("/api/ai/chat") for _ in range(3)]
        health = [await http.get("/health") for _ in range(5)]
    assert [r.status_code for r in chats] == [200, 200, 429]
    assert chats[0].json() == {"answer": 42} and "ratelimit" in chats[0].headers
    assert chats[2].json()["error"] == "rate_limited"
    assert all(r.status_code == 200 and "ratelimit" not in r.headers for r in health)


async def test_add_middleware_as_in_the_readme() -> None:
    app = starlette_app()
    app.add_middleware(RateLimitMiddleware, limits=[Limit(rate="1/minute")], store=MemoryStore())
    async with client(app) as http:
        statuses = [(await http.get("/health")).status_code for _ in range(2)]
    assert statuses == [200, 429]


CACHED_POLICY = """\
version: 1
upstreams:
  api: { url: "http://127.0.0.1:9" }
routes:
  - match: { path: /api/ai/*, methods: [POST] }
    upstream: api
    cache: { ttl: 1h, key: [method, path, body] }
"""


async def test_wrap_caches_as_the_gateway_does(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(CACHED_POLICY)
    calls = 0

    async def counted(request):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return JSONResponse({"answer": calls})

    inner = Starlette(routes=[Route("/api/ai/chat", counted, methods=["POST"])])
    app = Edgeway.from_policy(path, store=MemoryStore()).wrap(inner)
    async with client(app) as http:
        first = await http.post("/api/ai/chat", json={"q": "why", "n": 1})
        await asyncio.sleep(0)  # let the deferred fill run
        second = await http.post("/api/ai/chat", json={"n": 1.0, "q": "why"})
    assert first.headers["cache-status"] == "edgeway; fwd=miss; stored"
    assert second.headers["cache-status"].startswith("edgeway; hit") and second.json() == {"answer": 1}
    assert calls == 1


async def test_cache_middleware_as_in_the_readme() -> None:
    app = starlette_app()
    app.add_middleware(CacheMiddleware, store=MemoryStore(), ttl=60, key=["method", "path", "body"])
    async with client(app) as http:
        first = await http.post("/api/ai/chat", json={"q": 1})
        await asyncio.sleep(0)
        second = await http.post("/api/ai/chat", json={"q": 1})
    assert second.headers["cache-status"].startswith("edgeway; hit") and second.json() == first.json()


async def test_a_wrapped_requests_context_is_freed_with_it(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.replace("2/minute", "1000/minute"))
    app = Edgeway.from_policy(path, store=MemoryStore()).wrap(starlette_app())
    async with client(app) as http:
        assert (await http.post("/api/ai/chat")).status_code == 200  # warm

        async def chat_request() -> None:
            assert (await http.post("/api/ai/chat")).status_code == 200

        # the scope and its context no longer point at each other once a request is done
        assert await contexts_left(chat_request) <= 1
