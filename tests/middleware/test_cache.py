"""The response cache in an app: hits, misses, stale entries, bypasses and never-store rules, on real stores.

Every scenario runs on memory, a private redis-server and the Upstash bridge over it. The origin is an
ASGI app that counts its calls and answers what each test tells it; the cache's clock is a fake one, so
freshness and stale windows are walked without sleeping.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from edgeway.middleware import CacheMiddleware
from edgeway.middleware import cache as cache_module
from edgeway.middleware.cache import HOT_ENTRIES, HOT_FOR, HOT_MAX_SIZE
from edgeway.middleware.cache_signals import purge
from edgeway.middleware.store import Store, StoreError
from edgeway.middleware.store.memory import MemoryStore
from edgeway.middleware.store.redis import RedisStore
from edgeway.middleware.store.upstash import UpstashStore
from tests.clock import Clock
from tests.servers import BRIDGE_TOKEN, UvicornThread, read_body

T0 = 1_700_000_000.0
Headers = list[tuple[bytes, bytes]]


@dataclass
class Reply:
    status: int = 200
    headers: Headers = field(default_factory=lambda: [(b"content-type", b"application/json")])
    chunks: list[bytes] | None = None  # None: a JSON body naming the call's number
    fail_after: int | None = None  # raise after this many chunks (an interrupted stream)


class Origin:
    """Counts calls; answers ``reply`` (the same for every path unless ``by_path`` says otherwise)."""

    def __init__(self) -> None:
        self.calls = 0
        self.seen: list[dict[str, Any]] = []
        self.reply = Reply()
        self.by_path: dict[str, Reply] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await read_body(receive)
        self.calls += 1
        self.seen.append({"headers": dict(scope["headers"]), "body": body, "path": scope["path"]})
        reply = self.by_path.get(scope["path"], self.reply)
        chunks = reply.chunks if reply.chunks is not None else [json.dumps({"call": self.calls}).encode()]
        await send({"type": "http.response.start", "status": reply.status, "headers": list(reply.headers)})
        for index, chunk in enumerate(chunks):
            if reply.fail_after is not None and index == reply.fail_after:
                raise RuntimeError("the origin failed mid-stream")
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture(params=["memory", "redis", "upstash"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    made: Store
    if request.param == "memory":
        made = MemoryStore()
    elif request.param == "redis":
        made = RedisStore(request.getfixturevalue("redis_url"), timeout=5.0)
    else:
        bridge: UvicornThread = request.getfixturevalue("upstash_bridge")
        made = UpstashStore(bridge.url, token=BRIDGE_TOKEN, timeout=5.0)
    yield made
    await made.close()


@dataclass
class Cached:
    origin: Origin
    clock: Clock
    client: httpx.AsyncClient
    app: CacheMiddleware
    store: Store

    async def get(self, url: str = "/q", **kwargs: Any) -> httpx.Response:
        response = await self.client.get(url, **kwargs)
        await self.settle()
        return response

    async def post(self, url: str = "/q", **kwargs: Any) -> httpx.Response:
        response = await self.client.post(url, **kwargs)
        await self.settle()
        return response

    async def settle(self) -> None:
        """Let the deferred writes (fills, lock releases) and background refreshes reach the store."""
        while self.app._background or self.app.cache._refreshes:
            await asyncio.gather(*self.app._background, *self.app.cache._refreshes)


Make = Callable[..., Cached]


@pytest.fixture
async def make(store: Store) -> AsyncIterator[Make]:
    clients: list[httpx.AsyncClient] = []

    def build(**options: Any) -> Cached:
        origin, clock = Origin(), Clock(T0)
        options.setdefault("ttl", 60)
        app = CacheMiddleware(origin, store=store, clock=clock, key_prefix=f"t{uuid.uuid4().hex[:10]}:", **options)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cache.test")
        clients.append(client)
        return Cached(origin, clock, client, app, store)

    yield build
    for client in clients:
        await client.aclose()


def call(response: httpx.Response) -> int:
    return int(response.json()["call"])


# -- hits and misses ----------------------------------------------------------------------


def counted(status: str) -> float:
    return REGISTRY.get_sample_value("edgeway_cache_requests_total", {"route": "default", "status": status}) or 0.0


async def test_miss_then_hit_with_cache_status_and_age(make: Make) -> None:
    cached = make(ttl=60)
    hits, misses = counted("hit"), counted("miss")
    first = await cached.get()
    assert first.headers["cache-status"] == "edgeway; fwd=miss; stored"
    cached.clock.now += 12
    second = await cached.get()
    assert call(second) == call(first) == 1 and cached.origin.calls == 1
    assert second.headers["cache-status"] == "edgeway; hit; ttl=48"
    assert second.headers["age"] == "12"
    assert second.headers["content-type"] == "application/json"
    assert (counted("hit") - hits, counted("miss") - misses) == (1, 1)


async def test_expired_entry_is_a_miss(make: Make) -> None:
    cached = make(ttl=60)
    await cached.get()
    cached.clock.now += 61
    again = await cached.get()
    assert call(again) == 2 and again.headers["cache-status"] == "edgeway; fwd=miss; stored"


async def test_shorter_origin_max_age_wins(make: Make) -> None:
    cached = make(ttl=60)
    cached.origin.reply = Reply(headers=[(b"cache-control", b"max-age=10")])
    await cached.get()
    cached.clock.now += 9
    assert (await cached.get()).headers["cache-status"] == "edgeway; hit; ttl=1"
    cached.clock.now += 2
    assert call(await cached.get()) == 2


async def test_query_key_sorts_names_and_ignores_tracking_parameters(make: Make) -> None:
    cached = make(ignore_query=["utm_*"])
    await cached.get("/q?b=2&a=1&utm_source=mail")
    assert call(await cached.get("/q?a=1&b=2")) == 1
    # repeated parameters keep their order: an upstream may read them as a list
    await cached.get("/q?a=1&a=2")
    assert call(await cached.get("/q?a=2&a=1")) == 3


async def test_head_is_answered_from_a_stored_get(make: Make) -> None:
    cached = make()
    await cached.get()
    head = await cached.client.head("/q")
    assert head.status_code == 200 and head.content == b"" and head.headers["cache-status"].startswith("edgeway; hit")
    assert cached.origin.calls == 1


async def test_one_store_round_trip_per_hit(make: Make) -> None:
    cached = make()
    await cached.get()
    executed: list[int] = []
    real = cached.store.execute

    async def counting(commands: Any, **kwargs: Any) -> list[object]:
        executed.append(len(commands))
        return await real(commands, **kwargs)

    cached.app.store = cached.store  # the pipeline's view of the store
    cached.app.store.execute = counting  # type: ignore[method-assign]
    await cached.get()
    assert executed == [1]


def count_batches(cached: Cached) -> list[int]:
    """The sizes of the store batches the cache's pipeline sends from now on."""
    executed: list[int] = []
    real = cached.store.execute

    async def counting(commands: Any, **kwargs: Any) -> list[object]:
        executed.append(len(commands))
        return await real(commands, **kwargs)

    cached.app.store = cached.store
    cached.app.store.execute = counting  # type: ignore[method-assign]
    return executed


