"""Bodies stream both ways without buffering; upstream failures and client disconnects end honestly."""

from __future__ import annotations

import hashlib
import random
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from .conftest import HOST, STREAM_DATA, EchoApp, RawUpstream, Served, marker, raw_http, wait_until

UPLOAD = random.Random(5).randbytes(5 * 1024 * 1024)


def upstream_headers(record: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in record["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


# ----------------------------------------------------------------------------- uploads


def test_upload_5mb_with_content_length(gw: Served, echo: EchoApp) -> None:
    token = marker()
    with httpx.Client(timeout=10) as client:
        response = client.post(f"{gw.url}/api/echo/{token}", content=UPLOAD,
                               headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200
    record = echo.find(token)[0]
    seen = upstream_headers(record)
    assert seen["content-length"] == [str(len(UPLOAD))]
    assert "transfer-encoding" not in seen  # not re-framed as chunked
    assert record["body_len"] == len(UPLOAD)
    assert record["body_sha256"] == hashlib.sha256(UPLOAD).hexdigest()


def test_chunked_upload_without_content_length(gw: Served, echo: EchoApp) -> None:
    token = marker()

    def pieces() -> Iterator[bytes]:
        for offset in range(0, len(UPLOAD), 100_003):
            yield UPLOAD[offset:offset + 100_003]

    with httpx.Client(timeout=10) as client:
        request = client.build_request("PUT", f"{gw.url}/api/echo/{token}", content=pieces())
        assert request.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in request.headers
        response = client.send(request)
    assert response.status_code == 200
    record = echo.find(token)[0]
    assert record["body_len"] == len(UPLOAD)
    assert record["body_sha256"] == hashlib.sha256(UPLOAD).hexdigest()
    assert "content-length" not in upstream_headers(record)


def test_upload_is_streamed_not_buffered(gw: Served, echo: EchoApp) -> None:
    """The upstream receives the first megabyte while the client is still holding back the rest."""
    token = marker()
    first, rest = UPLOAD[: 1 << 20], UPLOAD[1 << 20:]
    observed: list[int] = []

    def pieces() -> Iterator[bytes]:
        yield first
        wait_until(lambda: echo.received.get(token, 0) >= len(first), timeout=3.0)
        observed.append(echo.received.get(token, 0))
        yield rest

    with httpx.Client(timeout=10) as client:
        response = client.post(f"{gw.url}/api/progress/{token}", content=pieces())
    assert response.status_code == 200
    assert observed == [len(first)]  # all of the first part arrived before the client sent more
    assert response.json() == {"body_len": len(UPLOAD), "body_sha256": hashlib.sha256(UPLOAD).hexdigest()}


# ----------------------------------------------------------------------------- downloads


def test_streamed_8mb_response_arrives_intact(gw: Served) -> None:
    digest = hashlib.sha256()
    size = 0
    with httpx.Client(timeout=10) as client, client.stream("GET", f"{gw.url}/api/stream") as response:
        assert response.status_code == 200
        assert "content-length" not in response.headers
        for chunk in response.iter_raw():
            digest.update(chunk)
            size += len(chunk)
    assert size == len(STREAM_DATA)
    assert digest.hexdigest() == hashlib.sha256(STREAM_DATA).hexdigest()


def test_response_is_not_buffered(gw: Served, echo: EchoApp) -> None:
    """The client gets the upstream's first chunk while the upstream is still waiting to send the rest."""
    token = marker()
    gate = echo.gate(token)
    with httpx.Client(timeout=5) as client, client.stream("GET", f"{gw.url}/api/gated/{token}") as response:
        assert response.status_code == 200
        chunks = response.iter_raw()
        first = next(chunks)
        assert first.startswith(b"first-chunk|")
        assert echo.outcomes[token] == "first-sent"  # upstream has not finished: nothing was buffered
        gate.set()
        body = first + b"".join(chunks)
    assert body == b"first-chunk|" + b"R" * 100_000 + b"|end"
    assert echo.outcomes[token] == "finished"


# ----------------------------------------------------------------------------- upstream dies mid-body


def test_upstream_reset_mid_body_is_never_a_complete_response(gw: Served) -> None:
    with httpx.Client(timeout=5) as client, pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        client.get(f"{gw.url}/raw/reset/{marker()}")
    response = raw_http(gw.port, f"GET /raw/reset/{marker()} HTTP/1.1\r\nHost: gw.test\r\n\r\n".encode())
    assert response.status == 200  # headers had already gone out...
    assert response.header("content-length") == "100000"
    assert len(response.body) < 100_000  # ...but the connection closed short of the promised length


def test_upstream_dying_mid_chunked_response_never_terminates_it(gw: Served) -> None:
    with httpx.Client(timeout=5) as client, pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        client.get(f"{gw.url}/raw/chunk-die/{marker()}")
    response = raw_http(gw.port, f"GET /raw/chunk-die/{marker()} HTTP/1.1\r\nHost: gw.test\r\n\r\n".encode())
    assert response.status == 200
    assert response.header("transfer-encoding") == "chunked"
    assert b"y" * 1000 in response.raw
    assert not response.raw.endswith(b"0\r\n\r\n")  # no terminating chunk reached the client


def test_an_upstream_closing_its_kept_alive_connections_costs_no_error(gw: Served, raw_upstream: RawUpstream) -> None:
    """Each connection the upstream closes after one answer is dropped from the pool (or, when the close
    crosses the next request, that request is sent again on a new connection): every client gets its 200."""
    token = marker()
    with httpx.Client(timeout=5) as client:
        answers = [client.get(f"{gw.url}/raw/once/{token}") for _ in range(20)]
    assert [(r.status_code, r.content) for r in answers] == [(200, b"once")] * 20
    assert len(raw_upstream.find(token)) == 20


# ----------------------------------------------------------------------------- client disconnects


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_client_disconnect_cancels_upstream_request(gw: Served, echo: EchoApp, method: str) -> None:
    token = marker()
    body = "hello" if method == "POST" else ""
    request = (f"{method} /api/slow/{token}?s=10 HTTP/1.1\r\nHost: gw.test\r\nContent-Length: {len(body)}\r\n\r\n"
               f"{body}")
    started = time.monotonic()
    with socket.create_connection((HOST, gw.port), timeout=5) as sock:
        sock.sendall(request.encode())
        assert wait_until(lambda: echo.outcomes.get(token) == "waiting", timeout=3.0)
        time.sleep(0.2)
    assert wait_until(lambda: echo.outcomes.get(token) in ("disconnected", "cancelled"), timeout=3.0), (
        echo.outcomes.get(token)
    )
    assert time.monotonic() - started < 5.0


def test_client_disconnect_mid_upload_cancels_upstream_request(gw: Served, echo: EchoApp) -> None:
    token = marker()
    head = f"POST /api/progress/{token} HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 1000000\r\n\r\n"
    with socket.create_connection((HOST, gw.port), timeout=5) as sock:
        sock.sendall(head.encode() + b"u" * 100_000)
        assert wait_until(lambda: echo.received.get(token, 0) == 100_000, timeout=3.0)
    assert wait_until(lambda: echo.outcomes.get(token) == "disconnected", timeout=3.0), echo.outcomes.get(token)
    assert echo.received[token] == 100_000


def test_client_disconnect_mid_response_closes_upstream_request(gw: Served, echo: EchoApp) -> None:
    token = marker()
    with socket.create_connection((HOST, gw.port), timeout=5) as sock:
        sock.sendall(f"GET /api/gated/{token} HTTP/1.1\r\nHost: gw.test\r\n\r\n".encode())
        received = b""
        while b"first-chunk|" not in received:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    assert wait_until(lambda: echo.outcomes.get(token + ":client") == "disconnected", timeout=2.5), echo.outcomes
    assert echo.outcomes[token] == "first-sent"  # the upstream was still mid-response when it saw the close
    echo.gate(token).set()
