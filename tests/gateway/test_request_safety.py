"""Requests the gateway must refuse (or at least never pass on): SSRF, smuggling, dot segments.

Sent over raw sockets: a client library would normalise every one of them.
"""

from __future__ import annotations

import time

import pytest

from .conftest import EchoApp, Served, marker, raw_http


def test_absolute_form_target_is_refused_under_h11(gw_h11: Served, echo: EchoApp, victim: EchoApp) -> None:
    token = marker()
    victim_host = f"127.0.0.1:{victim.port}"  # type: ignore[attr-defined]
    response = raw_http(gw_h11.port, f"GET http://{victim_host}/api/echo/{token} HTTP/1.1\r\nHost: {victim_host}\r\n"
                        "Connection: close\r\n\r\n".encode())
    assert response.status == 400
    assert response.header("edgeway-error") == "bad_request"
    assert response.json()["error"] == "bad_request"
    time.sleep(0.1)
    assert victim.find(token) == []
    assert echo.find(token) == []


def test_absolute_form_target_never_reaches_other_host(gw: Served, echo: EchoApp, victim: EchoApp) -> None:
    """Under either parser: a 400, or the policy's own upstream; never the host named in the target."""
    token = marker()
    victim_host = f"127.0.0.1:{victim.port}"  # type: ignore[attr-defined]
    response = raw_http(gw.port, f"GET http://{victim_host}/api/echo/{token} HTTP/1.1\r\nHost: gw.test\r\n"
                        "Connection: close\r\n\r\n".encode())
    assert response.status in (200, 400)
    time.sleep(0.1)
    assert victim.find(token) == []
    for record in echo.find(token):  # only the policy upstream, addressed by its own name
        hosts = [value for name, value in record["headers"] if name.lower() == "host"]
        assert hosts == [f"127.0.0.1:{echo.port}"]  # type: ignore[attr-defined]
        assert record["raw_path"] == f"/api/echo/{token}"
        assert all(str(victim.port) not in value for _, value in record["headers"])  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "framing",
    [
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
    ],
    ids=["cl-te", "te-cl", "cl-te-te"],
)
def test_content_length_with_transfer_encoding_is_refused(gw: Served, echo: EchoApp, raw_upstream: object,
                                                          framing: str) -> None:
    token = marker()
    for prefix in ("/api/echo", "/raw/record"):
        response = raw_http(gw.port, f"POST {prefix}/{token} HTTP/1.1\r\nHost: gw.test\r\n{framing}"
                            "Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n".encode())
        assert response.status == 400, response.raw
    time.sleep(0.1)
    assert echo.find(token) == []
    assert raw_upstream.find(token) == []  # type: ignore[attr-defined]


def test_content_length_with_transfer_encoding_error_is_json_under_h11(gw_h11: Served) -> None:
    response = raw_http(gw_h11.port, b"POST /api/echo/x HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 5\r\n"
                        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert response.status == 400
    assert response.header("edgeway-error") == "bad_request"
    assert response.json()["error"] == "bad_request"


@pytest.mark.parametrize(
    "path",
    ["/a/../admin", "/api/../admin", "/api/echo/../../admin", "/api/./echo", "/api/%2e%2e/admin",
     "/api/%2E/echo", "/api/echo/.."],
)
def test_dot_segments_are_refused(gw: Served, echo: EchoApp, path: str) -> None:
    token = marker()
    response = raw_http(gw.port, f"GET {path}?t={token} HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n"
                        .encode())
    assert response.status == 400
    assert response.header("edgeway-error") == "bad_request"
    assert response.json()["error"] == "bad_request"
    assert echo.find(token) == []


def test_repeated_or_missing_host_is_refused(gw: Served, echo: EchoApp) -> None:
    token = marker()
    two = raw_http(gw.port, f"GET /api/echo/{token} HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n"
                   "Connection: close\r\n\r\n".encode())
    none = raw_http(gw.port, f"GET /api/echo/{token} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
    assert two.status == 400
    assert none.status == 400
    assert echo.find(token) == []
