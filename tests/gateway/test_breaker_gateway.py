"""The breaker in the gateway, against a real upstream server the test makes fail, hang and recover.

The gateway runs in-process (httpx's ASGI transport) with a fake clock, so open windows pass without
sleeping; the upstream is a real HTTP server reached through the proxy's connection pool.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import httpx
import pytest

from edgeway.gateway.app import Gateway, create_app
from edgeway.gateway.loader import load_text
from edgeway.middleware.breaker_state import Phase
from tests.clock import Clock
from tests.servers import FlakyUpstream, UvicornThread, free_port

TOKEN = "admin-secret-token"
T0 = 1_700_000_000.0


def policy(url: str, breaker: str, *, read: str = "5s", cache: str | None = None) -> str:
    cached = f"\n    cache: {cache}" if cache else ""
    return f"""\
version: 1
upstreams:
  api:
    url: "{url}"
    timeout: {{ connect: 1s, read: {read} }}
    breaker: {{ {breaker} }}
routes:
  - match: {{ path: /* }}
    upstream: api{cached}
admin:
  token: {TOKEN}
"""


class Running:
    def __init__(self, gateway: Gateway, client: httpx.AsyncClient, clock: Clock) -> None:
        self.gateway, self.client, self.clock = gateway, client, clock

    @property
    def breaker(self) -> object:
        return self.gateway.breakers["api"]

    async def get(self, path: str = "/x", method: str = "GET", **kwargs: object) -> httpx.Response:
        response = await self.client.request(method, path, **kwargs)  # type: ignore[arg-type]
        await asyncio.sleep(0.01)  # the deferred breaker write
        return response


@pytest.fixture
async def gateway_for(flaky: tuple[FlakyUpstream, UvicornThread]) -> AsyncIterator[object]:
    made: list[Running] = []

    async def build(breaker: str, *, url: str | None = None, read: str = "5s", cache: str | None = None) -> Running:
        clock = Clock(T0)
        gateway = create_app(load_text(policy(url or flaky[1].url, breaker, read=read, cache=cache), "p.yaml", {}),
                             clock=clock)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gw", timeout=10)
        running = Running(gateway, client, clock)
        made.append(running)
        return running

    yield build
    for running in made:
        await running.client.aclose()
        await running.gateway.close()


async def test_opens_after_exactly_n_upstream_failures_then_short_circuits(upstream: FlakyUpstream,
                                                                          gateway_for) -> None:  # type: ignore[no-untyped-def]
    gw = await gateway_for("failures: 3")
    upstream.status = 503
    first = [await gw.get() for _ in range(3)]
    assert [(r.status_code, r.headers.get("edgeway-error")) for r in first] == [(503, None)] * 3
    refused = await gw.get()
    assert refused.status_code == 503
    assert refused.headers["edgeway-error"] == "upstream_unavailable"
    assert refused.json()["upstream"] == "api"
    assert 54 <= int(refused.headers["retry-after"]) <= 60  # 60s less up to 10% jitter
    assert upstream.total == 3


async def test_a_success_in_between_keeps_it_closed(upstream: FlakyUpstream, gateway_for) -> None:  # type: ignore[no-untyped-def]
    gw = await gateway_for("failures: 3")
    for status in (503, 503, 200, 503, 503, 200, 503, 503):
        upstream.status = status
        assert (await gw.get()).status_code == status
    assert upstream.total == 8


async def test_connect_failures_open_it(gateway_for) -> None:  # type: ignore[no-untyped-def]
    gw = await gateway_for("failures: 2", url=f"http://127.0.0.1:{free_port()}")
    assert [(await gw.get()).headers["edgeway-error"] for _ in range(3)] == [
        "bad_gateway", "bad_gateway", "upstream_unavailable"]


async def test_a_hanging_upstream_times_out_and_opens_it(upstream: FlakyUpstream, gateway_for) -> None:  # type: ignore[no-untyped-def]
    gw = await gateway_for("failures: 2", read="100ms")
    upstream.hang = 1.0
    assert [(await gw.get()).headers["edgeway-error"] for _ in range(3)] == [
        "upstream_timeout", "upstream_timeout", "upstream_unavailable"]
    assert upstream.total == 2


async def test_recovery_probe_closes_it(upstream: FlakyUpstream, gateway_for) -> None:  # type: ignore[no-untyped-def]
    gw = await gateway_for("failures: 1, open_for: 30s")
    upstream.status = 503
    await gw.get()
    upstream.status = 200
    assert (await gw.get()).status_code == 503
    gw.clock.now += 30
    assert (await gw.get()).status_code == 200  # the probe
    assert gw.gateway.breakers["api"].phase == Phase.CLOSED
    assert [(await gw.get()).status_code for _ in range(3)] == [200] * 3
    assert upstream.total == 5


async def test_a_failed_probe_reopens_for_longer(upstream: FlakyUpstream, gateway_for) -> None:  # type: ignore[no-untyped-def]
    gw = await gateway_for("failures: 1, open_for: 10s")
    upstream.status = 503
    await gw.get()
    gw.clock.now += 10
    await gw.get()  # the probe fails
    assert 18 <= int((await gw.get()).headers["retry-after"]) <= 20
    assert upstream.total == 2


async def test_retries_stay_within_budget_and_never_touch_post(upstream: FlakyUpstream, gateway_for) -> None:  # type: ignore[no-untyped-def]
    gw = await gateway_for("failures: 1000, retry: { attempts: 2, backoff: 1ms }")
    upstream.status = 503
    for _ in range(50):
        assert (await gw.get()).status_code == 503
    gets = upstream.calls["GET"]
    assert 50 < gets <= 60  # retries happened, at most 20% more
    for _ in range(10):
        await gw.get(method="POST", content=b"{}")
    assert upstream.calls["POST"] == 10


async def test_post_is_retried_only_with_the_idempotency_header(upstream: FlakyUpstream, gateway_for) -> None:  # type: ignore[no-untyped-def]
    gw = await gateway_for("failures: 1000, retry: { attempts: 1, backoff: 1ms, budget: 100%, "
                           "idempotency_header: Idempotency-Key }")
    upstream.status = 503
    for _ in range(5):
        await gw.get()  # builds up budget
    before = upstream.calls.get("POST", 0)
    await gw.get(method="POST")
    await gw.get(method="POST", headers={"Idempotency-Key": "k1"})
    assert upstream.calls["POST"] - before == 3


async def test_bulkhead_rejects_past_max_in_flight(upstream: FlakyUpstream, gateway_for) -> None:  # type: ignore[no-untyped-def]
    gw = await gateway_for("max_in_flight: 2")
    upstream.gate = threading.Event()
    held = [asyncio.ensure_future(gw.client.get("/x")) for _ in range(2)]
    for _ in range(500):
        if upstream.in_flight == 2:
            break
        await asyncio.sleep(0.01)
    rejected = await gw.client.get("/x")
    upstream.gate.set()
    assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
    assert (rejected.status_code, rejected.headers["edgeway-error"]) == (503, "upstream_overloaded")
    assert upstream.total == 2


async def test_static_fallback_while_open(upstream: FlakyUpstream, gateway_for) -> None:  # type: ignore[no-untyped-def]
    gw = await gateway_for("failures: 1, fallback: { status: 200, body: 'cached elsewhere', "
                           "headers: { content-type: text/plain } }")
    upstream.status = 502
    await gw.get()
    response = await gw.get()
    assert (response.status_code, response.text) == (200, "cached elsewhere")
    assert response.headers["edgeway-error"] == "upstream_unavailable"


async def test_status_metrics_and_admin_reset(upstream: FlakyUpstream, gateway_for) -> None:  # type: ignore[no-untyped-def]
    gw = await gateway_for("failures: 1")
    upstream.status = 503
    await gw.get()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status = (await gw.client.get("/_edgeway/status", headers=auth)).json()
    assert status["breakers"]["api"]["state"] == "open"
    metrics = (await gw.client.get("/_edgeway/metrics")).text
    assert 'edgeway_breaker_state{upstream="api"} 1.0' in metrics
    assert 'edgeway_breaker_transitions_total{to="open",upstream="api"}' in metrics
    assert (await gw.client.post("/_edgeway/breakers/api/reset")).status_code == 401
    missing = await gw.client.post("/_edgeway/breakers/nope/reset", headers=auth)
    assert (missing.status_code, missing.json()["error"]) == (404, "no_breaker")
    reset = await gw.client.post("/_edgeway/breakers/api/reset", headers=auth)
    assert reset.status_code == 200
    assert (reset.json()["upstream"], reset.json()["state"]) == ("api", "closed")
    upstream.status = 200
    assert (await gw.get()).status_code == 200


async def test_failure_rate_trips_only_past_min_requests(upstream: FlakyUpstream, gateway_for) -> None:  # type: ignore[no-untyped-def]
    gw = await gateway_for("failure_rate: 50%, min_requests: 6, window: 10s")
    upstream.status = 503
    assert [(await gw.get()).headers.get("edgeway-error") for _ in range(5)] == [None] * 5  # 5 of 5, too few
    assert (await gw.get()).headers.get("edgeway-error") is None  # the 6th reaches min_requests: it opens
    assert (await gw.get()).headers["edgeway-error"] == "upstream_unavailable"
    assert upstream.total == 6


async def test_the_cache_serves_its_stale_entry_while_the_breaker_is_open(upstream: FlakyUpstream,
                                                                          flaky: tuple[FlakyUpstream, UvicornThread],
                                                                          gateway_for) -> None:  # type: ignore[no-untyped-def]
    gw = await gateway_for("failures: 1", cache="{ ttl: 1s, stale_if_error: 1h }")
    assert (await gw.get("/page")).status_code == 200  # stored
    upstream.status = 503
    gw.clock.now += 5  # the entry is stale now
    assert (await gw.get("/page")).status_code == 503  # refreshing it fails: the breaker opens
    assert gw.gateway.breakers["api"].phase == Phase.OPEN
    calls = upstream.total
    response = await gw.get("/page")
    assert (response.status_code, response.text) == (200, "status 200")
    assert response.headers["cache-status"] == "edgeway; hit; stale"
    assert upstream.total == calls
