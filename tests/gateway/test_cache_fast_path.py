"""A hot cache entry answered straight from the connection's protocol (``edgeway serve``, httptools).

The fast path must send what the ASGI path sends for the same hit (status, headers, body; only the
framing may differ: a content-length instead of chunking), count and log the request the same way,
keep pipelined responses in order, honour HTTP/1.0 and ``Connection: close``, and never run for a
request that needs more than a cache lookup (a body, credentials, a rate limit).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from edgeway.middleware import cache
from edgeway.middleware.policy import Answer
from tests.gateway.conftest import Served, parse_response, raw_http, read_until_closed, serve_gateway
from tests.servers import HOST, UvicornThread, lifespan, read_body


class Origin:
    """Counts calls; ``/slow/...`` answers after 0.3 s; every answer has an ETag and a Content-Length."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        await read_body(receive)
        self.calls += 1
        if scope["path"].startswith("/slow"):
            await asyncio.sleep(0.3)
        body = json.dumps({"path": scope["path"], "call": self.calls}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"etag", b'"v1"'), (b"x-origin", b"yes")]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module", autouse=True)
def hot_for_the_whole_test() -> Iterator[None]:
    """Entries stay hot for an hour here: a slow machine must not turn a fast-path hit into a store read."""
    kept = cache.HOT_FOR
    cache.HOT_FOR = 3600.0
    yield
    cache.HOT_FOR = kept


@pytest.fixture(scope="module")
def origin() -> Iterator[tuple[Origin, UvicornThread]]:
    app = Origin()
    with UvicornThread(app, http="h11") as server:
        yield app, server


@pytest.fixture(scope="module")
def served(origin: tuple[Origin, UvicornThread]) -> Iterator[Served]:
    policy = f"""
version: 1
upstreams:
  up: {{ url: "http://127.0.0.1:{origin[1].port}" }}
routes:
  - match: {{ path: /limited/* }}
    upstream: up
    limits: [{{ rate: 3/minute, key: ip }}]
    cache: {{ ttl: 1h }}
  - match: {{ path: /* }}
    upstream: up
    cache: {{ ttl: 1h }}
"""
    with serve_gateway(policy, http="httptools") as gateway:
        yield gateway


class Spy:
    """Wraps the gateway's ``answer_now``: which requests the fast path answered."""

    def __init__(self, served: Served) -> None:
        self.answered: list[str] = []
        real: Callable[[Any], Answer | None] = type(served.app).answer_now.__get__(served.app)

        def spying(scope: Any) -> Answer | None:
            answer = real(scope)
            if answer is not None:
                self.answered.append(scope["path"])
            return answer

        served.app.answer_now = spying  # type: ignore[method-assign]  # read by each new connection


@pytest.fixture
def spy(served: Served) -> Iterator[Spy]:
    made = Spy(served)
    yield made
    del served.app.answer_now  # type: ignore[method-assign]


def hot(served: Served, path: str) -> httpx.Response:
    """Miss (stored), then a hit read from the store: the entry is hot afterwards. Returns that hit."""
    with httpx.Client(base_url=served.url) as client:
        assert client.get(path).headers["cache-status"] == "edgeway; fwd=miss; stored"
        for _ in range(200):  # the fill is a deferred write (bounded: 2 s)
            hit = client.get(path)
            if hit.headers["cache-status"].startswith("edgeway; hit"):
                return hit
            time.sleep(0.01)
    raise AssertionError(f"{path} was never a hit")


def host(served: Served) -> bytes:
    """The Host httpx sends: the cache key includes it (a raw request with another Host is another entry)."""
    return f"{HOST}:{served.port}".encode()


def requests_counted(route: str) -> float:
    return REGISTRY.get_sample_value("edgeway_requests_total", {"route": route, "method": "GET", "status": "200"}) \
        or 0.0


def test_a_hot_hit_is_answered_at_once_as_the_asgi_path_answers_it(served: Served, spy: Spy) -> None:
    via_asgi = hot(served, "/same")
    assert spy.answered == []
    route = served.app.routes.match("/same", "GET").name  # type: ignore[union-attr]
    before = requests_counted(route)
    fast = httpx.get(f"{served.url}/same")
    assert spy.answered == ["/same"]
    assert (fast.status_code, fast.content) == (via_asgi.status_code, via_asgi.content)

    def comparable(response: httpx.Response) -> list[tuple[str, str]]:
        return [(k, v) for k, v in response.headers.multi_items() if k not in ("age", "cache-status")]

    assert comparable(fast) == comparable(via_asgi)
    assert fast.headers["cache-status"].startswith("edgeway; hit; ttl=")
    assert requests_counted(route) == before + 1


