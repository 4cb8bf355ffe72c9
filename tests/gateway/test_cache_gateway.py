"""The cache in the gateway, against a real upstream: poisoning checks, streams, stale on errors, purge.

The upstream under uvicorn counts its calls and echoes what could poison an entry (the method it
saw, forwarded hosts, URL overrides, the body), so a poisoned entry would show in what an ordinary
client is served afterwards.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import Served, raw_http, serve_gateway
from tests.servers import UvicornThread, lifespan, read_body

TOKEN = "purge-token"
BIG = 10 * 1024 * 1024
CHUNK = 64 * 1024


class Upstream:
    """Counting upstream; ``/big`` streams 10 MB and holds after the first chunk until ``release`` is set."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = threading.Event()
        self.slow = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = await read_body(receive)
        self.calls += 1
        path = scope["path"]
        if path == "/big":
            await self._big(send)
            return
        if path == "/slow" and self.slow:
            await asyncio.sleep(2)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        payload = {
            "call": self.calls,
            "method": scope["method"],
            "x-forwarded-host": headers.get("x-forwarded-host"),
            "x-original-url": headers.get("x-original-url"),
            "override": headers.get("x-http-method-override"),
            "body": body.decode("latin-1"),
        }
        answer = json.dumps(payload).encode()
        extra = [(b"cache-tag", b"items")] if path.startswith("/tagged") else []
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode()),
                                *extra]})
        await send({"type": "http.response.body", "body": answer})

    async def _big(self, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream")]})
        await send({"type": "http.response.body", "body": b"\x00" * CHUNK, "more_body": True})
        for _ in range(500):  # bounded: at most 5 s
            if self.release.is_set():
                break
            await asyncio.sleep(0.01)
        for _ in range(BIG // CHUNK - 1):
            await send({"type": "http.response.body", "body": b"\x01" * CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def policy(port: int) -> str:
    return f"""
version: 1
upstreams:
  up: {{ url: "http://127.0.0.1:{port}", timeout: {{ connect: 1s, read: 500ms }} }}
routes:
  - match: {{ path: /ai/*, methods: [POST] }}
    upstream: up
    cache: {{ ttl: 1h, key: [method, path, body], tags: [ai] }}
  - match: {{ path: /swr/* }}
    upstream: up
    cache: {{ ttl: 1h, stale_while_revalidate: 1h }}
  - match: {{ path: /* }}
    upstream: up
    cache: {{ ttl: 1h, stale_if_error: 1h, tag_header: Cache-Tag }}
admin:
  token: {TOKEN}
"""


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[Upstream, UvicornThread]]:
    app = Upstream()
    with UvicornThread(app, http="h11") as server:
        yield app, server


@pytest.fixture(scope="module")
def gateway(upstream: tuple[Upstream, UvicornThread]) -> Iterator[Served]:
    with serve_gateway(policy(upstream[1].port)) as served:
        yield served


@pytest.fixture
def client(gateway: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=10) as made:
        yield made


def settle(gateway: Served) -> None:
    """Wait until the gateway's requests, deferred writes (fills) and background refreshes are done (bounded: 5 s).

    A client can have the whole response before the server's request task reaches its deferred writes.
    """
    for _ in range(500):
        pending = [gateway.server.server.server_state.tasks]
        pending += [route.app._background for route in gateway.app.routes.routes if hasattr(route.app, "_background")]
        pending += [policy._refreshes for policy in gateway.app.routes.cache_policies()]
        if not any(pending):
            return
        threading.Event().wait(0.01)


def fetch(client: httpx.Client, gateway: Served, url: str, **kwargs: Any) -> httpx.Response:
    response = client.get(url, **kwargs)
    settle(gateway)
    return response


# -- cache poisoning ---------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["X-Forwarded-Host", "X-Original-URL", "X-HTTP-Method-Override"])
def test_unkeyed_override_headers_never_change_what_others_are_served(
    client: httpx.Client, gateway: Served, header: str
) -> None:
    path = f"/poison/{header.lower()}"
    attack = fetch(client, gateway, path, headers={header: "evil.example"})
    assert attack.headers["cache-status"] == "edgeway; fwd=bypass; detail=unkeyed-header"
    ordinary = fetch(client, gateway, path)
    again = fetch(client, gateway, path)
    assert "evil" not in ordinary.text and again.json() == ordinary.json()
    assert again.headers["cache-status"].startswith("edgeway; hit")


def test_fat_get_body_never_changes_what_others_are_served(client: httpx.Client, gateway: Served) -> None:
    attack = client.request("GET", "/poison/fat", content=b"evil body")
    settle(gateway)
    assert attack.headers["cache-status"] == "edgeway; fwd=bypass; detail=request-body"
    ordinary = fetch(client, gateway, "/poison/fat")
    assert ordinary.json()["body"] == "" and ordinary.headers["cache-status"] == "edgeway; fwd=miss; stored"


def test_a_different_host_never_changes_what_others_are_served(client: httpx.Client, gateway: Served) -> None:
    attack = fetch(client, gateway, "/poison/host", headers={"host": "evil.example"})
    assert attack.json()["x-forwarded-host"] == "evil.example"
    ordinary = fetch(client, gateway, "/poison/host")
    assert ordinary.json()["x-forwarded-host"] != "evil.example"
    assert ordinary.headers["cache-status"] == "edgeway; fwd=miss; stored"


def test_repeated_query_parameters_keep_their_order(client: httpx.Client, gateway: Served) -> None:
    first = fetch(client, gateway, "/order?a=1&a=2&b=3")
    assert fetch(client, gateway, "/order?b=3&a=1&a=2").json() == first.json()  # names sorted
    assert fetch(client, gateway, "/order?a=2&a=1&b=3").json()["call"] != first.json()["call"]  # values not


def test_answers_to_malformed_requests_are_never_stored(gateway: Served, client: httpx.Client) -> None:
    bad = raw_http(gateway.port, b"GET /malformed HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert bad.status == 400
    fine = fetch(client, gateway, "/malformed")
    assert fine.status_code == 200 and fine.headers["cache-status"] == "edgeway; fwd=miss; stored"


def test_oversized_body_keyed_request_bypasses(client: httpx.Client, gateway: Served) -> None:
    response = client.post("/ai/chat", content=b"x" * 1_100_000, headers={"content-type": "application/json"})
    settle(gateway)
    assert response.headers["cache-status"] == "edgeway; fwd=bypass; detail=request-too-large"
    assert len(response.json()["body"]) == 1_100_000


# -- streams ----------------------------------------------------------------------------------------


def test_ten_megabytes_over_max_body_stream_through_unbuffered(
    client: httpx.Client, gateway: Served, upstream: tuple[Upstream, UvicornThread]
) -> None:
    app, _ = upstream
    app.release.clear()
    received = 0
    with client.stream("GET", "/big") as response:
        chunks = response.iter_raw()
        first = next(chunks)  # arrives while the upstream still holds the other 10 MB back
        assert first and not app.release.is_set()
        app.release.set()
        received = len(first) + sum(len(chunk) for chunk in chunks)
    assert received == BIG
    calls = app.calls
    settle(gateway)
    again = client.get("/big")
    assert len(again.content) == BIG and app.calls == calls + 1  # passed through, not stored


# -- stale on upstream failure, purge through the admin API --------------------------------------------------


def test_upstream_timeout_serves_the_stale_entry(
    client: httpx.Client, gateway: Served, upstream: tuple[Upstream, UvicornThread]
) -> None:
    app, _ = upstream
    fresh = fetch(client, gateway, "/slow")
    policy = gateway.app.routes.cache_policies(path="/slow")[0]
    real_clock = policy.clock
    policy.clock = lambda: real_clock() + 4000  # stale (ttl 1h), within stale_if_error (1h more)
    app.slow = True
    try:
        stale = fetch(client, gateway, "/slow")
    finally:
        app.slow = False
        policy.clock = real_clock
    assert stale.status_code == 200 and stale.json() == fresh.json()
    assert stale.headers["cache-status"] == "edgeway; hit; stale"


def purge(client: httpx.Client, body: object, token: str = TOKEN) -> httpx.Response:
    return client.post("/_edgeway/cache/purge", json=body, headers={"authorization": f"Bearer {token}"})


def test_purge_endpoint_by_request_tag_and_route(client: httpx.Client, gateway: Served) -> None:
    first = fetch(client, gateway, "/items?page=1")
    fetch(client, gateway, "/tagged/1")
    assert purge(client, {"url": "/items?page=1"}).json() == {"purged": 1}
    assert fetch(client, gateway, "/items?page=1").json()["call"] != first.json()["call"]
    assert purge(client, {"tag": "items"}).json() == {"purged": 1}
    assert fetch(client, gateway, "/tagged/1").headers["cache-status"] == "edgeway; fwd=miss; stored"
    client.post("/ai/x", json={"q": 1})
    settle(gateway)
    assert purge(client, {"route": "/ai/*"}).json() == {"purged": 1}
    assert purge(client, {"all": True}).json()["purged"] >= 1


def test_purge_needs_the_token_and_a_valid_body(client: httpx.Client) -> None:
    assert purge(client, {"all": True}, token="wrong").status_code == 401
    bad = purge(client, {"everything": True})
    assert bad.status_code == 400 and bad.json()["error"] == "bad_request" and bad.headers["edgeway-error"]
    assert purge(client, {"route": "/nope"}).status_code == 400
    not_json = client.post("/_edgeway/cache/purge", content=b"{", headers={"authorization": f"Bearer {TOKEN}"})
    assert not_json.status_code == 400


def test_cache_status_on_every_response_of_a_cached_route(client: httpx.Client, gateway: Served) -> None:
    assert client.get("/x", headers={"authorization": "Bearer t"}).headers["cache-status"] == (
        "edgeway; fwd=bypass; detail=authorization")
    assert client.post("/x").headers["cache-status"] == "edgeway; fwd=bypass; detail=method"


def test_stale_while_revalidate_refreshes_through_the_upstream_in_the_background(
    client: httpx.Client, gateway: Served, upstream: tuple[Upstream, UvicornThread]
) -> None:
    app, _ = upstream
    first = fetch(client, gateway, "/swr/item")
    policy = gateway.app.routes.cache_policies(path="/swr/item")[0]
    real_clock = policy.clock
    policy.clock = lambda: real_clock() + 4000  # stale (ttl 1h), within stale_while_revalidate (1h more)
    try:
        calls = app.calls
        stale = fetch(client, gateway, "/swr/item")
        assert stale.headers["cache-status"] == "edgeway; hit; stale" and stale.json() == first.json()
        assert app.calls == calls + 1  # the refresh, after the stale answer
    finally:
        policy.clock = real_clock
    fresh = fetch(client, gateway, "/swr/item")
    assert fresh.json()["call"] == app.calls and fresh.headers["cache-status"].startswith("edgeway; hit; ttl=")
