"""CircuitBreakerMiddleware and CircuitBreaker on the memory store with a fake clock: no sleeps for open windows."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from typing import Any

import httpx
import pytest

from edgeway.middleware import BreakerSettings, CircuitBreaker, CircuitBreakerMiddleware, CircuitOpen
from edgeway.middleware.breaker import Admission
from edgeway.middleware.breaker_config import FallbackResponse
from edgeway.middleware.breaker_policy import BreakerPolicy
from edgeway.middleware.breaker_state import Phase
from edgeway.middleware.pipeline import PolicyPipeline
from edgeway.middleware.store import BreakerUpdate, Command, Set, Store, StoreError
from edgeway.middleware.store.failover import FailoverStore
from edgeway.middleware.store.memory import MemoryStore
from edgeway.middleware.store.redis import RedisStore
from tests.clock import Clock

T0 = 1_700_000_000.0


class NoJitter(random.Random):
    """Openings last exactly ``open_for`` x n, so Retry-After is exact."""

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:  # type: ignore[override]
        return 0


class CountingStore(Store):
    """Wraps a store, counting breaker commands; ``down`` makes every call fail."""

    kind = "counting"

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.breaker_commands = 0
        self.down = False

    async def execute(self, commands: Sequence[Command], *, timeout: float | None = None) -> list[object]:
        if self.down:
            raise StoreError("down")
        self.breaker_commands += sum(isinstance(c, BreakerUpdate) for c in commands)
        return await self.inner.execute(commands, timeout=timeout)

    async def ping(self) -> None:
        await self.inner.ping()


class Upstream:
    """An ASGI app answering ``status`` (and counting calls); ``gate`` holds requests until set."""

    def __init__(self) -> None:
        self.status = 200
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"answer"})


class Harness:
    def __init__(self, settings: BreakerSettings, store: Store | None = None, **options: Any) -> None:
        self.clock = Clock(T0)
        self.store = store or CountingStore(MemoryStore(clock=self.clock))
        self.upstream = Upstream()
        options.setdefault("rng", NoJitter())
        self.breaker = CircuitBreaker("api", settings, store=self.store, clock=self.clock, **options)
        self.app = CircuitBreakerMiddleware(self.upstream, breaker=self.breaker)
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://gw")

    async def get(self, path: str = "/x", **kwargs: Any) -> httpx.Response:
        response = await self.client.get(path, **kwargs)
        await settle(self.app)
        return response

    async def answers(self, *statuses: int) -> list[int]:
        """The upstream answers each status in turn; returns what the client got."""
        got = []
        for status in statuses:
            self.upstream.status = status
            got.append((await self.get()).status_code)
        return got


async def settle(app: PolicyPipeline) -> None:
    """Let the deferred writes (and what the breaker learns from them) finish."""
    for _ in range(5):
        while app._background:
            await asyncio.gather(*app._background)
        await asyncio.sleep(0)


# -- CLOSED -> OPEN -------------------------------------------------------------------------------


async def call_client_gone(app: PolicyPipeline) -> int:
    """One GET whose client has already left (receive says disconnect); the status it was answered with."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/x", "raw_path": b"/x", "query_string": b"",
             "headers": [], "client": ("203.0.113.9", 1234)}
    await app(scope, receive, send)
    await settle(app)
    return int(sent[0]["status"])


async def test_opens_after_exactly_n_consecutive_failures() -> None:
    h = Harness(BreakerSettings(failures=3))
    assert await h.answers(503, 503) == [503, 503]
    assert h.breaker.phase == Phase.CLOSED
    assert await h.answers(503) == [503]
    assert h.breaker.phase == Phase.OPEN
    calls = h.upstream.calls
    response = await h.get()
    assert response.status_code == 503
    assert response.headers["edgeway-error"] == "upstream_unavailable"
    assert response.json() == {"upstream": "api", "error": "upstream_unavailable",
                               "message": "upstream api is failing; its circuit breaker is open"}
    assert response.headers["retry-after"] == "60"
    assert h.upstream.calls == calls  # short-circuited