async def test_a_hot_entry_is_answered_from_memory_for_hot_for_seconds(make: Make) -> None:
    cached = make(ttl=60)
    await cached.get()  # a miss, stored
    await cached.get()  # a hit read from the store: hot from now
    executed = count_batches(cached)
    for step in range(3):
        cached.clock.now += HOT_FOR / 4
        hit = await cached.get()
        assert hit.headers["cache-status"] == f"edgeway; hit; ttl={int(60 - (step + 1) * HOT_FOR / 4)}"
        assert hit.headers["age"] == str(int((step + 1) * HOT_FOR / 4)) and call(hit) == 1
    assert executed == []  # no store command while hot
    cached.clock.now += HOT_FOR
    assert call(await cached.get()) == 1 and executed == [1]  # read again once the hot window ended


async def test_hot_hits_count_age_and_ttl_in_whole_seconds_from_the_stored_time(make: Make,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Hits of one hot entry share an answer only while its Age and ttl= stay the same: stored at a fractional
    time, each crosses to the next second at its own moment, never at the clock's whole second."""
    monkeypatch.setattr(cache_module, "HOT_FOR", 3600.0)
    cached = make(ttl=60)
    cached.clock.now = T0 + 0.35
    await cached.get()  # stored at T0 + 0.35
    stored = T0 + 0.35
    for _ in range(45):
        cached.clock.now += 0.07
        hit = await cached.get()
        age = cached.clock.now - stored
        assert hit.headers["age"] == str(int(age)), cached.clock.now - T0
        assert hit.headers["cache-status"] == f"edgeway; hit; ttl={int(60 - age)}", cached.clock.now - T0
        assert call(hit) == 1
    assert counted("hit") >= 45


async def test_a_hot_entry_still_expires_on_time(make: Make) -> None:
    cached = make(ttl=60)
    cached.origin.reply = Reply(headers=[(b"cache-control", b"max-age=2")])
    await cached.get()
    cached.clock.now += 1.5
    assert (await cached.get()).headers["cache-status"] == "edgeway; hit; ttl=0"  # hot until 1.5 + HOT_FOR
    cached.clock.now += 0.6  # past max-age, within the hot window
    assert call(await cached.get()) == 2 and cached.origin.calls == 2


async def test_a_purge_drops_hot_entries_at_once(make: Make) -> None:
    cached = make(ttl=60)
    await cached.get()
    await cached.get()  # hot
    assert await purge(cached.store, [cached.app.cache], {"all": True}) == {"purged": 1}
    assert call(await cached.get()) == 2  # no hot copy survived the purge


async def test_hot_entries_are_bounded_in_number_and_size(make: Make) -> None:
    cached = make(ttl=60)
    for n in range(HOT_ENTRIES + 5):
        await cached.get(f"/n{n}")
        await cached.get(f"/n{n}")
    assert len(cached.app.cache._hot) == HOT_ENTRIES
    big = b"x" * (HOT_MAX_SIZE + 1)
    cached.origin.by_path["/big"] = Reply(chunks=[big])
    await cached.get("/big")
    assert (await cached.get("/big")).content == big
    executed = count_batches(cached)
    assert (await cached.get("/big")).content == big and executed == [1]  # never answered from memory


# -- POST answers keyed by the JSON body ---------------------------------------------------------

AI_KEY = ["method", "path", "body"]


async def test_json_body_key_ignores_order_whitespace_and_number_spelling(make: Make) -> None:
    cached = make(key=AI_KEY)
    await cached.post(content=b'{"model": "m", "temperature": 1.0, "messages": [{"role": "user", "content": "hi"}]}',
                      headers={"content-type": "application/json"})
    again = await cached.post(content=b'{"messages":[{"content":"hi","role":"user"}],"temperature":1,"model":"m"}',
                              headers={"content-type": "application/json; charset=utf-8"})
    assert call(again) == 1 and again.headers["cache-status"].startswith("edgeway; hit")
    other = await cached.post(content=b'{"model": "m", "temperature": 0.5}',
                              headers={"content-type": "application/json"})
    assert call(other) == 2


async def test_body_include_and_exclude_paths(make: Make) -> None:
    cached = make(key=AI_KEY, body_exclude=["stream", "user", "metadata.request_id"])
    headers = {"content-type": "application/json"}
    await cached.post(json={"model": "m", "stream": False, "user": "a", "metadata": {"request_id": "1", "k": 1}},
                      headers=headers)
    hit = await cached.post(json={"model": "m", "stream": True, "user": "b", "metadata": {"request_id": "2", "k": 1}},
                            headers=headers)
    assert call(hit) == 1
    included = make(key=AI_KEY, body_include=["model", "messages"])
    await included.post(json={"model": "m", "messages": ["x"], "seed": 1}, headers=headers)
    assert call(await included.post(json={"messages": ["x"], "model": "m", "seed": 2}, headers=headers)) == 1


async def test_upstream_receives_the_body_byte_for_byte(make: Make) -> None:
    cached = make(key=AI_KEY)
    raw = b'{ "b" : 1,\n  "a": 2.50 }'
    await cached.post(content=raw, headers={"content-type": "application/json"})
    assert cached.origin.seen[0]["body"] == raw


async def test_invalid_json_body_is_hashed_as_bytes(make: Make) -> None:
    cached = make(key=AI_KEY)
    first = await cached.post(content=b"{not json", headers={"content-type": "application/json"})
    assert first.status_code == 200 and first.headers["cache-status"] == "edgeway; fwd=miss; stored"
    assert call(await cached.post(content=b"{not json", headers={"content-type": "application/json"})) == 1
    assert call(await cached.post(content=b"{not  json", headers={"content-type": "application/json"})) == 2


async def test_post_is_not_cached_unless_the_key_has_the_body(make: Make) -> None:
    cached = make()
    response = await cached.post(content=b"x")
    assert response.headers["cache-status"] == "edgeway; fwd=bypass; detail=method"
    await cached.post(content=b"x")
    assert cached.origin.calls == 2


async def test_oversized_request_body_bypasses_and_reaches_the_upstream_whole(make: Make) -> None:
    cached = make(key=AI_KEY, max_request_body=100)
    body = b"z" * 5000
    response = await cached.post(content=body)
    assert response.headers["cache-status"] == "edgeway; fwd=bypass; detail=request-too-large"
    assert cached.origin.seen[0]["body"] == body
    await cached.post(content=body)
    assert cached.origin.calls == 2


# -- never stored ------------------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "detail"), [
    ([(b"set-cookie", b"session=abc")], "set-cookie"),
    ([(b"cache-control", b"private, max-age=60")], "private"),
    ([(b"cache-control", b"no-store")], "no-store"),
    ([(b"cache-control", b"no-cache")], "no-cache"),
    ([(b"vary", b"*")], "vary-star"),
], ids=["set-cookie", "private", "no-store", "no-cache", "vary-star"])
async def test_never_stored_responses(make: Make, headers: Headers, detail: str) -> None:
    cached = make()
    cached.origin.reply = Reply(headers=headers)
    first = await cached.get()
    assert first.headers["cache-status"] == f"edgeway; fwd=miss; detail={detail}"
    second = await cached.get()
    assert call(second) == 2  # a Set-Cookie answer never reaches a second client


