"""The edge holds (issue 9): stalled uploads, slow clients, header and path tricks, sent as raw bytes.

Each test sends the bytes of the report over raw sockets to the gateway served
the way ``edgeway serve`` serves it (its protocol classes, httptools by
default, and h11). Timeouts in the test policy are short (1 s) so slow-client
tests end quickly; every socket has a timeout, so no test can hang.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from tests.servers import HOST, free_port

from .conftest import (
    EchoApp,
    RawUpstream,
    Served,
    marker,
    parse_response,
    raw_http,
    read_until_closed,
    serve_gateway,
    wait_until,
)


def edge_policy(echo_port: int, raw_port: int, *, server: str = "") -> str:
    return f"""
version: 1
trusted_proxies: [127.0.0.1/32]
server: {{ header_timeout: 1s, keepalive_timeout: 1s, client_body_timeout: 1s{server} }}
upstreams:
  echo: {{ url: "http://127.0.0.1:{echo_port}", max_connections: 4 }}
  raw: {{ url: "http://127.0.0.1:{raw_port}" }}
  tight: {{ url: "http://127.0.0.1:{echo_port}", max_connections: 1, max_pending: 0 }}
  queued: {{ url: "http://127.0.0.1:{echo_port}", max_connections: 1, timeout: {{ pool: 200ms }} }}