def test_head_and_a_matching_conditional_request(served: Served, spy: Spy) -> None:
    got = hot(served, "/cond")
    head = raw_http(served.port, b"HEAD /cond HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host(served))
    assert head.status == 200 and head.body == b""
    assert head.header("content-length") == str(len(got.content))
    not_modified = raw_http(served.port, b'GET /cond HTTP/1.1\r\nHost: %s\r\nIf-None-Match: "v1"\r\n'
                                         b"Connection: close\r\n\r\n" % host(served))
    assert not_modified.status == 304 and not_modified.body == b"" and not_modified.header("etag") == '"v1"'
    assert spy.answered == ["/cond", "/cond"]


def test_http_1_0_gets_connection_close_and_the_connection_ends(served: Served, spy: Spy) -> None:
    got = hot(served, "/old")
    # raw_http reads until the server closes the connection
    answer = raw_http(served.port, b"GET /old HTTP/1.0\r\nHost: %s\r\n\r\n" % host(served))
    assert answer.status == 200 and answer.body == got.content and answer.header("connection") == "close"
    assert spy.answered == ["/old"]


def test_pipelined_requests_are_answered_in_order(served: Served, origin: tuple[Origin, UvicornThread],
                                                  spy: Spy) -> None:
    hot(served, "/p1")
    hot(served, "/p2")
    calls = origin[0].calls
    # a slow miss first: the hot ones behind it must wait for it, in order
    pipelined = (b"GET /slow/x HTTP/1.1\r\nHost: %(h)s\r\n\r\nGET /p1 HTTP/1.1\r\nHost: %(h)s\r\n\r\n"
                 b"GET /p2 HTTP/1.1\r\nHost: %(h)s\r\nConnection: close\r\n\r\n") % {b"h": host(served)}
    with socket.create_connection((HOST, served.port), timeout=5) as sock:
        sock.sendall(pipelined)
        data = read_until_closed(sock)
    bodies = []
    while data:
        response = parse_response(data)
        length = int(response.header("content-length") or 0)
        head_end = data.index(b"\r\n\r\n") + 4
        bodies.append(json.loads(data[head_end:head_end + length])["path"])
        data = data[head_end + length:]
    assert bodies == ["/slow/x", "/p1", "/p2"]
    assert origin[0].calls == calls + 1  # only the slow miss went upstream


def test_hot_hits_back_to_back_on_one_connection(served: Served, spy: Spy) -> None:
    got = hot(served, "/ka")
    with httpx.Client(base_url=served.url) as client:
        answers = [client.get("/ka") for _ in range(5)]
    assert all(a.status_code == 200 and a.content == got.content for a in answers)
    assert spy.answered == ["/ka"] * 5


def test_requests_needing_more_than_a_lookup_take_the_asgi_path(served: Served, origin: tuple[Origin, UvicornThread],
                                                                spy: Spy) -> None:
    hot(served, "/more")
    calls = origin[0].calls
    with_body = raw_http(served.port, b"GET /more HTTP/1.1\r\nHost: %s\r\nContent-Length: 5\r\n"
                                      b"Connection: close\r\n\r\nhello" % host(served))
    assert with_body.status == 200 and with_body.header("cache-status") == "edgeway; fwd=bypass; detail=request-body"
    authorized = httpx.get(f"{served.url}/more", headers={"authorization": "Bearer x"})
    assert authorized.headers["cache-status"].startswith("edgeway; fwd=bypass")
    normalised = httpx.get(f"{served.url}//more")  # a path to normalise: the ASGI path, then a hit
    assert normalised.status_code == 200
    assert spy.answered == []
    assert origin[0].calls == calls + 2  # the body and the credentials went upstream


def test_a_rate_limited_route_is_never_answered_without_its_limit(served: Served, spy: Spy) -> None:
    hot(served, "/limited/x")  # 2 of the 3 allowed
    statuses = [httpx.get(f"{served.url}/limited/x").status_code for _ in range(3)]
    assert statuses == [200, 429, 429]
    assert spy.answered == []
