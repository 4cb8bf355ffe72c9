"""Rate-limit regressions (issue 8) through the middleware, on memory, a real redis-server and PostgreSQL.

- cost_from debits are charged when the client leaves before the last chunk (item 4);
- large sliding-log debits neither fail nor mark a healthy Redis down (item 3);
- a limit switching algorithms reads a fresh key, never another algorithm's structure (item 3);
- all keys of one route's script share one hash tag whatever the limits' key settings (item 12).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from edgeway.middleware.pipeline import PolicyPipeline
from edgeway.middleware.ratelimit import Limit, RateLimitMiddleware, RateLimitPolicy
from edgeway.middleware.store import Command, CommandError, RateLimit, Store
from edgeway.middleware.store.failover import FailoverStore
from edgeway.middleware.store.memory import MemoryStore
from edgeway.middleware.store.postgres import PostgresStore
from edgeway.middleware.store.redis import RedisStore
from tests.clock import Clock

CLIENT = "203.0.113.7"
T0 = 1_700_000_020.0


@pytest.fixture(params=["memory", "redis", "postgres"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    clock = Clock(T0)
    if request.param == "memory":
        made: Store = MemoryStore(clock=clock)
    elif request.param == "redis":
        made = RedisStore(request.getfixturevalue("redis_url"), clock=clock, timeout=5.0)
    else:
        made = PostgresStore(request.getfixturevalue("postgres_dsn"), clock=clock, timeout=5.0)
    yield made
    await made.close()


def scope(path: str = "/", client: str = CLIENT) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "headers": [(b"host", b"test")],
            "client": (client, 5000), "server": ("test", 80)}


class Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


async def call(app: Any, *, leave_after_first_chunk: bool = False) -> Response:
    """One request; ``leave_after_first_chunk``: the client is gone once the first body chunk was sent."""
    response = Response()
    chunks = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal chunks
        if message["type"] == "http.response.start":
            response.status = message["status"]
            response.headers = list(message.get("headers", ()))
        elif message["type"] == "http.response.body":
            chunks += 1
            if leave_after_first_chunk and chunks > 1:
                raise OSError("client disconnected")

    with contextlib.suppress(OSError):
        await app(scope(), receive, send)
    for _ in range(20):  # let the deferred debit run
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    return response


def reporting_app(header: bytes | None, body: bytes, *, stop_early: bool = False) -> Any:
    """An upstream reporting its cost in a header and/or the JSON body, in two chunks.

    ``stop_early``: it stops after the first chunk without sending the last one, as the proxy does when the
    client disconnects.
    """

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"application/json")]
        if header is not None:
            headers.append((b"x-tokens-used", header))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        half = len(body) // 2
        await send({"type": "http.response.body", "body": body[:half], "more_body": True})
        if stop_early:
            return
        await send({"type": "http.response.body", "body": body[half:]})

    return app


def route() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.mark.parametrize("how", ["complete", "client-left", "app-stopped"])
async def test_a_header_cost_is_debited_even_when_the_client_leaves(store: Store, how: str) -> None:
    """1000 tokens per minute, responses reporting 400: 200, 200, 200, 429 however the responses end."""
    limit = Limit(rate="1000/minute", cost_from="response_header:X-Tokens-Used", algorithm="fixed-window")
    app = RateLimitMiddleware(reporting_app(b"400", b'{"text": "hello"}', stop_early=how == "app-stopped"),
                              limits=[limit], store=store, route=route())
    statuses = [(await call(app, leave_after_first_chunk=how == "client-left")).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


async def test_a_header_cost_is_charged_at_the_response_start_not_the_end_of_the_stream(store: Store) -> None:
    """While a long stream is still running, its reported cost already counts against the next request."""
    limit = Limit(rate="1000/minute", cost_from="response_header:X-Tokens-Used", algorithm="fixed-window")
    name = route()
    release = asyncio.Event()

    async def long_stream(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-tokens-used", b"400")]})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await release.wait()
        await send({"type": "http.response.body", "body": b""})

    streaming = asyncio.create_task(call(RateLimitMiddleware(long_stream, limits=[limit], store=store, route=name)))
    for _ in range(50):
        await asyncio.sleep(0.002)
    probe = await call(RateLimitMiddleware(_ok, limits=[limit], store=store, route=name))
    release.set()
    await streaming
    assert probe.header(b"ratelimit") == b'"minute";r=599;t=20'  # 1000 - 1 - 399 (debited at the start) - 1


async def test_an_incomplete_json_cost_leaves_the_up_front_cost_charged(store: Store) -> None:
    limit = Limit(rate="10/minute", cost_from="usage.total_tokens", algorithm="fixed-window", cost=2)
    body = b'{"usage": {"total_tokens": 9}, "text": "a long answer"}'
    name = route()
    partial = RateLimitMiddleware(reporting_app(None, body, stop_early=True), limits=[limit], store=store, route=name)
    first = await call(partial)
    assert first.header(b"ratelimit") == b'"minute";r=8;t=20'
    second = await call(partial)
    assert second.header(b"ratelimit") == b'"minute";r=6;t=20'  # only the up-front 2 each time, never skipped
    complete = RateLimitMiddleware(reporting_app(None, body), limits=[limit], store=store, route=name)
    third = await call(complete)
    assert third.header(b"ratelimit") == b'"minute";r=4;t=20'
    assert (await call(complete)).status == 429  # 4 - 7 debited: spent


async def test_large_sliding_log_debits_keep_redis_healthy_and_counted(redis_url: str) -> None:
    clock = Clock(T0)
    store = FailoverStore(RedisStore(redis_url, clock=clock, timeout=5.0), [MemoryStore(clock=clock)], failures=3,
                          probe_initial=60)
    limits = [Limit(rate="100000/minute", algorithm="sliding-log", cost_from="response_header:X-Tokens-Used"),
              Limit(rate="100000/hour", algorithm="fixed-window")]
    app = RateLimitMiddleware(reporting_app(b"5000", b"{}"), limits=limits, store=store, route=route())
    try:
        for _ in range(3):
            assert (await call(app)).status == 200
        last = await call(app)
        assert last.header(b"ratelimit") == b'"minute";r=84999;t=60, "hour";r=99996;t=2780'
        assert store.kind == "redis" and store.status()[0]["healthy"] is True
    finally:
        await store.close()


@pytest.mark.parametrize(("before", "after"), [("sliding-log", "token-bucket"), ("token-bucket", "sliding-log"),
                                               ("fixed-window", "sliding-window")])
async def test_switching_a_limits_algorithm_starts_a_fresh_counter(store: Store, before: str, after: str) -> None:
    """A reload that changes ``algorithm:`` must not read the old key's structure (WRONGTYPE on Redis)."""
    name = route()
    old = RateLimitMiddleware(_ok, limits=[Limit(rate="3/minute", algorithm=before)], store=store, route=name)
    for _ in range(3):
        assert (await call(old)).status == 200
    new = RateLimitMiddleware(_ok, limits=[Limit(rate="3/minute", algorithm=after)], store=store, route=name)
    answer = await call(new)
    assert answer.status == 200
    assert answer.header(b"ratelimit") is not None  # decided by the store, not by the failure mode


