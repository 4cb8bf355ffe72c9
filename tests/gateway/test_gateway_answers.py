"""What the gateway answers itself: upstream errors, routing errors, /_edgeway/*, reload, rate limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgeway import gateway
from tests.garbage import contexts_left
from tests.servers import UvicornThread, free_port

from .conftest import EchoApp, RawUpstream, Served, main_policy, marker, serve_gateway, wait_until

ADMIN_TOKEN = "s3cret-admin-token"


def assert_gateway_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["edgeway-error"] == code
    assert response.headers["content-type"].split(";")[0].endswith("json")  # application/json or problem+json
    payload = response.json()
    assert payload["error"] == code
    return payload


# ----------------------------------------------------------------------------- upstream failures


def test_nothing_listening_is_502_bad_gateway(gw: Served) -> None:
    with httpx.Client() as client:
        response = client.get(f"{gw.url}/dead/anything")
    payload = assert_gateway_error(response, 502, "bad_gateway")
    assert payload.get("upstream") == "dead"


def test_slow_upstream_is_504_upstream_timeout(gw: Served, echo: EchoApp) -> None:
    token = marker()
    started = time.monotonic()
    with httpx.Client(timeout=10) as client:
        response = client.get(f"{gw.url}/timeout/slow/{token}?s=5")
    elapsed = time.monotonic() - started
    payload = assert_gateway_error(response, 504, "upstream_timeout")
    assert payload.get("upstream") == "slow"
    assert 0.25 <= elapsed < 2.0  # the policy's read timeout is 300ms
    # the gateway hung up on the upstream rather than leaving it working for nobody
    assert wait_until(lambda: echo.outcomes.get(token) == "disconnected", timeout=2.0), echo.outcomes.get(token)


def test_no_route_is_404_json(gw: Served) -> None:
    with httpx.Client() as client:
        response = client.get(f"{gw.url}/nothing/here")
    assert_gateway_error(response, 404, "no_route")


def test_method_not_allowed_is_405_with_allow(gw: Served, echo: EchoApp) -> None:
    with httpx.Client() as client:
        response = client.post(f"{gw.url}/only-get", content=b"x")
        assert client.get(f"{gw.url}/only-get").status_code == 200
    assert_gateway_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET"


# ----------------------------------------------------------------------------- /_edgeway/*


def test_healthz(gw: Served) -> None:
    with httpx.Client() as client:
        response = client.get(f"{gw.url}/_edgeway/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_reports_store_and_policy_version(gw: Served) -> None:
    with httpx.Client() as client:
        response = client.get(f"{gw.url}/_edgeway/readyz")
    assert response.status_code == 200
    payload = response.json()
    assert payload["store"]["kind"] == "memory"
    assert payload["policy"]["version"] == gw.app.loaded.version
    assert payload["policy"]["version"]


def test_metrics_is_prometheus_text(gw: Served) -> None:
    with httpx.Client() as client:
        client.get(f"{gw.url}/dead/x")  # one upstream error to count
        response = client.get(f"{gw.url}/_edgeway/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "# TYPE edgeway_upstream_errors_total counter" in text
    assert 'edgeway_upstream_errors_total{error="bad_gateway",upstream="dead"}' in text


def test_admin_disabled_without_token_in_policy(gw: Served) -> None:
    with httpx.Client() as client:
        plain = client.get(f"{gw.url}/_edgeway/status")
        guessed = client.get(f"{gw.url}/_edgeway/status", headers={"Authorization": "Bearer anything"})
    assert_gateway_error(plain, 404, "admin_disabled")
    assert_gateway_error(guessed, 404, "admin_disabled")


@pytest.fixture(scope="module")
def admin_gw(echo: EchoApp, raw_upstream: RawUpstream) -> Iterator[Served]:
    policy = main_policy(echo.port, raw_upstream.port, free_port(), admin_token=ADMIN_TOKEN)  # type: ignore[attr-defined]
    with serve_gateway(policy) as served:
        yield served


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-token", f"Basic {ADMIN_TOKEN}", f"Bearer {ADMIN_TOKEN}x", "Bearer"],
    ids=["none", "wrong", "basic", "longer", "empty"],
)
def test_admin_status_refuses_missing_or_wrong_token(admin_gw: Served, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    with httpx.Client() as client:
        response = client.get(f"{admin_gw.url}/_edgeway/status", headers=headers)
    assert_gateway_error(response, 401, "unauthorized")


def test_admin_status_with_right_token(admin_gw: Served) -> None:
    with httpx.Client() as client:
        response = client.get(f"{admin_gw.url}/_edgeway/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200
    payload = response.json()
    assert payload["policy"]["version"] == admin_gw.app.loaded.version
    assert payload["store"]["kind"] == "memory"
    assert "echo" in payload["upstreams"]


# ----------------------------------------------------------------------------- reload


def _policy(echo_port: int, prefix: str) -> str:
    return f"""