routes:
  - match: {{ path: /limited/*, case_insensitive: true }}
    upstream: echo
    limits: [{{ rate: 3/hour, key: ip }}]
  - match: {{ path: /semi/*, allow_semicolons: true, allow_backslashes: true }}
    upstream: echo
  - match: {{ path: /tight/* }}
    upstream: tight
  - match: {{ path: /queued/* }}
    upstream: queued
  - match: {{ path: /raw/* }}
    upstream: raw
  - match: {{ path: /* }}
    upstream: echo
"""


@pytest.fixture(scope="module", params=["httptools", "h11"])
def edge(request: pytest.FixtureRequest, echo: EchoApp, raw_upstream: RawUpstream) -> Iterator[Served]:
    with serve_gateway(edge_policy(echo.port, raw_upstream.port), http=request.param) as served:  # type: ignore[attr-defined]
        yield served


def get(port: int, path: str, extra: str = "", *, timeout: float = 5.0) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: gw.test\r\n{extra}Connection: close\r\n\r\n".encode()


def assert_json_error(response: object, status: int, code: str) -> None:
    assert response.status == status, response.raw  # type: ignore[attr-defined]
    assert response.header("edgeway-error") == code  # type: ignore[attr-defined]
    assert response.json()["error"] == code  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- 1. stalled uploads


def test_256_stalled_uploads_leave_the_upstream_pool_usable(edge: Served, echo: EchoApp) -> None:
    """256 clients promise 1000 bytes and send one; the upstream (4 connections) keeps answering others."""
    token = marker()
    stalled = []
    try:
        for n in range(256):
            sock = socket.create_connection((HOST, edge.port), timeout=10)
            sock.sendall(f"POST /hold{n}/{token} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nb".encode())
            stalled.append(sock)
        for _ in range(10):  # each answered within a second, while every upload is still stalled
            response = raw_http(edge.port, get(edge.port, f"/api/echo/ping-{token}"), timeout=1.0)
            assert response.status == 200, response.raw
        assert echo.find(token) != []
        assert [r for r in echo.find(token) if "/hold" in r["raw_path"]] == []  # no stalled body went upstream
        # the stalled uploads end in 408 after client_body_timeout (1 s), none reaching the upstream
        answers = [parse_response(read_until_closed(sock)) for sock in stalled]
    finally:
        for sock in stalled:
            sock.close()
    assert {answer.status for answer in answers} == {408}
    assert_json_error(answers[0], 408, "request_timeout")
    assert [r for r in echo.find(token) if "/hold" in r["raw_path"]] == []


def test_small_body_is_buffered_and_forwarded_with_its_length(edge: Served, raw_upstream: RawUpstream) -> None:
    token = marker()
    with socket.create_connection((HOST, edge.port), timeout=5) as sock:
        sock.sendall(f"POST /raw/record/{token} HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n"
                     "Connection: close\r\n\r\nhello".encode())
        time.sleep(0.2)  # the body arrives in two pieces; nothing goes upstream before the whole of it
        assert raw_upstream.find(token) == []
        sock.sendall(b" world")
        response = parse_response(read_until_closed(sock))
    assert response.status == 200
    [seen] = raw_upstream.find(token)
    assert seen.body == b"hello world"
    assert ("Content-Length", "11") in seen.headers or ("content-length", "11") in seen.headers


def test_large_body_that_stalls_mid_stream_gets_408(edge: Served, raw_upstream: RawUpstream) -> None:
    """Past the 64 KiB buffer the body streams; a client that stops sending is cut off after the body timeout."""
    token = marker()
    with socket.create_connection((HOST, edge.port), timeout=10) as sock:
        sock.sendall(f"POST /raw/record/{token} HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\n".encode()
                     + b"x" * 100_000)
        response = parse_response(read_until_closed(sock))
    assert_json_error(response, 408, "request_timeout")


def test_large_body_streams_whole(edge: Served, echo: EchoApp) -> None:
    token = marker()
    body = bytes(range(256)) * 1024  # 256 KiB, over the 64 KiB buffer
    response = raw_http(edge.port, f"POST /api/echo/{token} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                        "Connection: close\r\n\r\n".encode() + body)
    assert response.status == 200
    assert response.json()["body_len"] == len(body)


def test_declared_body_over_max_request_body_is_413_before_reading(edge: Served, echo: EchoApp) -> None:
    token = marker()
    response = raw_http(edge.port, f"POST /api/echo/{token} HTTP/1.1\r\nHost: x\r\nContent-Length: 20000000\r\n"
                        "\r\n".encode() + b"x" * 1000)
    assert_json_error(response, 413, "request_too_large")
    assert response.json()["limit"] == 10_000_000
    assert echo.find(token) == []


def test_chunked_body_growing_past_max_request_body_is_413(echo: EchoApp, raw_upstream: RawUpstream) -> None:
    policy = edge_policy(echo.port, raw_upstream.port, server=", max_request_body: 1KB")  # type: ignore[attr-defined]
    with serve_gateway(policy, http="httptools") as served:
        token = marker()
        chunk = b"400\r\n" + b"y" * 1024 + b"\r\n"
        response = raw_http(served.port, f"POST /api/echo/{token} HTTP/1.1\r\nHost: x\r\n"
                            "Transfer-Encoding: chunked\r\n\r\n".encode() + chunk * 3 + b"0\r\n\r\n")
    assert_json_error(response, 413, "request_too_large")
    assert echo.find(token) == []


def test_no_free_connection_and_no_pending_room_is_503_at_once(edge: Served, echo: EchoApp) -> None:
    token = marker()
    with socket.create_connection((HOST, edge.port), timeout=5) as busy:
        busy.sendall(f"GET /tight/slow/{token}?s=3 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        deadline = time.monotonic() + 3
        while echo.outcomes.get(token) != "waiting" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert echo.outcomes.get(token) == "waiting"
        response = raw_http(edge.port, get(edge.port, f"/tight/echo/{token}-2"), timeout=2.0)
    assert_json_error(response, 503, "upstream_overloaded")
    assert response.json()["upstream"] == "tight"
    assert response.header("retry-after") == "1"


def test_waiting_for_a_pooled_connection_is_bounded_by_the_pool_timeout(edge: Served, echo: EchoApp) -> None:
    token = marker()
    with socket.create_connection((HOST, edge.port), timeout=5) as busy:
        busy.sendall(f"GET /queued/slow/{token}?s=3 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        deadline = time.monotonic() + 3
        while echo.outcomes.get(token) != "waiting" and time.monotonic() < deadline:
            time.sleep(0.01)
        response = raw_http(edge.port, get(edge.port, f"/queued/echo/{token}-2"), timeout=2.0)
    assert_json_error(response, 503, "upstream_overloaded")


# --------------------------------------------------------------------------- 2. header and idle timeouts


def test_connection_that_sends_nothing_is_closed_after_header_timeout(edge: Served) -> None:
    with socket.create_connection((HOST, edge.port), timeout=5) as sock:
        response = parse_response(read_until_closed(sock))
    assert_json_error(response, 408, "request_timeout")


def test_slowloris_one_header_byte_at_a_time_is_cut_off(edge: Served) -> None:
    request = b"GET /api/echo/slow HTTP/1.1\r\nHost: x\r\nX-Drip: " + b"a" * 200
    sent = 0
    with socket.create_connection((HOST, edge.port), timeout=5) as sock:
        try:
            for byte in request:
                sock.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.02)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = read_until_closed(sock)
    assert sent < len(request)  # the head timer (1 s) ran out before the head was done (~4.5 s at this pace)
    assert parse_response(data).status in (0, 408)


def test_second_request_head_left_incomplete_is_cut_off(edge: Served) -> None:
    """On a keep-alive connection the head timer runs for every request, not only the first."""
    with socket.create_connection((HOST, edge.port), timeout=5) as sock:
        sock.sendall(b"GET /api/echo/first HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b"}" not in first:  # the echo body is JSON
            first += sock.recv(65536)
        sock.sendall(b"GET /api/echo/second HTTP/1.1\r\nHost: x\r\nX-Half: ")
        rest = read_until_closed(sock)
    assert parse_response(first).status == 200
    assert_json_error(parse_response(rest), 408, "request_timeout")


def test_idle_keepalive_connection_is_closed(edge: Served) -> None:
    with socket.create_connection((HOST, edge.port), timeout=5) as sock:
        sock.sendall(b"GET /api/echo/keepalive HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b"}" not in first:
            first += sock.recv(65536)
        assert parse_response(first).status == 200
        assert sock.recv(65536) == b""  # closed by the server once keepalive_timeout (1 s) passed; not a timeout


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_connections_past_max_connections_are_refused(echo: EchoApp, raw_upstream: RawUpstream, http: str) -> None:
    policy = edge_policy(echo.port, raw_upstream.port,  # type: ignore[attr-defined]
                         server=", max_connections: 3").replace("header_timeout: 1s", "header_timeout: 10s")
    with serve_gateway(policy, http=http) as served:
        state = served.server.server.server_state
        assert wait_until(lambda: not state.connections)  # the start-up port probe has gone
        held = []
        try:
            for count in (1, 2, 3):
                held.append(socket.create_connection((HOST, served.port), timeout=5))
                assert wait_until(lambda n=count: len(state.connections) == n)  # type: ignore[misc]
            response = raw_http(served.port, get(served.port, "/api/echo/over"), timeout=5)
            assert_json_error(response, 503, "server_overloaded")
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.1)
        assert raw_http(served.port, get(served.port, "/api/echo/after"), timeout=5).status == 200


# --------------------------------------------------------------------------- 3. header size and count


def test_huge_header_is_431_and_never_forwarded(edge: Served, echo: EchoApp) -> None:
    token = marker()
    payload = f"GET /api/echo/{token} HTTP/1.1\r\nHost: x\r\nX-Big: ".encode() + b"a" * (1024 * 1024) + b"\r\n\r\n"
    with socket.create_connection((HOST, edge.port), timeout=5) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # answered and closed before the end
            sock.sendall(payload)
        response = parse_response(read_until_closed(sock))
    assert response.status in (0, 431)  # a reset may swallow the answer; the 431 is checked just below
    small = raw_http(edge.port, f"GET /api/echo/{token} HTTP/1.1\r\nHost: x\r\nX-Big: ".encode() + b"a" * 70_000
                     + b"\r\nConnection: close\r\n\r\n")
    assert_json_error(small, 431, "headers_too_large")
    assert echo.find(token) == []


def test_more_than_100_headers_is_431(edge: Served, echo: EchoApp) -> None:
    token = marker()
    fields = "".join(f"X-H{i}: v\r\n" for i in range(101))
    response = raw_http(edge.port, get(edge.port, f"/api/echo/{token}", fields))
    assert_json_error(response, 431, "headers_too_large")
    assert echo.find(token) == []
    assert raw_http(edge.port, get(edge.port, f"/api/echo/{token}", "".join(f"X-H{i}: v\r\n" for i in range(90)))
                    ).status == 200


# --------------------------------------------------------------------------- 4. Host and Forwarded


@pytest.mark.parametrize("host", ['x", for=6.6.6.6;proto=https;host="evil', "evil example", "a/p?q", "user@host",
                                  "a\\b", "[::1"])
def test_malformed_host_is_400(edge: Served, echo: EchoApp, host: str) -> None:
    token = marker()
    response = raw_http(edge.port, f"GET /api/echo/{token} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                        .encode())
    assert response.status == 400, response.raw
    assert echo.find(token) == []


@pytest.mark.parametrize("host", ["example.com", "example.com:8080", "127.0.0.1:80", "[::1]:8080", "a-b.c_d~e"])
def test_valid_host_is_quoted_in_forwarded(edge: Served, echo: EchoApp, host: str) -> None:
    token = marker()
    response = raw_http(edge.port, f"GET /api/echo/{token} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                        .encode())
    assert response.status == 200
    [record] = echo.find(token)
    headers = dict((k.lower(), v) for k, v in record["headers"])
    assert headers["forwarded"] == f'for=127.0.0.1;proto=http;host="{host}"'
    assert headers["x-forwarded-host"] == host


# --------------------------------------------------------------------------- 5. underscores


def _dropped() -> float:
    return REGISTRY.get_sample_value("edgeway_dropped_headers_total", {"reason": "underscore"}) or 0.0


def test_header_names_with_underscores_are_dropped(edge: Served, raw_upstream: RawUpstream) -> None:
    token = marker()
    before = _dropped()
    response = raw_http(edge.port, get(edge.port, f"/raw/record/{token}",
                                       "X_Edgeway_User: admin\r\nX_Forwarded_For: 6.6.6.6\r\nX-Kept: yes\r\n"))
    assert response.status == 200
    [seen] = raw_upstream.find(token)
    assert b"_" not in b"".join(line.split(b":")[0] for line in seen.head.split(b"\r\n")[1:])
    assert b"6.6.6.6" not in seen.head and b"admin" not in seen.head
    assert dict((k.lower(), v) for k, v in seen.headers)["x-kept"] == "yes"
    assert _dropped() == before + 2


def test_header_names_with_underscores_can_be_rejected(echo: EchoApp, raw_upstream: RawUpstream) -> None:
    policy = edge_policy(echo.port, raw_upstream.port, server=", headers_with_underscores: reject")  # type: ignore[attr-defined]
    with serve_gateway(policy, http="httptools") as served:
        token = marker()
        response = raw_http(served.port, get(served.port, f"/api/echo/{token}", "X_Edgeway_User: admin\r\n"))
    assert_json_error(response, 400, "bad_request")
    assert echo.find(token) == []


# --------------------------------------------------------------------------- 6. trailers


def test_chunked_trailers_never_become_request_headers(edge: Served, raw_upstream: RawUpstream) -> None:
    token = marker()
    response = raw_http(edge.port, f"POST /raw/record/{token} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                        "Connection: close\r\n\r\n5\r\nhello\r\n0\r\nX-From-Trailer: injected\r\n"
                        "Authorization: Bearer from-trailer\r\n\r\n".encode())
    assert response.status == 200, response.raw
    [seen] = raw_upstream.find(token)
    assert seen.body == b"hello"
    assert b"injected" not in seen.head and b"from-trailer" not in seen.head
    assert "authorization" not in seen.header_names()


# --------------------------------------------------------------------------- 7. framing headers


def test_content_length_with_trailing_space_is_forwarded_normalised(edge: Served, raw_upstream: RawUpstream) -> None:
    token = marker()
    response = raw_http(edge.port, f"POST /raw/record/{token} HTTP/1.1\r\nHost: x\r\nContent-Length: 5 \r\n"
                        "Connection: close\r\n\r\nhello".encode())
    assert response.status == 200, response.raw
    [seen] = raw_upstream.find(token)
    assert seen.body == b"hello"
    assert [v for k, v in seen.headers if k.lower() == "content-length"] == ["5"]


@pytest.mark.parametrize("value", ["5x", "-5", "5, 6", "0x5"])
def test_malformed_content_length_is_400_json(edge: Served, echo: EchoApp, value: str) -> None:
    token = marker()
    response = raw_http(edge.port, f"POST /api/echo/{token} HTTP/1.1\r\nHost: x\r\nContent-Length: {value}\r\n"
                        "Connection: close\r\n\r\nhello".encode())
    assert_json_error(response, 400, "bad_request")
    assert echo.find(token) == []


# --------------------------------------------------------------------------- 8. targets, versions, Upgrade


def test_absolute_form_target_is_400_under_either_parser(edge: Served, echo: EchoApp) -> None:
    token = marker()
    other = free_port()
    response = raw_http(edge.port, f"GET http://127.0.0.1:{other}/api/echo/{token} HTTP/1.1\r\nHost: x\r\n"
                        "Connection: close\r\n\r\n".encode())
    assert_json_error(response, 400, "bad_request")
    assert echo.find(token) == []


@pytest.mark.parametrize("line,statuses", [("GET /api/echo/{t}", (400,)), ("GET /api/echo/{t} HTTP/2.0", (400, 505)),
                                           ("GET /api/echo/{t} HTTP/1.2", (400, 505)),
                                           ("GET /api/echo/{t} HTTP/3.0", (400, 505))])
def test_missing_or_unsupported_http_version_is_refused(edge: Served, echo: EchoApp, line: str,
                                                        statuses: tuple[int, ...]) -> None:
    token = marker()
    response = raw_http(edge.port, line.format(t=token).encode() + b"\r\nHost: x\r\n\r\n")
    assert response.status in statuses, response.raw
    assert response.header("edgeway-error") in ("bad_request", "http_version_not_supported")
    assert echo.find(token) == []


def test_request_pipelined_after_an_upgrade_request_is_answered(edge: Served, echo: EchoApp) -> None:
    token = marker()
    payload = (f"GET /api/echo/{token}-a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
               f"GET /api/echo/{token}-b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((HOST, edge.port), timeout=5) as sock:
        sock.sendall(payload)
        data = read_until_closed(sock)
    assert data.count(b"HTTP/1.1 200 ") == 2, data
    assert [r["raw_path"] for r in echo.find(token)] == [f"/api/echo/{token}-a", f"/api/echo/{token}-b"]
    assert all("upgrade" not in dict(r["headers"]) for r in echo.find(token))


# --------------------------------------------------------------------------- 9. header bytes


def test_header_values_that_are_not_utf8_reach_the_upstream_byte_exact(edge: Served,
                                                                        raw_upstream: RawUpstream) -> None:
    token = marker()
    response = raw_http(edge.port, f"GET /raw/record/{token} HTTP/1.1\r\nHost: x\r\n".encode()
                        + b"X-Bytes: caf\xe9\xff\r\nX-Utf8: caf\xc3\xa9\r\nConnection: close\r\n\r\n")
    assert response.status == 200, response.raw
    [seen] = raw_upstream.find(token)
    assert b"\r\nx-bytes: caf\xe9\xff\r\n" in seen.head
    assert b"\r\nx-utf8: caf\xc3\xa9\r\n" in seen.head
    assert b"x-edgeway" not in seen.head.lower()


def test_client_cannot_set_the_raw_bytes_mark(edge: Served, raw_upstream: RawUpstream) -> None:
    token = marker()
    response = raw_http(edge.port, get(edge.port, f"/raw/record/{token}",
                                       "X-Edgeway-Raw-Header-Bytes: 1\r\nX-Utf8: caf\u00e9\r\n"))
    assert response.status == 200
    [seen] = raw_upstream.find(token)
    assert b"x-edgeway" not in seen.head.lower()


# --------------------------------------------------------------------------- 10. paths


def test_rate_limit_cannot_be_dodged_by_spelling(edge: Served, echo: EchoApp) -> None:
    token = marker()
    for _ in range(3):
        assert raw_http(edge.port, get(edge.port, f"/limited/a?t={token}")).status == 200
    assert raw_http(edge.port, get(edge.port, f"/limited/a?t={token}")).status == 429
    for spelling in ("//limited/x", "/%2flimited/x", "/LIMITED/x", "/limited//a", "/Limited/%2F/a"):
        response = raw_http(edge.port, get(edge.port, f"{spelling}?t={token}"))
        assert response.status == 429, (spelling, response.raw)
    for spelling in ("/limited;x/a", "/limited\\a", "/limited%5ca", "http://x//limited/a"):
        response = raw_http(edge.port, get(edge.port, f"{spelling}?t={token}"))
        assert_json_error(response, 400, "bad_request")
    assert len(echo.find(token)) == 3


def test_upstream_receives_the_normalised_path(edge: Served, echo: EchoApp) -> None:
    token = marker()
    for sent, expected in ((f"//api//echo/{token}/a", f"/api/echo/{token}/a"),
                           (f"/api/echo/{token}/b%2Fc", f"/api/echo/{token}/b/c"),
                           (f"/api/echo/{token}/d%20e", f"/api/echo/{token}/d%20e")):
        assert raw_http(edge.port, get(edge.port, sent)).status == 200
        assert echo.find(token)[-1]["raw_path"] == expected


def test_route_may_allow_semicolons_and_backslashes(edge: Served, echo: EchoApp) -> None:
    token = marker()
    assert raw_http(edge.port, get(edge.port, f"/semi/{token};v=1/x")).status == 200
    assert raw_http(edge.port, get(edge.port, f"/semi/{token}\\y")).status == 200
    assert [r["raw_path"] for r in echo.find(token)] == [f"/semi/{token};v=1/x", f"/semi/{token}\\y"]