async def test_uncacheable_status_is_not_stored(make: Make) -> None:
    cached = make()
    cached.origin.reply = Reply(status=500)
    assert (await cached.get()).headers["cache-status"] == "edgeway; fwd=miss; detail=status"
    assert call(await cached.get()) == 2


async def test_statuses_option(make: Make) -> None:
    cached = make(statuses=[200, 404])
    cached.origin.reply = Reply(status=404)
    await cached.get()
    assert call(await cached.get()) == 1


async def test_authorized_answer_never_reaches_an_anonymous_client(make: Make) -> None:
    cached = make()
    private = await cached.get(headers={"authorization": "Bearer secret"})
    assert private.headers["cache-status"] == "edgeway; fwd=bypass; detail=authorization"
    anonymous = await cached.get()
    assert call(anonymous) == 2


async def test_cookie_requests_bypass_unless_cookies_are_ignored(make: Make) -> None:
    cached = make()
    assert (await cached.get(headers={"cookie": "a=1"})).headers["cache-status"] == (
        "edgeway; fwd=bypass; detail=cookie")
    ignoring = make(cookies="ignore")
    await ignoring.get(headers={"cookie": "a=1"})
    assert call(await ignoring.get()) == 1
    # a session cookie says who the client is: it bypasses even so
    session = await ignoring.get(headers={"cookie": "theme=dark; sb-abcd-auth-token.0=base64-eyJ"})
    assert session.headers["cache-status"] == "edgeway; fwd=bypass; detail=cookie"