async def _ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


class Recording(Store):
    kind = "recording"

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.keys: list[str] = []

    async def execute(self, commands: Sequence[Command], *, timeout: float | None = None) -> list[object]:
        for command in commands:
            if isinstance(command, RateLimit):
                self.keys.extend(check.key for check in command.checks)
        return await self.inner.execute(commands, timeout=timeout)

    async def ping(self) -> None:
        return None


def tag(key: str) -> str:
    return key[key.index("{") + 1 : key.index("}")]


@pytest.mark.parametrize("limits", [
    [Limit(rate="10/second", ipv6_prefix=64), Limit(rate="100/minute", ipv6_prefix=48)],
    [Limit(rate="10/second", key="header:X-Api-Key"), Limit(rate="100/minute", key="header:X-Api-Key",
                                                                 on_missing="deny")],
    [Limit(rate="10/second"), Limit(rate="100/minute", key=["ip", "header:X-Api-Key"])],
    [Limit(rate="10/second"), Limit(rate="100/minute")],
], ids=["ipv6-prefix", "on-missing", "key", "same"])
async def test_all_keys_of_a_route_share_one_hash_tag(limits: list[Limit]) -> None:
    recording = Recording()
    app = PolicyPipeline(_ok, policies=[RateLimitPolicy(limits, route="0:/api")], store=recording, route="0:/api")
    request = scope("/api")
    request["client"] = ("2001:db8:1:2::7", 5000)
    request["headers"].append((b"x-api-key", b"secret{x}"))
    await app(request, _receive, _ignore)
    assert len(recording.keys) == 2
    assert len({tag(key) for key in recording.keys}) == 1, recording.keys
    assert [key.rsplit(":", 1)[1] for key in recording.keys] == ["sw", "sw"]  # the algorithm is in the key


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _ignore(message: dict[str, Any]) -> None:
    return None


class Refusing(Store):
    """A working store that refuses every rate-limit command on its merits (as a script error would be)."""

    kind = "refusing"

    async def execute(self, commands: Sequence[Command], *, timeout: float | None = None) -> list[object]:
        return [CommandError("ERR edgeway: bad limit") if isinstance(c, RateLimit) else None for c in commands]

    async def ping(self) -> None:
        return None


@pytest.mark.parametrize(("on_store_failure", "status"), [("open", 200), ("closed", 503)])
async def test_a_refused_command_is_that_requests_failure_mode(on_store_failure: str, status: int) -> None:
    limit = Limit(rate="10/minute", on_store_failure=on_store_failure)  # type: ignore[arg-type]
    app = RateLimitMiddleware(_ok, limits=[limit], store=Refusing(), route=route())
    answer = await call(app)
    assert answer.status == status and answer.header(b"ratelimit") is None
