"""RateLimitMiddleware / RateLimitPolicy behaviour, on the memory store with a controllable clock."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import http_sfv
import httpx
import pytest

from edgeway.middleware.ratelimit import Limit, RateLimitMiddleware
from edgeway.middleware.store import Command, Store, StoreError
from edgeway.middleware.store.memory import MemoryStore
from tests.clock import Clock

CLIENT = "203.0.113.7"
PROXY = "10.0.0.1"

T0 = 1_700_000_020.0


class CountingStore(Store):
    """Wraps a store and counts round trips (execute calls) and commands."""

    kind = "counting"

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.calls = 0
        self.commands = 0

    async def execute(self, commands: Sequence[Command], *, timeout: float | None = None) -> list[object]:
        self.calls += 1
        self.commands += len(commands)
        return await self.inner.execute(commands, timeout=timeout)

    async def ping(self) -> None:
        await self.inner.ping()


class FailingStore(Store):
    kind = "failing"

    async def execute(self, commands: Sequence[Command], *, timeout: float | None = None) -> list[object]:
        raise StoreError("down")

    async def ping(self) -> None:
        raise StoreError("down")


async def ok_app(scope, receive, send):  # type: ignore[no-untyped-def]
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def client_for(app, peer: str = CLIENT) -> httpx.AsyncClient:  # type: ignore[no-untyped-def]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(peer, 5000)), base_url="http://test")


def parse_list(value: str) -> list[tuple[str, dict[str, object]]]:
    parsed = http_sfv.List()
    parsed.parse(value.encode())
    return [(item.value, dict(item.params)) for item in parsed]


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


async def test_ietf_fields_are_valid_structured_fields(clock: Clock) -> None:
    app = RateLimitMiddleware(ok_app, limits=["10/minute", "100/day"], store=MemoryStore(clock=clock))
    async with client_for(app) as client:
        for _ in range(3):
            response = await client.get("/")
    assert response.status_code == 200
    assert parse_list(response.headers["ratelimit-policy"]) == [
        ("minute", {"q": 10, "w": 60}),
        ("day", {"q": 100, "w": 86400}),
    ]
    # clock is 40 s into its minute and 1_700_000_020 % 86400 = 80020 s into its day
    assert parse_list(response.headers["ratelimit"]) == [
        ("minute", {"r": 7, "t": 20}),
        ("day", {"r": 97, "t": 86400 - 80020}),
    ]


async def test_rejection_is_problem_json_with_retry_after(clock: Clock) -> None:
    app = RateLimitMiddleware(ok_app, limits=[Limit(rate="2/minute", algorithm="fixed-window")],
                              store=MemoryStore(clock=clock))
    async with client_for(app) as client:
        assert [(await client.get("/")).status_code for _ in range(2)] == [200, 200]
        response = await client.get("/")
    assert response.status_code == 429
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["edgeway-error"] == "rate_limited"
    assert response.headers["retry-after"] == "20"
    body = response.json()
    assert body["type"] == "https://iana.org/assignments/http-problem-types#quota-exceeded"
    assert body["violated-policies"] == ["minute"]
    assert (body["error"], body["limit"], body["retry_after"]) == ("rate_limited", "2/minute", 20)
    assert parse_list(response.headers["ratelimit"]) == [("minute", {"r": 0, "t": 20})]


async def test_request_rejected_by_one_limit_is_counted_by_none(clock: Clock) -> None:
    app = RateLimitMiddleware(ok_app, limits=[Limit(rate="5/minute", algorithm="fixed-window"),
                                              Limit(rate="2/hour", algorithm="fixed-window")],
                              store=MemoryStore(clock=clock))
    async with client_for(app) as client:
        statuses = [(await client.get("/")).status_code for _ in range(4)]
        response = await client.get("/")
    assert statuses == [200, 200, 429, 429]
    # the minute limit was charged only for the two admitted requests
    assert parse_list(response.headers["ratelimit"])[0] == ("minute", {"r": 3, "t": 20})


async def test_two_limits_cost_one_store_round_trip(clock: Clock) -> None:
    store = CountingStore(MemoryStore(clock=clock))
    app = RateLimitMiddleware(ok_app, limits=["10/minute", "100/day"], store=store)
    async with client_for(app) as client:
        for _ in range(5):
            await client.get("/")
    assert (store.calls, store.commands) == (5, 5)


async def test_blocked_key_is_rejected_locally_until_retry(clock: Clock) -> None:
    store = CountingStore(MemoryStore(clock=clock))
    app = RateLimitMiddleware(ok_app, limits=[Limit(rate="1/minute", algorithm="fixed-window")], store=store)
    async with client_for(app) as client:
        await client.get("/")
        assert (await client.get("/")).status_code == 429
        calls = store.calls
        again = await client.get("/")
    assert again.status_code == 429 and again.headers["retry-after"]
    assert store.calls == calls  # the ephemeral block cache answered


async def test_spoofed_forwarded_for_from_untrusted_peer_does_not_change_key(clock: Clock) -> None:
    app = RateLimitMiddleware(ok_app, limits=[Limit(rate="2/minute", algorithm="fixed-window")],
                              store=MemoryStore(clock=clock), trusted_proxies=[f"{PROXY}/32"])
    async with client_for(app) as client:
        statuses = [
            (await client.get("/", headers={"x-forwarded-for": f"198.51.100.{i}"})).status_code for i in range(3)
        ]
    assert statuses == [200, 200, 429]


async def test_forwarded_for_from_trusted_proxy_sets_the_key(clock: Clock) -> None:
    app = RateLimitMiddleware(ok_app, limits=[Limit(rate="1/minute", algorithm="fixed-window")],
                              store=MemoryStore(clock=clock), trusted_proxies=[f"{PROXY}/32"])
    async with client_for(app, peer=PROXY) as client:
        first = await client.get("/", headers={"x-forwarded-for": "198.51.100.1"})
        second = await client.get("/", headers={"x-forwarded-for": "198.51.100.2"})
        third = await client.get("/", headers={"x-forwarded-for": "198.51.100.2, 10.0.0.1"})
    assert (first.status_code, second.status_code, third.status_code) == (200, 200, 429)


async def test_ipv6_clients_share_a_limit_per_64(clock: Clock) -> None:
    app = RateLimitMiddleware(ok_app, limits=[Limit(rate="1/minute", algorithm="fixed-window")],
                              store=MemoryStore(clock=clock))
    async with client_for(app, peer="2001:db8:1:2::1") as one, client_for(app, peer="2001:db8:1:2::ffff") as two:
        assert (await one.get("/")).status_code == 200
        assert (await two.get("/")).status_code == 429
    async with client_for(app, peer="2001:db8:1:3::1") as other:
        assert (await other.get("/")).status_code == 200


@pytest.mark.parametrize(
    ("on_missing", "expected"),
    [("ip", [200, 429]), ("deny", [400, 400]), ("skip", [200, 200])],
)
async def test_on_missing_key(clock: Clock, on_missing: str, expected: list[int]) -> None:
    app = RateLimitMiddleware(
        ok_app, limits=[Limit(rate="1/minute", key="header:X-Api-Key", on_missing=on_missing,
                              algorithm="fixed-window")],
        store=MemoryStore(clock=clock),
    )
    async with client_for(app) as client:
        responses = [await client.get("/") for _ in range(2)]
    assert [r.status_code for r in responses] == expected
    if on_missing == "deny":
        assert responses[0].json()["error"] == "missing_key"


async def test_header_keys_are_separate_quotas(clock: Clock) -> None:
    app = RateLimitMiddleware(ok_app, limits=[Limit(rate="1/minute", key="header:X-Api-Key")],
                              store=MemoryStore(clock=clock))
    async with client_for(app) as client:
        a = await client.get("/", headers={"x-api-key": "a"})
        b = await client.get("/", headers={"x-api-key": "b"})
        a2 = await client.get("/", headers={"x-api-key": "a"})
    assert (a.status_code, b.status_code, a2.status_code) == (200, 200, 429)


async def test_shadow_limit_reports_but_never_rejects(clock: Clock) -> None:
    app = RateLimitMiddleware(ok_app, limits=[Limit(rate="1/minute", mode="shadow", algorithm="fixed-window")],
                              store=MemoryStore(clock=clock))
    async with client_for(app) as client:
        responses = [await client.get("/") for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert parse_list(responses[-1].headers["ratelimit"]) == [("minute", {"r": 0, "t": 20})]


async def test_exempt_cidr_and_header_bypass_the_limit(clock: Clock) -> None:
    limit = Limit(rate="1/minute", exempt=("203.0.113.0/24", "header:X-Health=probe"), algorithm="fixed-window")
    app = RateLimitMiddleware(ok_app, limits=[limit], store=MemoryStore(clock=clock))
    async with client_for(app) as client:
        assert [(await client.get("/")).status_code for _ in range(3)] == [200, 200, 200]
    async with client_for(app, peer="198.51.100.9") as other:
        probe = [(await other.get("/", headers={"x-health": "probe"})).status_code for _ in range(2)]
        plain = [(await other.get("/")).status_code for _ in range(2)]
    assert probe == [200, 200] and plain == [200, 429]


async def test_override_gives_a_key_its_own_rate(clock: Clock) -> None:
    limit = Limit(rate="1/minute", key="header:X-Api-Key", overrides=({"match": "premium", "rate": "3/minute"},),
                  algorithm="fixed-window")
    app = RateLimitMiddleware(ok_app, limits=[limit], store=MemoryStore(clock=clock))
    async with client_for(app) as client:
        premium = [(await client.get("/", headers={"x-api-key": "premium"})).status_code for _ in range(4)]
        basic = [(await client.get("/", headers={"x-api-key": "basic"})).status_code for _ in range(2)]
    assert premium == [200, 200, 200, 429] and basic == [200, 429]


@pytest.mark.parametrize(("mode", "status"), [("open", 200), ("closed", 503)])
async def test_store_failure_mode(mode: str, status: int) -> None:
    app = RateLimitMiddleware(ok_app, limits=[Limit(rate="1/minute", on_store_failure=mode)], store=FailingStore())
    async with client_for(app) as client:
        response = await client.get("/")
    assert response.status_code == status
    if status == 503:
        assert response.json()["error"] == "store_unavailable"


@pytest.mark.parametrize(
    ("headers", "present", "absent"),
    [
        ("ietf", {"ratelimit", "ratelimit-policy"}, {"x-ratelimit-limit"}),
        ("legacy", {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"}, {"ratelimit"}),
        ("both", {"ratelimit", "x-ratelimit-remaining"}, set()),
        ("none", set(), {"ratelimit", "ratelimit-policy", "x-ratelimit-limit"}),
    ],
)
async def test_header_styles(clock: Clock, headers: str, present: set[str], absent: set[str]) -> None:
    app = RateLimitMiddleware(ok_app, limits=[Limit(rate="5/minute", headers=headers, algorithm="fixed-window")],
                              store=MemoryStore(clock=clock))
    async with client_for(app) as client:
        response = await client.get("/")
    assert present <= set(response.headers) and not (absent & set(response.headers))
    if headers == "legacy":
        assert (response.headers["x-ratelimit-limit"], response.headers["x-ratelimit-remaining"],
                response.headers["x-ratelimit-reset"]) == ("5", "4", "20")


def test_limit_validation_messages() -> None:
    with pytest.raises(ValueError, match="burst applies to algorithm token-bucket only"):
        Limit(rate="1/minute", burst=5)
    with pytest.raises(ValueError, match="unknown key 'cookie'"):
        Limit(rate="1/minute", key="cookie")
    with pytest.raises(ValueError, match="bad exemption"):
        Limit(rate="1/minute", exempt=("nonsense",))


async def test_non_http_scopes_pass_through() -> None:
    seen = []

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        seen.append(scope["type"])

    middleware = RateLimitMiddleware(app, limits=["1/minute"], store=FailingStore())
    await middleware({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan"]


def usage_app(header: bytes | None, body: bytes):  # type: ignore[no-untyped-def]
    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        headers = [(b"content-type", b"application/json")]
        if header is not None:
            headers.append((b"x-tokens-used", header))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        half = len(body) // 2
        await send({"type": "http.response.body", "body": body[:half], "more_body": True})
        await send({"type": "http.response.body", "body": body[half:]})

    return app


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("cost_from", "app"),
    [
        ("response_header:X-Tokens-Used", usage_app(b"7", b"{}")),
        ("usage.total_tokens", usage_app(None, b'{"usage": {"total_tokens": 7}, "text": "hi"}')),
        ("json:usage.total_tokens", usage_app(None, b'{"usage": {"total_tokens": 7}}')),
    ],
)
async def test_cost_from_debits_the_reported_cost_after_the_response(clock: Clock, cost_from: str, app) -> None:  # type: ignore[no-untyped-def]
    limit = Limit(rate="10/minute", cost_from=cost_from, algorithm="fixed-window")
    wrapped = RateLimitMiddleware(app, limits=[limit], store=MemoryStore(clock=clock))
    async with client_for(wrapped) as client:
        first = await client.get("/")
        await settle()
        second = await client.get("/")
        await settle()
        third = await client.get("/")
    assert first.status_code == 200 and parse_list(first.headers["ratelimit"]) == [("minute", {"r": 9, "t": 20})]
    # 1 charged up front + 6 debited afterwards, then 1 more up front
    assert parse_list(second.headers["ratelimit"]) == [("minute", {"r": 2, "t": 20})]
    assert third.status_code == 429  # 2 - 6 later: the quota is spent


async def test_cost_from_without_a_reported_cost_charges_only_the_up_front_cost(clock: Clock) -> None:
    limit = Limit(rate="10/minute", cost_from="response_header:X-Tokens-Used", algorithm="fixed-window")
    wrapped = RateLimitMiddleware(usage_app(None, b"{}"), limits=[limit], store=MemoryStore(clock=clock))
    async with client_for(wrapped) as client:
        await client.get("/")
        await settle()
        second = await client.get("/")
    assert parse_list(second.headers["ratelimit"]) == [("minute", {"r": 8, "t": 20})]


def test_cost_from_validation() -> None:
    with pytest.raises(ValueError, match="bad cost_from"):
        Limit(rate="1/minute", cost_from="usage total")


@pytest.mark.parametrize("algorithm", ["sliding-window", "sliding-log", "fixed-window", "token-bucket"])
async def test_the_violated_policy_t_equals_retry_after(clock: Clock, algorithm: str) -> None:
    # 3/minute used up, a 4th request 5 s later: a client waiting `t` must not be refused again
    store = MemoryStore(clock=clock)
    limits = [Limit(rate="3/minute", algorithm=algorithm), Limit(rate="100/day")]
    app = RateLimitMiddleware(ok_app, limits=limits, store=store)
    async with client_for(app) as client:
        for _ in range(3):
            assert (await client.get("/")).status_code == 200
        clock.now += 5
        refused = await client.get("/")
        assert refused.status_code == 429
        fields = dict(parse_list(refused.headers["ratelimit"]))
        assert fields["minute"]["t"] == int(refused.headers["retry-after"])
        assert fields["day"]["t"] > int(refused.headers["retry-after"])  # the limit that admitted keeps its reset
    clock.now += fields["minute"]["t"]  # type: ignore[operator]
    # a fresh middleware on the same store: the instance's local block list runs on real time
    async with client_for(RateLimitMiddleware(ok_app, limits=limits, store=store)) as client:
        assert (await client.get("/")).status_code == 200