async def test_per_user_entries_never_cross_users(make: Make) -> None:
    cached = make(key=["method", "path", "user"])
    users = iter(["alice", "bob", "alice"])

    async def with_user(scope: dict[str, Any], receive: Any, send: Any) -> None:
        from edgeway.middleware.context import RequestContext

        RequestContext.of(scope, cached.app.trusted).user = next(users)
        await cached.app(scope, receive, send)

    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=with_user), base_url="http://cache.test")
    alice = await client.get("/q", headers={"authorization": "Bearer a"})
    await cached.settle()
    bob = await client.get("/q", headers={"authorization": "Bearer b"})
    await cached.settle()
    alice_again = await client.get("/q", headers={"authorization": "Bearer a"})
    await client.aclose()
    assert (call(alice), call(bob), call(alice_again)) == (1, 2, 1)
    # an unverified Authorization on a user-keyed route is never filed under "anonymous"
    assert (await cached.get(headers={"authorization": "Bearer x"})).headers["cache-status"] == (
        "edgeway; fwd=bypass; detail=authorization")


async def test_response_over_max_body_passes_through_not_stored(make: Make) -> None:
    cached = make(max_body=1000)
    cached.origin.reply = Reply(chunks=[b"a" * 600, b"b" * 600])
    first = await cached.get()
    assert first.content == b"a" * 600 + b"b" * 600
    await cached.get()
    assert cached.origin.calls == 2