async def test_a_success_between_failures_keeps_it_closed() -> None:
    h = Harness(BreakerSettings(failures=3))
    assert await h.answers(503, 503, 200, 503, 503, 200, 503, 503) == [503, 503, 200, 503, 503, 200, 503, 503]
    assert h.breaker.phase == Phase.CLOSED


@pytest.mark.parametrize(("status", "counted"), [(500, False), (502, True), (503, True), (504, True), (404, False),
                                                  (429, False), (200, False)])
async def test_which_statuses_count(status: int, counted: bool) -> None:
    h = Harness(BreakerSettings(failures=2))
    await h.answers(status, status)
    assert (h.breaker.phase == Phase.OPEN) is counted


async def test_4xx_neither_counts_nor_resets() -> None:
    h = Harness(BreakerSettings(failures=2))
    await h.answers(503, 404, 401)
    assert h.breaker.phase == Phase.CLOSED
    await h.answers(503)
    assert h.breaker.phase == Phase.OPEN


async def test_a_closed_breaker_with_no_failures_sends_no_store_command() -> None:
    h = Harness(BreakerSettings(failures=3))
    await h.answers(200)  # the first request reads the shared state once
    assert isinstance(h.store, CountingStore)
    before = h.store.breaker_commands
    await h.answers(*[200] * 50)
    assert h.store.breaker_commands == before
    h.clock.now += 1.0  # the local copy is re-read at most once per sync interval
    await h.answers(*[200] * 50)
    assert h.store.breaker_commands == before + 1


async def test_a_closed_breaker_costs_a_request_an_in_flight_count_and_nothing_else() -> None:
    h = Harness(BreakerSettings(failures=3))
    await h.answers(200)  # the first request re-reads the shared state
    breaker = h.breaker
    assert breaker.before() is None  # no command, no re-read due
    assert breaker.admit(None, None) is Admission.CALL and breaker.in_flight == 1
    assert breaker.record(Admission.CALL, False) is None and breaker.in_flight == 0  # no write for a success
    await h.answers(200, 404, 200)
    assert breaker.in_flight == 0 and breaker.status()["failures"] == 0


async def test_failure_rate_trips_only_past_min_requests() -> None:
    h = Harness(BreakerSettings(failure_rate="50%", min_requests=6, window="10s"))
    await h.answers(503, 503, 503, 503, 503)  # 100% failed, but only 5 requests
    assert h.breaker.phase == Phase.CLOSED
    await h.answers(503)
    assert h.breaker.phase == Phase.OPEN


async def test_failure_rate_counts_the_successes_too() -> None:
    h = Harness(BreakerSettings(failure_rate="50%", min_requests=6, window="10s"))
    for status in (200, 503) * 2 + (200, 200):
        await h.answers(status)
        h.clock.now += 1.0  # successes are sent in bulk at most once per sync interval
    await h.answers(503)  # 3 of 7 failed: under 50%
    assert h.breaker.phase == Phase.CLOSED
    await h.answers(503)  # 4 of 8: at 50%
    assert h.breaker.phase == Phase.OPEN


async def test_slow_calls_count_as_failures() -> None:
    h = Harness(BreakerSettings(failures=1, slow_call="50ms"))
    h.upstream.gate = asyncio.Event()
    asyncio.get_running_loop().call_later(0.1, h.upstream.gate.set)
    assert (await h.get()).status_code == 200
    assert h.breaker.phase == Phase.OPEN


# -- OPEN -> HALF_OPEN -> CLOSED / OPEN ---------------------------------------------------------------


