"""Pure pieces behind issue 9: Forwarded quoting, Host grammar, path normalising, server defaults, failures."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest

from edgeway.gateway import create_app, load_text
from edgeway.gateway.config import ServerConfig, Upstream
from edgeway.gateway.headers import forwarded_value, request_problem
from edgeway.gateway.routing import needs_normalizing, normalize_path
from edgeway.gateway.server import PROTOCOLS, error_bytes, uvicorn_options


@pytest.mark.parametrize(
    "value,expected",
    [("127.0.0.1", "127.0.0.1"), ("http", "http"), ("[::1]", '"[::1]"'), ("x:80", '"x:80"'),
     ('x", for=6.6.6.6;proto=https;host="evil', '"x\\", for=6.6.6.6;proto=https;host=\\"evil"'),
     ("a\\b", '"a\\\\b"')],
)
def test_forwarded_values_are_tokens_or_escaped_quoted_strings(value: str, expected: str) -> None:
    assert forwarded_value(value) == expected


def test_forwarded_host_is_always_quoted() -> None:
    assert forwarded_value("example.com", quote=True) == '"example.com"'


def scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"path": "/x", "raw_path": b"/x", "http_version": "1.1", "headers": list(headers)}


@pytest.mark.parametrize("host", [b"example.com", b"example.com:8080", b"10.0.0.1", b"[::1]:80", b"[2001:db8::1]",
                                  b"xn--bcher-kva.example", b"a%41b", b"host:"])
def test_valid_hosts(host: bytes) -> None:
    assert request_problem(scope((b"host", host))) is None


@pytest.mark.parametrize("host", [b'x", for=6.6.6.6', b"evil example", b"a/p?q", b"user@host", b"a#b", b"[::1",
                                  b"x:8o", b"%zz"])
def test_invalid_hosts(host: bytes) -> None:
    assert request_problem(scope((b"host", host))) == (
        "invalid Host header: expected host[:port] (a name, an IPv4 address or an [IPv6] literal)")


@pytest.mark.parametrize("value,problem", [(b"5 ", None), (b" 5\t", None), (b"5x", "Content-Length must be one "
                                                                                     "decimal number"),
                                           (b"", "Content-Length must be one decimal number")])
def test_content_length_is_validated(value: bytes, problem: str | None) -> None:
    assert request_problem(scope((b"host", b"x"), (b"content-length", value))) == problem


def test_differing_content_lengths_are_refused() -> None:
    assert request_problem(scope((b"host", b"x"), (b"content-length", b"5"), (b"content-length", b"6"))) == (
        "Content-Length must be one decimal number")


def test_underscore_names_refused_only_when_asked() -> None:
    request = scope((b"host", b"x"), (b"x_edgeway_user", b"admin"))
    assert request_problem(request) is None
    assert request_problem(request, reject_underscores=True) == (
        "header names with '_' are not allowed (headers_with_underscores: reject)")


@pytest.mark.parametrize(
    "path,raw,expected_path,expected_raw",
    [("/a/b", b"/a/b", "/a/b", b"/a/b"),
     ("//limited/x", b"//limited/x", "/limited/x", b"/limited/x"),
     ("//limited/x", b"/%2flimited/x", "/limited/x", b"/limited/x"),
     ("/a b", b"/a%20b", "/a b", b"/a%20b"),
     ("/a/b", b"/a%2Fb", "/a/b", b"/a/b"),
     ("/é/%", b"/%C3%A9/%25", "/é/%", b"/%C3%A9/%25"),
     ("/a;b//c", b"/a;b//c", "/a;b/c", b"/a;b/c")],
)
def test_normalize_path(path: str, raw: bytes, expected_path: str, expected_raw: bytes) -> None:
    assert normalize_path(path, raw) == (expected_path, expected_raw)


def test_plain_paths_skip_normalising() -> None:
    assert not needs_normalizing("/api/items/42", b"/api/items/42")
    assert needs_normalizing("/a;b", b"/a;b") and needs_normalizing("/a\\b", b"/a\\b")
    assert needs_normalizing("/a b", b"/a%20b")


def test_server_defaults_are_the_documented_ones() -> None:
    server = ServerConfig()
    assert (server.header_timeout, server.keepalive_timeout, server.client_body_timeout) == (10.0, 75.0, 10.0)
    assert (server.max_header_bytes, server.max_headers, server.request_buffer) == (65_536, 100, 65_536)
    assert (server.max_request_body, server.max_connections) == (10_000_000, 10_000)
    assert server.headers_with_underscores == "drop"
    upstream = Upstream(url="http://127.0.0.1:1")
    assert (upstream.max_pending, upstream.timeout.pool) == (1024, 1.0)


def test_serve_uses_the_edge_protocols() -> None:
    assert uvicorn_options()["http"] == PROTOCOLS["httptools"] == "edgeway.gateway.server:EdgeHttpToolsProtocol"
    assert uvicorn_options("h11")["http"] == "edgeway.gateway.server:EdgeH11Protocol"
    assert uvicorn_options()["proxy_headers"] is False


def test_protocol_refusals_are_json_and_close() -> None:
    data = error_bytes(431, "too big")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"\r\nedgeway-error: headers_too_large\r\n" in head and b"\r\nconnection: close" in head
    assert body == b'{"error":"headers_too_large","message":"too big"}'


POLICY = """
version: 1
upstreams:
  api: { url: "http://127.0.0.1:9" }
routes:
  - match: { path: /* }
    upstream: api
"""


async def test_an_unexpected_failure_is_a_json_500_logged_once_without_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    gateway = create_app(load_text(POLICY))

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise ValueError("Invalid something: '5 '")

    route = gateway._active.routes.routes[0]
    object.__setattr__(route, "app", broken)
    caplog.set_level(logging.WARNING)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gw") as client:
        responses = [await client.get("/x") for _ in range(5)]
    assert {r.status_code for r in responses} == {500}
    assert responses[0].json()["error"] == "internal_error"
    assert responses[0].headers["edgeway-error"] == "internal_error"
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].exc_info is None
    await gateway.close()
