"""The proxy is faithful: methods, statuses, targets, headers and bodies pass as sent, both parsers."""

from __future__ import annotations

import socket

import httpx
import pytest

from .conftest import GZIP_BODY, HOST, EchoApp, RawUpstream, Served, marker, parse_response, raw_http

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def upstream_headers(record: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in record["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


def only(echo: EchoApp, token: str) -> dict:
    records = echo.find(token)
    assert len(records) == 1, records
    return records[0]


# ----------------------------------------------------------------------------- methods and statuses


@pytest.mark.parametrize("method", METHODS)
def test_methods_pass_through(gw: Served, echo: EchoApp, method: str) -> None:
    token = marker()
    body = f"payload for {method}".encode() if method in ("POST", "PUT", "PATCH", "DELETE") else b""
    with httpx.Client() as client:
        response = client.request(method, f"{gw.url}/api/echo/{token}", content=body or None)
    assert response.status_code == 200
    record = only(echo, token)
    assert record["method"] == method
    assert record["body_len"] == len(body)
    if method == "HEAD":
        assert response.content == b""
        assert int(response.headers["content-length"]) > 0  # the upstream's length of the GET body, passed on
    else:
        assert response.json()["method"] == method


@pytest.mark.parametrize("code", [200, 201, 204, 304, 404, 500])
def test_upstream_status_codes_pass_back_unchanged(gw: Served, code: int) -> None:
    with httpx.Client() as client:
        response = client.get(f"{gw.url}/api/status/{code}")
    assert response.status_code == code
    assert response.headers["x-upstream-status"] == str(code)
    assert "edgeway-error" not in response.headers  # the upstream's own answer, not the gateway's
    if code in (204, 304):
        assert response.content == b""
    else:
        assert response.content == f"status {code} from upstream".encode()


@pytest.mark.parametrize("code", [301, 302, 307])
def test_redirects_are_passed_back_not_followed(gw: Served, echo: EchoApp, code: int) -> None:
    before = len(echo.find("/elsewhere/"))
    with httpx.Client(follow_redirects=False) as client:
        response = client.get(f"{gw.url}/api/status/{code}")
    assert response.status_code == code
    assert response.headers["location"] == "/elsewhere/target?x=1&y=%2F"
    assert len(echo.find("/elsewhere/")) == before  # the gateway did not follow it


# ----------------------------------------------------------------------------- targets


def test_query_string_is_forwarded_byte_exact(gw: Served, echo: EchoApp) -> None:
    token = marker()
    query = (f"id={token}&a=1&a=2&a=&empty=&flag&enc=%20%2B%26%3D%2F%3F%23&plus=a+b&utf=%C3%A9%E2%9C%93"
             "&semi=x;y&tilde=~&star=*&comma=1,2&colon=a:b&at=@&q=%25&upper=%3a%3A&dollar=$&bang=!")
    response = raw_http(gw.port, f"GET /api/echo/q?{query} HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n"
                        .encode())
    assert response.status == 200
    assert only(echo, token)["query_string"] == query
    assert response.json()["query_string"] == query


def test_request_line_reaches_upstream_byte_exact(gw: Served, raw_upstream: RawUpstream) -> None:
    """Read off the upstream's socket: the request line is the client's path and query, unchanged."""
    token = marker()
    target = f"/raw/record/{token}/a%20b/%E2%9C%93;x=1?a=1&a=2&a=&flag&enc=%20%2B%26%3D&plus=a+b&utf=%C3%A9"
    response = raw_http(gw.port, f"GET {target} HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n".encode())
    assert response.status == 200
    [seen] = raw_upstream.find(token)
    assert seen.head.startswith(f"GET {target} HTTP/1.1\r\n".encode())


@pytest.mark.parametrize(
    "raw_path",
    [
        "/api/echo/{t}/c%20d/%E2%9C%93/%25",
        "/api/echo/{t}/x%3Fnot-a-query%23nor-fragment",
        "/api/echo/{t}/%7Euser/A%41",
    ],
)
def test_raw_path_is_forwarded_unchanged(gw: Served, echo: EchoApp, raw_path: str) -> None:
    token = marker()
    path = raw_path.format(t=token)
    response = raw_http(gw.port, f"GET {path}?k=v HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n".encode())
    assert response.status == 200, response.raw
    record = only(echo, token)
    assert record["raw_path"] == path
    assert record["query_string"] == "k=v"


# ----------------------------------------------------------------------------- headers


def test_repeated_request_headers_are_preserved(gw: Served, echo: EchoApp) -> None:
    token = marker()
    headers = [("X-Repeat", "first"), ("X-Repeat", "second, with comma"), ("Accept", "text/html"),
               ("Accept", "application/json;q=0.5"), ("X-Repeat", "third")]
    with httpx.Client() as client:
        response = client.get(f"{gw.url}/api/echo/{token}", headers=headers)
    assert response.status_code == 200
    seen = upstream_headers(only(echo, token))
    assert seen["x-repeat"] == ["first", "second, with comma", "third"]
    assert seen["accept"] == ["text/html", "application/json;q=0.5"]


def test_repeated_response_headers_are_preserved(gw: Served) -> None:
    with httpx.Client() as client:
        response = client.get(f"{gw.url}/api/cookies")
    assert response.headers.get_list("set-cookie") == [
        "session=alice-secret; Path=/; HttpOnly",
        "theme=dark; Path=/",
        "tracking=1; Path=/api; Max-Age=60",
    ]
    assert response.headers.get_list("x-multi") == ["one", "two"]


def test_no_cookie_jar_between_clients(gw: Served, echo: EchoApp) -> None:
    with httpx.Client() as client_a:
        assert "session=alice-secret" in client_a.get(f"{gw.url}/api/cookies").headers["set-cookie"]
    # the gateway's pooled upstream connection must not remember Alice's cookie for Bob
    for _ in range(3):
        token = marker()
        with httpx.Client() as client_b:
            assert client_b.get(f"{gw.url}/api/echo/{token}").status_code == 200
        seen = upstream_headers(only(echo, token))
        assert "cookie" not in seen, seen["cookie"]
    # and a client's own cookies go through as sent
    token = marker()
    raw_http(gw.port, f"GET /api/echo/{token} HTTP/1.1\r\nHost: gw.test\r\nCookie: mine=1\r\nCookie: two=2\r\n"
             "Connection: close\r\n\r\n".encode())
    assert upstream_headers(only(echo, token))["cookie"] == ["mine=1", "two=2"]


def test_no_decompression_and_client_accept_encoding_passes(gw: Served, echo: EchoApp) -> None:
    token = marker()
    with httpx.Client() as client, client.stream(
        "GET", f"{gw.url}/api/gzip/{token}", headers={"Accept-Encoding": "gzip;q=1.0, x-custom"}
    ) as response:
        raw = b"".join(response.iter_raw())
        assert response.headers["content-encoding"] == "gzip"
        assert response.headers["content-length"] == str(len(GZIP_BODY))
    assert raw == GZIP_BODY
    assert upstream_headers(only(echo, token))["accept-encoding"] == ["gzip;q=1.0, x-custom"]


def test_no_request_headers_are_added(gw: Served, echo: EchoApp) -> None:
    """A bare request (no Accept-Encoding, User-Agent, Accept) reaches the upstream without any of them."""
    token = marker()
    response = raw_http(gw.port, f"GET /api/gzip/{token} HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n"
                        .encode())
    assert response.status == 200
    assert response.body == GZIP_BODY
    assert response.header("content-encoding") == "gzip"
    seen = upstream_headers(only(echo, token))
    for name in ("accept-encoding", "user-agent", "accept", "content-type", "cookie", "authorization"):
        assert name not in seen, (name, seen)


def test_hop_by_hop_request_headers_are_stripped(gw: Served, echo: EchoApp) -> None:
    token = marker()
    request = (
        f"GET /api/echo/{token} HTTP/1.1\r\n"
        "Host: gw.test\r\n"
        "Connection: close, X-Secret-Hop\r\n"
        "Keep-Alive: timeout=5\r\n"
        "TE: trailers\r\n"
        "Upgrade: example/1\r\n"
        "Proxy-Connection: keep-alive\r\n"
        "Proxy-Authorization: Basic c2VjcmV0\r\n"
        "X-Secret-Hop: do-not-forward\r\n"
        "X-Kept: yes\r\n\r\n"
    )
    response = raw_http(gw.port, request.encode())
    assert response.status == 200
    seen = upstream_headers(only(echo, token))
    for name in ("keep-alive", "te", "upgrade", "proxy-connection", "proxy-authorization", "x-secret-hop"):
        assert name not in seen, (name, seen)
    for value in seen.get("connection", []):
        assert "x-secret-hop" not in value.lower() and "close" not in value.lower()
    assert seen["x-kept"] == ["yes"]


def test_hop_by_hop_response_headers_are_stripped(gw: Served, raw_upstream: RawUpstream) -> None:
    with httpx.Client() as client:
        response = client.get(f"{gw.url}/raw/hop/{marker()}")
    assert response.status_code == 200
    assert response.content == b"ok"
    assert response.headers["x-kept"] == "yes"
    for name in ("keep-alive", "x-resp-hop", "upgrade", "proxy-connection", "te", "trailer", "proxy-authenticate"):
        assert name not in response.headers, (name, response.headers)
    assert "x-resp-hop" not in response.headers.get("connection", "").lower()


# ----------------------------------------------------------------------------- forwarding fields


def test_forwarding_headers_from_untrusted_peer_are_replaced(gw: Served, echo: EchoApp) -> None:
    token = marker()
    spoofed = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.test",
               "Forwarded": "for=6.6.6.6;proto=https", "X-Real-IP": "6.6.6.6", "X-Edgeway-User": "admin",
               "Host": "gw.test"}
    transport = httpx.HTTPTransport(local_address="127.0.0.2")  # not in trusted_proxies (127.0.0.1/32)
    with httpx.Client(transport=transport) as client:
        assert client.get(f"{gw.url}/api/echo/{token}", headers=spoofed).status_code == 200
    seen = upstream_headers(only(echo, token))
    assert seen["x-forwarded-for"] == ["127.0.0.2"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == ["gw.test"]
    assert seen["forwarded"] == ['for=127.0.0.2;proto=http;host="gw.test"']
    assert "x-real-ip" not in seen
    assert "x-edgeway-user" not in seen
    assert seen["host"] == [f"127.0.0.1:{echo.port}"]  # type: ignore[attr-defined]


def test_forwarding_headers_from_trusted_peer_are_appended(gw: Served, echo: EchoApp) -> None:
    token = marker()
    headers = {"X-Forwarded-For": "203.0.113.9, 10.0.0.2", "X-Forwarded-Proto": "https",
               "X-Forwarded-Host": "public.example", "Forwarded": 'for=203.0.113.9;proto=https;host="public.example"',
               "X-Edgeway-User": "admin", "Host": "gw.test"}
    with httpx.Client() as client:  # from 127.0.0.1: a trusted proxy
        assert client.get(f"{gw.url}/api/echo/{token}", headers=headers).status_code == 200
    seen = upstream_headers(only(echo, token))
    assert seen["x-forwarded-for"] == ["203.0.113.9, 10.0.0.2, 127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["https"]
    assert seen["x-forwarded-host"] == ["public.example"]
    assert seen["forwarded"] == ['for=203.0.113.9;proto=https;host="public.example", '
                                 'for=127.0.0.1;proto=http;host="gw.test"']
    assert "x-edgeway-user" not in seen


def test_client_cannot_send_edgeway_identity_headers(gw: Served, echo: EchoApp) -> None:
    token = marker()
    response = raw_http(gw.port, f"GET /api/echo/{token} HTTP/1.1\r\nHost: gw.test\r\nX-Edgeway-User: root\r\n"
                        "x-edgeway-user: root2\r\nX-EDGEWAY-ROLES: admin\r\nConnection: close\r\n\r\n".encode())
    assert response.status == 200
    seen = upstream_headers(only(echo, token))
    assert not [name for name in seen if name.startswith("x-edgeway-")]


def test_expect_100_continue_is_answered_at_the_gateway(gw: Served, raw_upstream: RawUpstream) -> None:
    """The client gets its 100 from the gateway; the upstream (which never sends 100) gets the body at once."""
    token = marker()
    with socket.create_connection((HOST, gw.port), timeout=3) as sock:
        sock.sendall(f"POST /raw/record/{token} HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 5\r\n"
                     "Expect: 100-continue\r\nConnection: close\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"hello")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    response = parse_response(data)
    assert response.status == 200
    assert response.body == b"recorded"
    [seen] = raw_upstream.find(token)
    assert seen.body == b"hello"
    assert "expect" not in seen.header_names()


def test_gateway_adds_no_date_or_server_header(gw: Served) -> None:
    """The upstream's Date and Server pass through alone; an upstream without them gets none added."""
    with httpx.Client() as client:
        via_echo = client.get(f"{gw.url}/api/echo/{marker()}")
        via_raw = client.get(f"{gw.url}/raw/record/{marker()}")
    assert len(via_echo.headers.get_list("date")) == 1
    assert via_echo.headers.get_list("server") == ["uvicorn"]  # the upstream's
    assert "date" not in via_raw.headers
    assert "server" not in via_raw.headers


def test_utf8_header_values_pass_byte_exact(gw: Served, raw_upstream: RawUpstream) -> None:
    """Valid UTF-8 in a field value reaches the upstream as the same bytes (never double-encoded)."""
    token = marker()
    value = "café ✓ naïve".encode()
    response = raw_http(gw.port, f"GET /raw/record/{token} HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n"
                        .encode() + b"X-Utf8: " + value + b"\r\n\r\n")
    assert response.status == 200
    [seen] = raw_upstream.find(token)
    assert b"\r\nx-utf8: " + value + b"\r\n" in seen.head


def test_control_characters_in_header_values_are_400_not_500(gw: Served, raw_upstream: RawUpstream) -> None:
    for value in (b"a\x7fb", b"a\x01b", b"a\x1bb"):
        token = marker()
        response = raw_http(gw.port, f"GET /raw/record/{token} HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n"
                            .encode() + b"X-Bad: " + value + b"\r\n\r\n")
        assert response.status == 400, (value, response.raw)
        assert raw_upstream.find(token) == []