async def test_vary_makes_secondary_keys(make: Make) -> None:
    cached = make()
    cached.origin.reply = Reply(headers=[(b"vary", b"Accept-Language")])
    en = await cached.get(headers={"accept-language": "en"})
    fr = await cached.get(headers={"accept-language": "fr"})
    assert (call(en), call(fr)) == (1, 2)
    assert call(await cached.get(headers={"accept-language": "en"})) == 1
    assert call(await cached.get(headers={"accept-language": "fr"})) == 2
    assert cached.origin.calls == 2


async def test_header_key_part(make: Make) -> None:
    cached = make(key=["method", "path", "header:X-Team"])
    await cached.get(headers={"x-team": "a"})
    assert call(await cached.get(headers={"x-team": "b"})) == 2
    assert call(await cached.get(headers={"x-team": "a"})) == 1


async def test_binary_bodies_survive_storage(make: Make) -> None:
    cached = make()
    image = bytes(range(256)) * 40
    cached.origin.by_path["/image"] = Reply(headers=[(b"content-type", b"image/png")], chunks=[image])
    cached.origin.by_path["/gzip"] = Reply(headers=[(b"content-type", b"text/plain"), (b"content-encoding", b"gzip")],
                                           chunks=[gzip.compress(b"hello " * 1000)])
    await cached.get("/image")
    await cached.get("/gzip")
    image_hit = await cached.get("/image")
    gzip_hit = await cached.get("/gzip")
    assert image_hit.headers["cache-status"].startswith("edgeway; hit") and image_hit.content == image
    assert gzip_hit.headers["content-encoding"] == "gzip" and gzip_hit.content == b"hello " * 1000
    assert cached.origin.calls == 2


# -- streams -------------------------------------------------------------------------------------


SSE = [b"data: {\"delta\": \"Hel\"}\n\n", b"data: {\"delta\": \"lo\"}\n\n", b"data: [DONE]\n\n"]


async def test_event_stream_is_stored_and_replayed_with_its_boundaries(make: Make) -> None:
    cached = make()
    cached.origin.reply = Reply(headers=[(b"content-type", b"text/event-stream")], chunks=list(SSE))
    first = await cached.get()
    assert first.content == b"".join(SSE)
    # httpx's ASGITransport joins body messages: watch the ASGI messages themselves
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/q", "query_string": b"", "headers": [(b"host", b"cache.test")],
             "client": ("127.0.0.1", 1)}
    await cached.app(scope, receive, send)
    assert dict(sent[0]["headers"])[b"cache-status"].startswith(b"edgeway; hit")
    assert [m["body"] for m in sent[1:] if m["body"]] == SSE and cached.origin.calls == 1


async def test_interrupted_stream_is_not_stored(make: Make) -> None:
    cached = make()
    cached.origin.reply = Reply(headers=[(b"content-type", b"text/event-stream")], chunks=list(SSE), fail_after=2)
    with pytest.raises(RuntimeError):
        await cached.get()
    await cached.settle()
    cached.origin.reply = Reply()
    assert (await cached.get()).headers["cache-status"] == "edgeway; fwd=miss; stored"
    assert cached.origin.calls == 2


# -- stale entries and revalidation ------------------------------------------------------------------


async def test_stale_if_error_serves_the_stale_entry_on_502(make: Make) -> None:
    cached = make(ttl=10, stale_if_error=3600)
    await cached.get()
    cached.clock.now += 100
    cached.origin.reply = Reply(status=502)
    stale = await cached.get()
    assert stale.status_code == 200 and call(stale) == 1
    assert stale.headers["cache-status"] == "edgeway; hit; stale"
    # and the stale entry is still there for the next failure
    assert call(await cached.get()) == 1