async def test_one_probe_then_closed_after_success() -> None:
    h = Harness(BreakerSettings(failures=1, open_for="30s"))
    await h.answers(503)
    h.clock.now += 29
    assert (await h.get()).status_code == 503
    h.clock.now += 1
    h.upstream.status = 200
    h.upstream.gate = asyncio.Event()
    probe = asyncio.ensure_future(h.client.get("/x"))
    while h.upstream.calls < 2:
        await asyncio.sleep(0)
    others = [await h.client.get("/x") for _ in range(5)]  # while the probe is out
    assert {r.status_code for r in others} == {503}
    assert {r.headers["retry-after"] for r in others} == {"1"}
    h.upstream.gate.set()
    assert (await probe).status_code == 200
    await settle(h.app)
    assert h.breaker.phase == Phase.CLOSED
    assert h.upstream.calls == 2
    assert (await h.get()).status_code == 200


async def test_a_failed_probe_reopens_for_longer_up_to_the_cap() -> None:
    h = Harness(BreakerSettings(failures=1, open_for="10s", max_open_for="25s"), rng=NoJitter())
    await h.answers(503)
    assert (await h.get()).headers["retry-after"] == "10"
    h.clock.now += 10
    await h.answers(503)  # the probe fails
    assert (await h.get()).headers["retry-after"] == "20"
    h.clock.now += 20
    await h.answers(503)
    assert (await h.get()).headers["retry-after"] == "25"


async def test_success_threshold_needs_that_many_probes() -> None:
    h = Harness(BreakerSettings(failures=1, open_for="5s", success_threshold=2))
    await h.answers(503)
    h.clock.now += 5
    assert await h.answers(200) == [200]
    assert h.breaker.phase == Phase.HALF_OPEN
    assert await h.answers(200) == [200]
    assert h.breaker.phase == Phase.CLOSED


async def test_a_probe_answered_with_4xx_closes_it() -> None:
    h = Harness(BreakerSettings(failures=1, open_for="5s"))
    await h.answers(503)
    h.clock.now += 5
    await h.answers(404)
    assert h.breaker.phase == Phase.CLOSED


# -- while open ---------------------------------------------------------------------------------------


async def test_static_fallback_while_open() -> None:
    fallback = FallbackResponse(status=200, body='{"message": "busy"}', headers={"Content-Type": "application/json"})
    h = Harness(BreakerSettings(failures=1, fallback=fallback))
    await h.answers(503)
    response = await h.get()
    assert response.status_code == 200
    assert response.json() == {"message": "busy"}
    assert response.headers["content-type"] == "application/json"
    assert response.headers["edgeway-error"] == "upstream_unavailable"


