"""The Upstash-compatible bridge (edgeway.gateway.upstash_bridge) over the session's redis-server."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from edgeway.gateway import upstash_bridge
from edgeway.gateway.upstash_bridge import create_bridge_app
from tests.servers import UvicornThread, free_port

TOKEN = "bridge-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _client(redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    app: Any = create_bridge_app(redis_url, TOKEN)
    async with app.router.lifespan_context(app):  # closes the Redis client at the end
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bridge") as client:
            yield client


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async for made in _client(redis_url):
        yield made


@pytest.fixture
def key() -> str:
    return f"bridge-test:{uuid.uuid4().hex[:12]}:"


async def test_requests_without_the_right_token_are_unauthorized(client: httpx.AsyncClient, key: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": "Bearer"}):
        response = await client.post("/", json=["SET", key, "v"], headers=headers)
        assert (response.status_code, response.json()) == (401, {"error": "Unauthorized"}), headers
    for path in ("/pipeline", "/multi-exec"):
        assert (await client.post(path, json=[["GET", key]])).status_code == 401
    assert (await client.get(f"/GET/{key}")).status_code == 401
    assert (await client.get(f"/GET/{key}?_token=wrong")).status_code == 401
    assert (await client.post("/", json=["GET", key], headers=AUTH)).json() == {"result": None}  # never set
    assert (await client.get(f"/PING?_token={TOKEN}")).json() == {"result": "PONG"}


async def test_single_commands(client: httpx.AsyncClient, key: str) -> None:
    async def call(*command: object) -> tuple[int, Any]:
        response = await client.post("/", json=list(command), headers=AUTH)
        return response.status_code, response.json()

    assert await call("SET", key + "s", "välue 🚀") == (200, {"result": "OK"})
    assert await call("GET", key + "s") == (200, {"result": "välue 🚀"})
    assert await call("SET", key + "n", 5, "PX", 60_000) == (200, {"result": "OK"})
    assert await call("INCRBY", key + "n", 2) == (200, {"result": 7})
    assert await call("HSET", key + "h", "a", "1", "b", "2") == (200, {"result": 2})
    assert await call("HGETALL", key + "h") == (200, {"result": ["a", "1", "b", "2"]})  # raw, as Upstash
    assert await call("EVAL", "return {1, 'two', KEYS[1]}", 1, key) == (200, {"result": [1, "two", key]})
    assert await call("DEL", key + "s", key + "n", key + "h") == (200, {"result": 3})
    assert await call("get", key + "s") == (200, {"result": None})


async def test_single_command_errors_are_400(client: httpx.AsyncClient, key: str) -> None:
    async def call(command: list[object]) -> tuple[int, Any]:
        response = await client.post("/", json=command, headers=AUTH)
        return response.status_code, response.json()

    assert await call(["GET"]) == (400, {"error": "ERR wrong number of arguments for 'get' command"})
    status, body = await call(["NOSUCHCOMMAND", key])
    assert status == 400 and body["error"].startswith("ERR unknown command")
    await call(["SET", key, "text"])
    assert await call(["INCR", key]) == (400, {"error": "ERR value is not an integer or out of range"})
    assert await call(["LPUSH", key, "x"]) == (
        400, {"error": "WRONGTYPE Operation against a key holding the wrong kind of value"}
    )
    status, body = await call(["EVALSHA", "0" * 40, 0])
    assert status == 400 and body["error"].startswith("NOSCRIPT ")  # the prefix UpstashStore looks for


async def test_pipeline_runs_in_order_with_per_command_errors(client: httpx.AsyncClient, key: str) -> None:
    commands = [
        ["SET", key, "1"],
        ["INCR", key],
        ["LPUSH", key, "x"],  # wrong type: an error entry, the rest still runs
        ["INCRBY", key, 10],
        ["GET", key],
        ["GET", key + "missing"],
    ]
    response = await client.post("/pipeline", json=commands, headers=AUTH)
    assert response.status_code == 200
    assert response.json() == [
        {"result": "OK"},
        {"result": 2},
        {"error": "WRONGTYPE Operation against a key holding the wrong kind of value"},
        {"result": 12},
        {"result": "12"},
        {"result": None},
    ]
    empty = await client.post("/pipeline", json=[], headers=AUTH)
    assert (empty.status_code, empty.json()) == (200, [])


async def test_multi_exec(client: httpx.AsyncClient, key: str) -> None:
    commands = [["SET", key, "1"], ["INCR", key], ["LPUSH", key, "x"], ["GET", key]]
    response = await client.post("/multi-exec", json=commands, headers=AUTH)
    assert response.status_code == 200
    assert response.json() == [
        {"result": "OK"},
        {"result": 2},
        {"error": "WRONGTYPE Operation against a key holding the wrong kind of value"},
        {"result": "2"},
    ]
    # a command Redis refuses to queue aborts the whole transaction: nothing runs
    aborted = await client.post("/multi-exec", json=[["SET", key, "changed"], ["GET"]], headers=AUTH)
    assert aborted.status_code == 400
    assert aborted.json()["error"].startswith("EXECABORT")
    assert (await client.post("/", json=["GET", key], headers=AUTH)).json() == {"result": "2"}


async def test_get_path_form(client: httpx.AsyncClient, key: str) -> None:
    slashed = key + "a/b"
    quoted = slashed.replace("/", "%2F")
    response = await client.get(f"/SET/{quoted}/hello%20w%C3%B6rld", headers=AUTH)
    assert (response.status_code, response.json()) == (200, {"result": "OK"})
    assert (await client.get(f"/GET/{quoted}", headers=AUTH)).json() == {"result": "hello wörld"}
    assert (await client.post("/", json=["GET", slashed], headers=AUTH)).json() == {"result": "hello wörld"}
    assert (await client.get(f"/incr/{key}n", headers=AUTH)).json() == {"result": 1}
    missing = await client.get("/GET", headers=AUTH)
    assert missing.status_code == 400 and "wrong number of arguments" in missing.json()["error"]


@pytest.mark.parametrize(("path", "body"), [
    ("/", b"{not json"),
    ("/pipeline", b"[[\"GET\", \"k\"]"),
    ("/", b"\"GET\""),
    ("/", b"[]"),
    ("/", b"[\"SET\", \"k\", true]"),
    ("/", b"[\"SET\", \"k\", null]"),
    ("/pipeline", b"{\"GET\": \"k\"}"),
    ("/pipeline", b"[\"GET\", \"k\"]"),
    ("/multi-exec", b"[[\"SET\", \"k\", {\"a\": 1}]]"),
])
async def test_malformed_bodies_are_400(client: httpx.AsyncClient, path: str, body: bytes) -> None:
    response = await client.post(path, content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400
    assert isinstance(response.json()["error"], str) and response.json()["error"]


async def test_unreachable_redis_is_503() -> None:
    async for client in _client(f"redis://127.0.0.1:{free_port()}"):  # connecting lazily: creation works
        response = await client.post("/", json=["PING"], headers=AUTH)
        assert response.status_code == 503
        assert "Redis unavailable" in response.json()["error"]


def test_needs_a_token() -> None:
    with pytest.raises(ValueError, match="token"):
        create_bridge_app("redis://127.0.0.1:6379", "")


def test_main_serves_with_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    served: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app, **options))
    argv = ["--redis", "redis://127.0.0.1:1/0", "--token", "T", "--port", "8111"]
    assert upstash_bridge.main(argv) == 0
    assert served["host"] == "127.0.0.1" and served["port"] == 8111 and callable(served["app"])
    monkeypatch.delenv("UPSTASH_REDIS_REST_TOKEN", raising=False)
    with pytest.raises(SystemExit) as exited:
        upstash_bridge.main(["--port", "8111"])
    assert exited.value.code == 2


async def test_base64_encoding_is_binary_safe(client: httpx.AsyncClient, redis_url: str, key: str) -> None:
    raw = aioredis.Redis.from_url(redis_url)
    try:
        await raw.set(key + "bin", b"\xff\x00\xc3(")
    finally:
        await raw.aclose()
    base64_headers = {**AUTH, "Upstash-Encoding": "base64"}
    commands = [["SET", key + "t", "välue"], ["GET", key + "bin"], ["GET", key + "t"], ["ECHO", "OK"],
                ["EVAL", "return {1, ARGV[1]}", 0, "ab"], ["GET", key + "none"]]
    response = await client.post("/pipeline", json=commands, headers=base64_headers)
    assert response.json() == [
        {"result": "OK"},  # the status stays as it is, as Upstash leaves it
        {"result": base64.b64encode(b"\xff\x00\xc3(").decode()},
        {"result": base64.b64encode("välue".encode()).decode()},
        {"result": "OK"},  # indistinguishable from the status: a client reads "OK" as b"OK"
        {"result": [1, "YWI="]},
        {"result": None},
    ]
    plain = await client.post("/pipeline", json=[["GET", key + "bin"]], headers=AUTH)
    assert plain.json() == [{"result": "\ufffd\x00\ufffd("}]  # without the header: text, invalid bytes replaced


async def test_subscribe_streams_server_sent_events(redis_url: str, key: str) -> None:
    with UvicornThread(create_bridge_app(redis_url, TOKEN)) as bridge:
        async with httpx.AsyncClient(base_url=bridge.url, timeout=10.0) as http:
            unauthorized = await http.post(f"/subscribe/{key}")
            assert unauthorized.status_code == 401
            async with http.stream("POST", f"/subscribe/{key}", headers=AUTH) as stream:
                assert stream.status_code == 200
                assert stream.headers["content-type"].startswith("text/event-stream")
                lines = stream.aiter_lines()
                assert await anext(lines) == f"data: subscribe,{key},1"
                published = await http.post("/", json=["PUBLISH", key, "two\nlines"], headers=AUTH)
                assert published.json() == {"result": 1}
                received = [await anext(lines) for _ in range(4)]
                assert received == ["", f"data: message,{key},two", "data: lines", ""]