async def test_stale_if_error_window_ends(make: Make) -> None:
    cached = make(ttl=10, stale_if_error=50)
    await cached.get()
    cached.clock.now += 61
    cached.origin.reply = Reply(status=502)
    assert (await cached.get()).status_code == 502


async def test_stale_while_revalidate_serves_stale_and_refreshes_in_the_background(make: Make) -> None:
    cached = make(ttl=10, stale_while_revalidate=30)
    await cached.get()
    cached.clock.now += 15
    stale = await cached.client.get("/q")  # answered at once; the refresh runs after it
    assert stale.headers["cache-status"] == "edgeway; hit; stale" and call(stale) == 1
    await cached.settle()
    assert cached.origin.calls == 2
    fresh = await cached.get()
    assert call(fresh) == 2 and fresh.headers["cache-status"].startswith("edgeway; hit; ttl=")


async def test_background_refresh_revalidates_with_the_entrys_validators(make: Make) -> None:
    cached = make(ttl=10, stale_while_revalidate=30)
    cached.origin.reply = Reply(headers=[(b"etag", b'"v1"'), (b"x-version", b"1")])
    await cached.get()
    cached.clock.now += 15
    cached.origin.reply = Reply(status=304, headers=[(b"etag", b'"v1"'), (b"x-version", b"2")], chunks=[])
    await cached.get()
    assert cached.origin.seen[-1]["headers"][b"if-none-match"] == b'"v1"'
    renewed = await cached.get()
    assert renewed.headers["cache-status"].startswith("edgeway; hit; ttl=") and call(renewed) == 1
    assert renewed.headers["x-version"] == "2"