async def test_the_caches_stale_entry_while_open() -> None:
    from edgeway.middleware.policy import BasePolicy, Prepared
    from edgeway.middleware.responses import Response

    class StaleCache(BasePolicy):
        def prepare(self, ctx: Any) -> Prepared:
            ctx.stale = Response(200, [(b"cache-status", b"edgeway; hit; stale")], [b"old"])
            return Prepared()

        def decide(self, ctx: Any, prepared: Prepared, results: Sequence[object]) -> None:
            return None

    clock = Clock(T0)
    store = MemoryStore(clock=clock)
    breaker = CircuitBreaker("api", BreakerSettings(failures=1), store=store, clock=clock)
    upstream = Upstream()
    upstream.status = 503
    app = PolicyPipeline(upstream, policies=[StaleCache(), BreakerPolicy(breaker)], store=store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        assert (await client.get("/x")).status_code == 503
        await settle(app)
        response = await client.get("/x")
    assert (response.status_code, response.text) == (200, "old")
    assert response.headers["cache-status"] == "edgeway; hit; stale"


async def test_bulkhead_rejects_past_max_in_flight() -> None:
    h = Harness(BreakerSettings(max_in_flight=2))
    h.upstream.gate = asyncio.Event()
    held = [asyncio.ensure_future(h.client.get("/x")) for _ in range(2)]
    while h.upstream.calls < 2:
        await asyncio.sleep(0)
    rejected = await h.client.get("/x")
    assert rejected.status_code == 503
    assert rejected.headers["edgeway-error"] == "upstream_overloaded"
    assert rejected.json()["upstream"] == "api"
    h.upstream.gate.set()
    assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
    await settle(h.app)
    assert h.breaker.in_flight == 0
    assert (await h.get()).status_code == 200


async def test_admin_reset_closes_it() -> None:
    h = Harness(BreakerSettings(failures=1))
    await h.answers(503)
    status = await h.breaker.reset()
    assert status["state"] == "closed"
    assert await h.answers(200) == [200]


# -- stores --------------------------------------------------------------------------------------------


async def test_with_every_store_down_the_local_breaker_still_opens_and_recovers() -> None:
    h = Harness(BreakerSettings(failures=2, open_for="10s"))
    assert isinstance(h.store, CountingStore)
    h.store.down = True
    await h.answers(503, 503)
    assert h.breaker.phase == Phase.OPEN
    assert h.breaker.status()["shared"] is False
    assert (await h.get()).status_code == 503
    h.clock.now += 10
    assert await h.answers(200) == [200]  # the local probe
    assert h.breaker.phase == Phase.CLOSED


async def test_an_open_breaker_stays_open_when_the_store_fails() -> None:
    h = Harness(BreakerSettings(failures=1, open_for="60s"))
    await h.answers(503)
    assert isinstance(h.store, CountingStore)
    h.store.down = True
    h.clock.now += 5  # a re-read is due: it fails, the local breaker takes over from our view
    calls = h.upstream.calls
    response = await h.get()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "55"
    assert h.upstream.calls == calls


async def test_a_fresh_fallback_store_is_seeded_with_the_open_state() -> None:
    clock = Clock(T0)
    first, second = MemoryStore(clock=clock), MemoryStore(clock=clock)
    breaker = CircuitBreaker("api", BreakerSettings(failures=1, open_for="60s"), store=first, clock=clock,
                             rng=NoJitter())
    async with breaker:
        breaker.fail()
    await asyncio.gather(*breaker._background)
    breaker.store = second  # as when the chain moved to its next store
    clock.now += 2
    with pytest.raises(CircuitOpen):
        async with breaker:
            pass
    other = CircuitBreaker("api", BreakerSettings(failures=1, open_for="60s"), store=second, clock=clock)
    with pytest.raises(CircuitOpen) as refused:
        async with other:
            pass
    assert refused.value.retry_after == 58


async def test_a_corrupted_breaker_key_is_never_a_500(redis_url: str) -> None:
    redis = RedisStore(redis_url)
    store = FailoverStore(redis, [MemoryStore()])
    settings = BreakerSettings(failures=1)
    breaker = CircuitBreaker("corrupt", settings, store=store, key_prefix="edgeway-test-corrupt:")
    await redis.execute([Set(breaker.key, "not a hash", 60_000)])
    app = CircuitBreakerMiddleware(Upstream(), breaker=breaker)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            assert (await client.get("/x")).status_code == 200
            await settle(app)
    finally:
        await breaker.close()  # its subscription first, then the store
        await store.close()


# -- in code ------------------------------------------------------------------------------------------


async def test_async_with_and_the_decorator_share_one_breaker() -> None:
    clock = Clock(T0)
    store = MemoryStore(clock=clock)
    breaker = CircuitBreaker("provider", BreakerSettings(failures=2, open_for="30s"), store=store, clock=clock,
                             rng=NoJitter())
    calls = 0

    @breaker
    async def call_provider(fail: bool) -> str:
        nonlocal calls
        calls += 1
        if fail:
            raise ConnectionError("provider down")
        return "ok"

    assert await call_provider(False) == "ok"
    with pytest.raises(ConnectionError):
        await call_provider(True)
    async with breaker:
        breaker.fail()  # a failure that raised nothing (an HTTP 503)
    await asyncio.gather(*breaker._background)
    with pytest.raises(CircuitOpen) as refused:
        await call_provider(False)
    assert refused.value.retry_after == 30
    assert calls == 2
    clock.now += 30
    assert await call_provider(False) == "ok"  # the probe
    await asyncio.gather(*breaker._background)
    assert breaker.phase == Phase.CLOSED


async def test_a_cancelled_call_does_not_count() -> None:
    clock = Clock(T0)
    breaker = CircuitBreaker("p", BreakerSettings(failures=1), store=MemoryStore(clock=clock), clock=clock)

    async def hang() -> None:
        async with breaker:
            await asyncio.Event().wait()

    task = asyncio.ensure_future(hang())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.phase == Phase.CLOSED
    assert breaker.in_flight == 0


async def test_one_log_line_per_transition_names_upstream_reason_and_instance(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Harness(BreakerSettings(failures=2, open_for="5s"), instance_id="inst-1")
    with caplog.at_level(logging.WARNING, logger="edgeway.breaker"):
        await h.answers(503, 503, 503)
        h.clock.now += 5
        await h.answers(200)
    lines = [r.getMessage() for r in caplog.records if r.name == "edgeway.breaker"]
    assert lines == [
        "breaker api -> open: consecutive failures (instance inst-1)",
        "breaker api -> half_open: open time over: probing (instance inst-1)",
        "breaker api -> closed: the half-open probe succeeded (instance inst-1)",
    ]




@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_where_the_store_notifies_other_instances_re_read_at_once(kind: str,
                                                                        request: pytest.FixtureRequest) -> None:
    clock = Clock(T0)
    if kind == "memory":
        shared = MemoryStore(clock=clock)
        stores: list[Store] = [shared, shared]
    else:
        url = request.getfixturevalue("redis_url")
        stores = [RedisStore(url, clock=clock), RedisStore(url, clock=clock)]
    prefix = f"edgeway-test-notify-{kind}:"
    a, b = (CircuitBreaker("api", BreakerSettings(failures=1), store=s, clock=clock, key_prefix=prefix,
                           rng=NoJitter()) for s in stores)
    try:
        for breaker in (a, b):
            async with breaker:
                pass
        for _ in range(200):  # both subscribed (in the background)
            if a._subscription is not None and b._subscription is not None:
                break
            await asyncio.sleep(0.01)
        assert b.before() is None  # B's copy is fresh: no re-read due for a while
        async with a:
            a.fail()
        for _ in range(200):
            command = b.before()
            if command is not None:
                break
            await asyncio.sleep(0.01)
        assert command is not None  # told by the notification, not by the clock (which has not moved)
        (result,) = await b.store.execute([command])
        assert isinstance(b.admit(command, result), CircuitOpen)
    finally:
        await a.close()
        await b.close()
        for store in {id(s): s for s in stores}.values():
            await store.close()


async def test_a_response_cut_short_does_not_count() -> None:
    clock = Clock(T0)
    breaker = CircuitBreaker("api", BreakerSettings(failures=1), store=MemoryStore(clock=clock), clock=clock)

    async def cut_short(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        # the client left here: the response never ends

    app = CircuitBreakerMiddleware(cut_short, breaker=breaker)
    assert await call_client_gone(app) == 503
    assert breaker.phase == Phase.CLOSED
    assert breaker.in_flight == 0


async def test_a_probe_whose_client_left_hands_the_token_back() -> None:
    clock = Clock(T0)
    breaker = CircuitBreaker("api", BreakerSettings(failures=1, open_for="5s"), store=MemoryStore(clock=clock),
                             clock=clock, rng=NoJitter())
    mode = {"status": 503, "cut": False}

    async def upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": mode["status"], "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": bool(mode["cut"])})

    app = CircuitBreakerMiddleware(upstream, breaker=breaker)

    assert await call_client_gone(app) == 503  # opens
    clock.now += 5
    mode.update(status=200, cut=True)
    assert await call_client_gone(app) == 200  # the probe, cut short: says nothing
    assert breaker.phase == Phase.HALF_OPEN
    mode["cut"] = False
    assert await call_client_gone(app) == 200  # the next request probes at once, not after the probe timeout
    assert breaker.phase == Phase.CLOSED