version: 1
upstreams:
  echo: {{ url: "http://127.0.0.1:{echo_port}" }}
routes:
  - match: {{ path: {prefix}/* }}
    upstream: echo
"""


async def test_reload_keeps_last_good_policy(tmp_path: Path, echo: EchoApp) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(_policy(echo.port, "/api"))  # type: ignore[attr-defined]
    gw = gateway.create_app(path)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw), base_url="http://gw.test") as client:
            assert (await client.get("/api/echo/a")).status_code == 200
            first_version = gw.loaded.version

            for broken in (
                "version: 1\nupstreams: {}\nroutes: [{match: {path: /x/*}, upstream: nowhere}]\n",
                "version: 1\nupstreams: [\n",  # not even YAML
                _policy(echo.port, "/api").replace("version: 1", "version: 1\nbogus_key: 1"),  # type: ignore[attr-defined]
            ):
                path.write_text(broken)
                assert await gw.reload() is False
                assert gw.loaded.version == first_version
                response = await client.get("/api/echo/b")
                assert response.status_code == 200
                assert response.json()["path"] == "/api/echo/b"

            path.write_text(_policy(echo.port, "/v2"))  # type: ignore[attr-defined]
            assert await gw.reload() is True
            assert gw.loaded.version != first_version
            assert (await client.get("/v2/echo/c")).status_code == 200
            gone = await client.get("/api/echo/d")
            assert gone.status_code == 404
            assert gone.json()["error"] == "no_route"
    finally:
        await gw.close()


async def test_requests_in_flight_finish_on_the_old_policy_after_a_reload(tmp_path: Path, echo: EchoApp) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(_policy(echo.port, "/api"))  # type: ignore[attr-defined]
    gw = gateway.create_app(path)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw), base_url="http://gw.test") as client:
            slow = asyncio.ensure_future(client.get("/api/slow/inflight?s=0.5"))
            await asyncio.sleep(0.2)  # the request is waiting on the upstream
            path.write_text(_policy(echo.port, "/v2"))  # type: ignore[attr-defined]
            assert await gw.reload() is True
            response = await slow
        assert response.status_code == 200 and response.text == "slow"
    finally:
        await gw.close()


def test_admin_reload_endpoint(tmp_path: Path, echo: EchoApp) -> None:
    path = tmp_path / "policy.yaml"
    admin = f'admin: {{ token: "{ADMIN_TOKEN}" }}\n'
    path.write_text(_policy(echo.port, "/api") + admin)  # type: ignore[attr-defined]
    app = gateway.create_app(path)
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with UvicornThread(app, proxy_headers=False) as server, httpx.Client(base_url=server.url) as client:
        path.write_text("version: 1\nroutes: oops\n")
        refused = client.post("/_edgeway/reload", headers=auth)
        assert refused.status_code == 422
        assert refused.json()["reloaded"] is False
        assert client.get("/api/echo/x").status_code == 200
        path.write_text(_policy(echo.port, "/v2") + admin)  # type: ignore[attr-defined]
        assert client.post("/_edgeway/reload").status_code == 401
        applied = client.post("/_edgeway/reload", headers=auth)
        assert applied.status_code == 200
        assert applied.json()["reloaded"] is True
        assert client.get("/v2/echo/x").status_code == 200
        assert client.get("/api/echo/x").status_code == 404


# ----------------------------------------------------------------------------- rate limit smoke


def test_rate_limit_through_gateway(gw: Served) -> None:
    with httpx.Client() as client:
        allowed = [client.get(f"{gw.url}/limited") for _ in range(3)]
        limited = client.get(f"{gw.url}/limited")
    for response in allowed:
        assert response.status_code == 200
        assert "ratelimit-policy" in response.headers
        assert "ratelimit" in response.headers
    assert_gateway_error(limited, 429, "rate_limited")
    assert int(limited.headers["retry-after"]) >= 1
    assert "ratelimit" in limited.headers


async def test_a_requests_context_is_freed_with_it_not_left_to_the_cyclic_collector(tmp_path: Path,
                                                                                    echo: EchoApp) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(_policy(echo.port, "/api") + "    limits: [{ rate: 1000/minute, key: ip }]\n")  # type: ignore[attr-defined]
    gw = gateway.create_app(path)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw), base_url="http://gw.test") as client:
            assert (await client.get("/api/echo/a")).status_code == 200  # warm

            async def two_requests() -> None:
                assert (await client.get("/api/echo/a")).status_code == 200
                assert (await client.get("/nowhere")).status_code == 404

            assert await contexts_left(two_requests) <= 1  # (a request may still be winding down in the transport)
    finally:
        await gw.close()