async def test_without_an_app_to_call_the_refresh_runs_in_the_foreground(store: Store) -> None:
    from edgeway.middleware.cache import CachePolicy
    from edgeway.middleware.cache_settings import CacheSettings
    from edgeway.middleware.pipeline import PolicyPipeline

    clock, origin = Clock(T0), Origin()
    policy = CachePolicy(CacheSettings(ttl=10, stale_while_revalidate=30), store=store, clock=clock,
                         key_prefix=f"f{uuid.uuid4().hex[:8]}:")
    app = PolicyPipeline(origin, policies=[policy], store=store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cache.test") as client:
        await client.get("/q")
        while app._background:
            await asyncio.gather(*app._background)
        clock.now += 15
        refresher = await client.get("/q")
    assert refresher.headers["cache-status"] == "edgeway; fwd=stale; stored" and call(refresher) == 2


async def test_stale_while_revalidate_others_get_stale_at_once(make: Make) -> None:
    cached = make(ttl=10, stale_while_revalidate=30)
    await cached.get()
    cached.clock.now += 15
    policy = cached.app.cache
    key = policy._primary  # the lock another instance holds while it refreshes
    from edgeway.middleware.context import RequestContext
    from edgeway.middleware.store import Set

    scope = {"type": "http", "method": "GET", "path": "/q", "query_string": b"", "headers": [(b"host", b"cache.test")]}
    primary = key(RequestContext(scope, cached.app.trusted), "GET", b"cache.test")
    await cached.store.execute([Set(f"{primary}:lock", "someone-else", 5000)])
    stale = await cached.get()
    assert stale.headers["cache-status"] == "edgeway; hit; stale" and call(stale) == 1
    assert cached.origin.calls == 1


async def test_conditional_request_gets_304_from_a_fresh_entry(make: Make) -> None:
    cached = make()
    cached.origin.reply = Reply(headers=[(b"etag", b'"v1"'), (b"content-type", b"application/json")])
    await cached.get()
    response = await cached.get(headers={"if-none-match": 'W/"v1"'})
    assert response.status_code == 304 and response.content == b"" and cached.origin.calls == 1
    assert (await cached.get(headers={"if-none-match": '"v2"'})).status_code == 200


async def test_stale_entry_is_revalidated_and_refreshed_by_a_304(make: Make) -> None:
    cached = make(ttl=10)
    cached.origin.reply = Reply(headers=[(b"etag", b'"v1"'), (b"x-version", b"1")])
    await cached.get()
    cached.clock.now += 20
    cached.origin.reply = Reply(status=304, headers=[(b"etag", b'"v1"'), (b"x-version", b"2")], chunks=[])
    refreshed = await cached.get()
    assert cached.origin.seen[-1]["headers"][b"if-none-match"] == b'"v1"'
    assert refreshed.status_code == 200 and call(refreshed) == 1 and refreshed.headers["x-version"] == "2"
    assert refreshed.headers["cache-status"] == "edgeway; fwd=stale; fwd-status=304"
    cached.clock.now += 5
    hit = await cached.get()
    assert hit.headers["cache-status"] == "edgeway; hit; ttl=5" and hit.headers["x-version"] == "2"
    assert cached.origin.calls == 2


async def test_origin_ttl_uses_the_upstreams_freshness_only(make: Make) -> None:
    cached = make(ttl="origin")
    cached.origin.by_path["/none"] = Reply()
    cached.origin.by_path["/fresh"] = Reply(headers=[(b"cache-control", b"max-age=30")])
    assert (await cached.get("/none")).headers["cache-status"] == "edgeway; fwd=miss; detail=no-freshness"
    assert cached.origin.calls == 1
    await cached.get("/none")
    assert cached.origin.calls == 2  # nothing stored without explicit freshness
    await cached.get("/fresh")
    await cached.get("/fresh")
    assert cached.origin.calls == 3
    defaulted = make(ttl="origin", default_ttl=20)
    await defaulted.get("/none")
    assert call(await defaulted.get("/none")) == 1


async def test_cdn_ttl_rewrites_cache_control(make: Make) -> None:
    cached = make(cdn_ttl=60)
    cached.origin.reply = Reply(headers=[(b"cache-control", b"max-age=5")])
    first = await cached.get()
    assert first.headers["cache-control"] == "public, max-age=5, s-maxage=60"
    assert first.headers["cdn-cache-control"] == "max-age=60"
    assert (await cached.get()).headers["cdn-cache-control"] == "max-age=60"


# -- purge ------------------------------------------------------------------------------------


async def test_purge_by_route_tag_and_request(make: Make) -> None:
    cached = make(tags=["ai"], tag_header="Cache-Tag")
    cached.origin.by_path["/tagged"] = Reply(headers=[(b"cache-tag", b"news, sport")])
    for url in ("/a?page=1", "/a?page=2", "/tagged"):
        await cached.get(url)
    policy = cached.app.cache
    assert await purge(cached.store, [policy], {"url": "/a?page=1"}) == {"purged": 1}
    assert await purge(cached.store, [policy], {"tag": "sport"}) == {"purged": 1}
    assert cached.origin.calls == 3
    await cached.get("/a?page=1")
    await cached.get("/tagged")
    await cached.get("/a?page=2")
    assert cached.origin.calls == 5
    assert (await purge(cached.store, [policy], {"route": "/*"}))["purged"] == 3
    await cached.get("/a?page=2")
    assert cached.origin.calls == 6
    assert (await purge(cached.store, [policy], {"tag": "ai"})) == {"purged": 1}
    with pytest.raises(ValueError, match="expected"):
        await purge(cached.store, [policy], {"nothing": 1})


# -- the store failing ----------------------------------------------------------------------


class DownStore(MemoryStore):
    async def execute(self, commands: Any, *, timeout: float | None = None) -> list[object]:
        raise StoreError("down")


async def test_store_down_is_a_miss_never_an_error() -> None:
    origin = Origin()
    app = CacheMiddleware(origin, store=DownStore(), ttl=60)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cache.test") as client:
        response = await client.get("/q")
        while app._background:
            await asyncio.gather(*app._background)
        again = await client.get("/q")
    assert response.status_code == again.status_code == 200
    assert response.headers["cache-status"] == "edgeway; fwd=miss; detail=store-unavailable"
    assert origin.calls == 2


async def test_store_down_falls_back_to_memory_per_instance() -> None:
    from edgeway.middleware.store.failover import FailoverStore
    from tests.servers import free_port

    dead = RedisStore(f"redis://127.0.0.1:{free_port()}", timeout=0.2)
    chain = FailoverStore(dead, [MemoryStore()], failures=1)
    origin = Origin()
    app = CacheMiddleware(origin, store=chain, ttl=60)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cache.test") as client:
            statuses = []
            for _ in range(3):
                response = await client.get("/q")
                while app._background:
                    await asyncio.gather(*app._background)
                statuses.append((response.status_code, response.headers["cache-status"].split(";")[1].strip()))
    finally:
        await chain.close()
    assert statuses == [(200, "fwd=miss"), (200, "hit"), (200, "hit")]
    assert origin.calls == 1


class Recording(Store):
    """Another instance's store: a RedisStore whose batches are recorded."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.notifies = inner.notifies
        self.batches: list[list[object]] = []

    async def execute(self, commands: Any, *, timeout: float | None = None) -> list[object]:
        self.batches.append(list(commands))
        return await self.inner.execute(commands, timeout=timeout)

    async def ping(self) -> None:
        await self.inner.ping()

    async def subscribe(self, channel: str, handler: Any) -> Any:
        return await self.inner.subscribe(channel, handler)


async def test_a_purge_is_broadcast_to_other_instances(redis_url: str) -> None:
    from edgeway.middleware.store import IndexPurge

    prefix = f"b{uuid.uuid4().hex[:8]}:"
    here, there = RedisStore(redis_url, timeout=5.0), Recording(RedisStore(redis_url, timeout=5.0))
    apps = [CacheMiddleware(Origin(), store=store, ttl=60, key_prefix=prefix) for store in (here, there)]
    try:
        for app in apps:  # each instance listens once it served a request
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c.test") as client:
                await client.get("/q")
                while app._background:  # the fill
                    await asyncio.gather(*app._background)
                await client.get("/q")  # a hit: hot in this instance's memory
        assert apps[1].cache._hot
        channel = apps[0].cache.purge_channel
        redis = aioredis.Redis.from_url(redis_url)
        try:
            for _ in range(100):  # the subscriptions are made in the background; bounded: 5 s
                if dict(await redis.pubsub_numsub(channel)).get(channel.encode(), 0) >= 2:
                    break
                await asyncio.sleep(0.05)
        finally:
            await redis.aclose()
        assert await purge(here, [apps[0].cache], {"all": True}) == {"purged": 1}
        assert not apps[0].cache._hot
        for _ in range(100):  # bounded: 5 s
            if any(isinstance(c, IndexPurge) for batch in there.batches for c in batch):
                break
            await asyncio.sleep(0.05)
        ran = [c for batch in there.batches for c in batch if isinstance(c, IndexPurge)]
        assert ran == [IndexPurge(apps[1].cache.route_index)]
        assert not apps[1].cache._hot  # its memory copies went with the broadcast
    finally:
        await here.close()
        await there.inner.close()


async def test_a_later_policy_answering_releases_the_fill_lock(store: Store) -> None:
    from edgeway.middleware.context import RequestContext
    from edgeway.middleware.pipeline import PolicyPipeline
    from edgeway.middleware.policy import BasePolicy, Prepared
    from edgeway.middleware.responses import ErrorResponse
    from edgeway.middleware.store import Get

    class OpenBreaker(BasePolicy):
        def prepare(self, ctx: RequestContext) -> Prepared:
            return Prepared()

        def decide(self, ctx: RequestContext, prepared: Prepared, results: Any) -> ErrorResponse:
            return ErrorResponse(503, "upstream_unavailable")

    from edgeway.middleware.cache import CachePolicy
    from edgeway.middleware.cache_settings import CacheSettings

    cache = CachePolicy(CacheSettings(ttl=60), store=store, key_prefix=f"l{uuid.uuid4().hex[:8]}:")
    app = PolicyPipeline(Origin(), policies=[cache, OpenBreaker()], store=store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cache.test") as client:
        assert (await client.get("/q")).status_code == 503
        while app._background:
            await asyncio.gather(*app._background)
    scope = {"type": "http", "method": "GET", "path": "/q", "query_string": b"", "headers": [(b"host", b"cache.test")]}
    primary = cache._primary(RequestContext(scope, app.trusted), "GET", b"cache.test")
    assert await store.execute([Get(f"{primary}:lock"), Get(primary)]) == [None, None]
