"""The session policy in an app, against a local Supabase Auth stand-in with tokens the tests sign.

Each test builds ``SessionMiddleware`` (or the route pipeline) over a fresh store
and asks through httpx's ASGI transport; the provider and JWKS calls are real
HTTP to :class:`tests.auth_server.AuthServer`, whose per-path call counts say
how often Edgeway asked.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edgeway.middleware.metrics import SESSION_REVOCATIONS_UNCHECKED
from edgeway.middleware.pipeline import PolicyPipeline
from edgeway.middleware.ratelimit import Limit, RateLimitPolicy
from edgeway.middleware.session import (
    SessionMiddleware,
    SessionPolicy,
    SessionService,
    SessionSettings,
    current_user,
    optional_user,
    revoke,
)
from edgeway.middleware.store import Revoked, Store
from edgeway.middleware.store.failover import FailoverStore
from edgeway.middleware.store.memory import MemoryStore
from edgeway.middleware.store.redis import RedisStore
from tests.auth_server import ANON_KEY, HS_SECRET, JWKS_PATH, USER_PATH, AuthServer, sign
from tests.servers import free_port


@pytest.fixture(scope="module")
def auth() -> Iterator[AuthServer]:
    with AuthServer() as server:
        yield server


@pytest.fixture(autouse=True)
def reset(auth: AuthServer) -> None:
    auth.mode = "ok"
    auth.publish_later = False
    auth.calls.clear()


class Clock:
    """Wall time plus an offset the test moves (JWKS cooldowns, cache TTLs) without sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The app behind the middleware: says which identity headers and state user it got."""
    user = scope.get("state", {}).get("user")
    body = json.dumps({
        "headers": {k.decode(): v.decode() for k, v in scope["headers"] if k.startswith(b"x-edgeway-")},
        "user": None if user is None else {"id": user.id, "role": user.role, "claims": dict(user.claims)},
    }).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


class Harness:
    def __init__(self, app: Any, service: SessionService) -> None:
        self.service = service
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("198.51.100.7", 1)),
                                      base_url="http://t")

    async def get(self, token: str | None = None, **headers: str) -> httpx.Response:
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        return await self.http.get("/x", headers=headers)

    async def close(self) -> None:
        await self.http.aclose()
        await self.service.close()


def settings(auth: AuthServer, **options: Any) -> SessionSettings:
    return SessionSettings(url=auth.url, anon_key=ANON_KEY, timeout=0.5, **options)


@pytest.fixture
async def make(auth: AuthServer) -> AsyncIterator[Any]:
    made: list[Harness] = []

    def build(mode: str = "required", *, store: Store | None = None, clock: Clock | None = None,
              privileged: bool = False, limits: list[Limit] | None = None, **options: Any) -> Harness:
        store = store or MemoryStore()
        service = SessionService(settings(auth, **options), store, clock=clock or Clock())
        policies: list[Any] = [SessionPolicy(service, mode=mode, privileged=privileged)]  # type: ignore[arg-type]
        if limits:
            policies.append(RateLimitPolicy(limits))
        harness = Harness(PolicyPipeline(echo, policies=policies, store=store), service)
        made.append(harness)
        return harness

    yield build
    for harness in made:
        await harness.close()


# -- verification --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
async def test_asymmetric_tokens_verify_locally_with_one_jwks_fetch(make: Any, auth: AuthServer, alg: str) -> None:
    session = make(claims=["email", "app_metadata.tenant"], headers={"X-Edgeway-Role": "role"})
    token = auth.issue("user-1", alg)
    responses = [await session.get(token) for _ in range(5)]
    assert [r.status_code for r in responses] == [200] * 5
    body = responses[0].json()
    assert body["headers"] == {"x-edgeway-user": "user-1", "x-edgeway-role": "authenticated"}
    assert body["user"] == {"id": "user-1", "role": "authenticated",  # claims: those asked for, and for headers
                            "claims": {"email": "user-1@example.test", "role": "authenticated"}}
    assert auth.calls == {JWKS_PATH: 1}  # no /user call: verified locally


async def test_hs256_verifies_locally_with_the_secret(make: Any, auth: AuthServer) -> None:
    session = make(jwt_secret=HS_SECRET)
    assert (await session.get(auth.issue("user-2", "HS256"))).status_code == 200
    assert auth.calls == {}


async def test_a_token_seen_before_is_verified_again_once_its_result_runs_out(make: Any, auth: AuthServer) -> None:
    clock = Clock()
    session = make(jwt_secret=HS_SECRET, clock=clock, store=MemoryStore(clock=clock))
    token = sign(auth.claims("user-3", ttl=60), "HS256")
    assert [(await session.get(token)).status_code for _ in range(3)] == [200] * 3
    clock.offset = 120  # the cached result ends with the token's exp; the instance still knows its digest
    response = await session.get(token)
    assert response.status_code == 401 and response.json()["reason"] == "expired"
    other = sign(auth.claims("user-4"), "HS256")  # and a request without the header is not mistaken for it
    assert (await session.get(other)).json()["user"]["id"] == "user-4"
    assert (await session.get()).status_code == 401


REFUSED = [
    ("expired", lambda a: sign(a.claims("u", ttl=-120)), "expired"),
    ("not yet valid", lambda a: sign(a.claims("u", nbf=int(time.time()) + 600)), "not_yet_valid"),
    ("wrong audience", lambda a: sign(a.claims("u", aud="someone-else")), "invalid_audience"),
    ("wrong issuer", lambda a: sign(a.claims("u", iss="https://evil.test/auth/v1")), "invalid_issuer"),
    ("tampered", lambda a: a.issue("u")[:-6] + "AAAAAA", "invalid_signature"),
    ("alg none", lambda a: sign(a.claims("u"), "none", kid=None), "unsupported_algorithm"),
    ("jku header", lambda a: sign(a.claims("u"), header={"jku": f"{a.url}/evil/jwks.json", "kid": "evil"}),
     "untrusted_key"),
    ("not three segments", lambda a: "abc.def", "malformed"),
]


@pytest.mark.parametrize(("case", "mint", "reason"), REFUSED, ids=[r[0] for r in REFUSED])
async def test_bad_tokens_get_401_with_the_reason(make: Any, auth: AuthServer, case: str, mint: Any,
                                                  reason: str) -> None:
    session = make(verify="jwt")
    response = await session.get(mint(auth))
    assert response.status_code == 401
    assert response.headers["edgeway-error"] == "unauthorized"
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"] == "unauthorized" and response.json()["reason"] == reason
    assert "/evil/jwks.json" not in auth.calls  # a URL from a token is never fetched
    assert USER_PATH not in auth.calls


async def test_missing_token_on_a_required_route(make: Any) -> None:
    response = await make().get()
    assert response.status_code == 401 and response.json()["reason"] == "missing"
    assert response.headers["www-authenticate"] == 'Bearer realm="edgeway"'


async def test_unknown_kid_refetches_once_then_waits_for_the_cooldown(make: Any, auth: AuthServer) -> None:
    clock = Clock()
    session = make(verify="jwt", clock=clock)
    assert (await session.get(auth.issue("u", "ES256"))).status_code == 200
    assert auth.calls[JWKS_PATH] == 1
    clock.offset = 31
    unknown = auth.issue("u", kid="es-later")
    assert (await session.get(unknown)).json()["reason"] == "unknown_key"
    assert auth.calls[JWKS_PATH] == 2  # one refetch for the unknown kid
    auth.publish_later = True
    another = auth.issue("v", kid="es-later")
    assert (await session.get(another)).json()["reason"] == "unknown_key"
    assert auth.calls[JWKS_PATH] == 2  # within 30 s: no refetch, however many unknown kids arrive
    clock.offset = 62
    fresh = auth.issue("w", kid="es-later")
    assert (await session.get(fresh)).status_code == 200
    assert auth.calls[JWKS_PATH] == 3


async def test_auto_asks_the_provider_when_no_key_is_known(make: Any, auth: AuthServer) -> None:
    session = make()  # verify: auto, no jwt_secret: legacy HS256 tokens go to /auth/v1/user
    token = auth.issue("legacy-user", "HS256")
    statuses = [(await session.get(token)).status_code for _ in range(10)]
    assert statuses == [200] * 10 and auth.calls[USER_PATH] == 1
    assert (await session.get(token)).json()["user"]["id"] == "legacy-user"


async def test_remote_always_asks_then_caches_and_keeps_only_asked_claims(make: Any, auth: AuthServer) -> None:
    store = MemoryStore()
    session = make(verify="remote", store=store, claims=["app_metadata.tenant"])
    token = auth.issue("u-remote", "ES256")
    body = (await session.get(token)).json()
    assert body["user"]["claims"] == {"app_metadata.tenant": "acme"}
    assert auth.calls == {USER_PATH: 1}
    # a second instance on the same store finds the result there: no provider call
    other = make(verify="remote", store=store, claims=["app_metadata.tenant"])
    assert (await other.get(token)).status_code == 200 and auth.calls == {USER_PATH: 1}
    stored = [v.value for k, v in store._data.items() if ":session:" in k]
    assert len(stored) == 1 and token not in str(stored[0]) and "email" not in str(stored[0])


async def test_concurrent_requests_with_a_new_token_ask_once(make: Any, auth: AuthServer) -> None:
    session = make()
    token = auth.issue("burst", "HS256")
    responses = await asyncio.gather(*(session.get(token) for _ in range(50)))
    assert {r.status_code for r in responses} == {200} and auth.calls[USER_PATH] == 1


async def test_refusals_are_cached_briefly(make: Any, auth: AuthServer) -> None:
    clock = Clock()
    session = make(clock=clock, negative_ttl=30, store=MemoryStore(clock=clock))
    statuses = [(await session.get("opaque-garbage")).status_code for _ in range(20)]
    assert statuses == [401] * 20 and auth.calls[USER_PATH] == 1
    clock.offset = 31
    assert (await session.get("opaque-garbage")).status_code == 401 and auth.calls[USER_PATH] == 2


# -- cookies --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["plain", "base64", "chunked"])
async def test_supabase_ssr_cookie_forms(make: Any, auth: AuthServer, form: str) -> None:
    session = make()
    token = auth.issue("cookie-user", "ES256")
    value = json.dumps({"access_token": token, "refresh_token": "r", "token_type": "bearer"})
    name = f"sb-{auth.url.split('//')[1].split('.')[0]}-auth-token"
    if form == "plain":
        cookie = f"{name}={quote(value)}"
    elif form == "base64":
        import base64

        cookie = f"{name}=base64-{base64.urlsafe_b64encode(value.encode()).decode().rstrip('=')}"
    else:
        encoded = quote(value)
        cookie = "; ".join(f"{name}.{i // 400}={encoded[i:i + 400]}" for i in range(0, len(encoded), 400))
    response = await session.get(cookie=cookie)
    assert response.status_code == 200 and response.json()["user"]["id"] == "cookie-user"


async def test_oversized_cookie_is_a_401(make: Any, auth: AuthServer) -> None:
    name = f"sb-{auth.url.split('//')[1].split('.')[0]}-auth-token"
    response = await make().get(cookie=f"{name}={'x' * 20_000}")
    assert response.status_code == 401 and response.json()["reason"] == "oversized"


# -- revocation ------------------------------------------------------------------------------------------------


async def test_revoked_by_token_session_and_user(make: Any, auth: AuthServer) -> None:
    store = MemoryStore()
    session = make(store=store)
    other_instance = make(store=store)
    tokens = {kind: auth.issue(f"user-{kind}") for kind in ("token", "session_id", "user")}
    for token in tokens.values():
        assert (await session.get(token)).status_code == 200
        assert (await other_instance.get(token)).status_code == 200
    claims = {kind: json.loads(__import__("base64").urlsafe_b64decode(t.split(".")[1] + "==")) for kind, t in
              tokens.items()}
    assert await revoke(session.service, {"token": tokens["token"]}) == (200, {"revoked": True})
    assert await revoke(session.service, {"session_id": claims["session_id"]["session_id"]}) == (200, {"revoked": True})
    assert await revoke(session.service, {"user": "user-user"}) == (200, {"revoked": True})
    for token in tokens.values():  # the other instance refuses them on its very next request
        response = await other_instance.get(token)
        assert response.status_code == 401 and response.json()["reason"] == "revoked"
    # a token issued after the user's revoked-after time passes
    later = auth.issue("user-user", iat=int(time.time()) + 2)
    assert (await other_instance.get(later)).status_code == 200


class RevocationCounter(MemoryStore):
    """The memory store, counting the revocation checks sent with each batch."""

    def __init__(self) -> None:
        super().__init__()
        self.checks: list[int] = []

    async def execute(self, commands: Any, *, timeout: float | None = None) -> list[object]:
        self.checks.append(sum(isinstance(command, Revoked) for command in commands))
        return await super().execute(commands, timeout=timeout)


async def test_a_warm_token_is_verified_once_and_its_revocation_checked_on_every_request(
        make: Any, auth: AuthServer) -> None:
    store = RevocationCounter()
    session = make(store=store, jwt_secret=HS_SECRET, headers={"X-Edgeway-Role": "role"})
    verified: list[str] = []
    verify = session.service.verify_local
    session.service.verify_local = lambda token, now: verified.append(token) or verify(token, now)
    token = auth.issue("warm", "HS256")
    bodies = [(await session.get(token)).json() for _ in range(5)]
    assert bodies == [{"headers": {"x-edgeway-user": "warm", "x-edgeway-role": "authenticated"},
                       "user": {"id": "warm", "role": "authenticated", "claims": {"role": "authenticated"}}}] * 5
    assert verified == [token]  # parsed and verified once; the warm requests reuse the result
    assert store.checks == [1] * 5  # ... and every one of them checks the revocations
    await revoke(session.service, {"user": "warm"})
    assert (await session.get(token)).status_code == 401


@pytest.mark.parametrize("body", [{}, {"token": ""}, {"token": "a", "user": "b"}, {"jti": 5}, [],
                                  {"token": "a", "before": 3}, {"user": "u", "extra": 1},
                                  {"user": "u", "before": True}])
async def test_bad_revocation_bodies(make: Any, body: Any) -> None:
    status, answer = await revoke(make().service, body)
    assert status == 400 and answer["error"] == "bad_request"


async def test_a_revoked_session_is_not_charged_by_the_rate_limit(make: Any, auth: AuthServer) -> None:
    store = MemoryStore()
    session = make(store=store, limits=[Limit(rate="2/minute", key="user")])
    first = auth.issue("limited")
    assert (await session.get(first)).status_code == 200  # 1 of 2
    await revoke(session.service, {"token": first})
    assert [(await session.get(first)).status_code for _ in range(3)] == [401] * 3
    assert [(await session.get("Bearer-less")).status_code for _ in range(3)] == [401] * 3
    second = auth.issue("limited")
    assert [(await session.get(second)).status_code for _ in range(2)] == [200, 429]


async def test_unreadable_deny_list_fails_closed_on_privileged_routes(make: Any, auth: AuthServer) -> None:
    dead = RedisStore(f"redis://127.0.0.1:{free_port()}", timeout=0.2)
    token = auth.issue("priv")
    for privileged, expected in ((True, 503), (False, 200)):
        chain = FailoverStore(dead, [MemoryStore()], failures=1)
        session = make(store=chain, privileged=privileged)
        before = SESSION_REVOCATIONS_UNCHECKED.labels("default")._value.get()
        response = await session.get(token)
        assert response.status_code == expected
        if expected == 503:
            assert response.json()["error"] == "auth_unavailable"
        assert SESSION_REVOCATIONS_UNCHECKED.labels("default")._value.get() == before + 1
        await chain.close()


# -- provider failures -----------------------------------------------------------------------------------------


async def test_provider_outage_warm_cache_keeps_working_cold_gets_503(make: Any, auth: AuthServer) -> None:
    session = make()
    warm = auth.issue("warm", "HS256")
    assert (await session.get(warm)).status_code == 200
    auth.mode = "down"
    assert (await session.get(warm)).status_code == 200
    cold = await session.get(auth.issue("cold", "HS256"))
    assert cold.status_code == 503 and cold.json()["error"] == "auth_unavailable"
    assert cold.headers["edgeway-error"] == "auth_unavailable"


@pytest.mark.parametrize("mode", ["down", "html", "slow"])
async def test_provider_failures_are_503_never_500(make: Any, auth: AuthServer, mode: str) -> None:
    auth.mode = mode
    response = await make().get(auth.issue("x", "HS256"))
    assert response.status_code == 503 and response.json()["error"] == "auth_unavailable"


async def test_a_dead_provider_is_not_hammered(make: Any, auth: AuthServer) -> None:
    auth.mode = "down"
    session = make()
    statuses = [(await session.get(auth.issue(f"x{i}", "HS256"))).status_code for i in range(10)]
    assert statuses == [503] * 10
    assert auth.calls[USER_PATH] == 3  # then the guard answers without calling


async def test_optional_route_passes_anonymous_on_outage_when_open(make: Any, auth: AuthServer) -> None:
    auth.mode = "down"
    session = make("optional", on_provider_failure="open")
    response = await session.get(auth.issue("x", "HS256"))
    assert response.status_code == 200 and response.json() == {"headers": {}, "user": None}


# -- identity out ----------------------------------------------------------------------------------------------


async def test_client_identity_headers_are_replaced(make: Any, auth: AuthServer) -> None:
    session = make("optional")
    forged = {"x-edgeway-user": "admin", "x-edgeway-role": "service_role"}
    anonymous = await session.get(**forged)
    assert anonymous.status_code == 200 and anonymous.json() == {"headers": {}, "user": None}
    token = auth.issue("real")
    signed_in = await session.get(token, **forged)
    assert signed_in.json()["headers"] == {"x-edgeway-user": "real"}
    warm = await session.get(token, **forged)  # a token this instance knows: its own path, the same stripping
    assert warm.json()["headers"] == {"x-edgeway-user": "real"}
    plain = await session.get(token)
    assert plain.json()["headers"] == {"x-edgeway-user": "real"}


async def test_fastapi_style_dependencies(auth: AuthServer) -> None:
    async def me(request: Request) -> JSONResponse:
        user = current_user(request)
        return JSONResponse({"id": user.id, "maybe": getattr(optional_user(request), "id", None)})

    app = SessionMiddleware(Starlette(routes=[Route("/me", me)]), store=MemoryStore(), mode="optional",
                            url=auth.url, anon_key=ANON_KEY)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        ok = await http.get("/me", headers={"authorization": f"Bearer {auth.issue('dep-user')}"})
        anonymous = await http.get("/me")
    await app.service.close()
    assert ok.json() == {"id": "dep-user", "maybe": "dep-user"}
    assert anonymous.status_code == 401


def test_settings_refuse_inconsistent_blocks() -> None:
    with pytest.raises(ValueError, match="needs url"):
        SessionSettings()
    with pytest.raises(ValueError, match="needs jwks_url: or jwt_secret"):
        SessionSettings(provider="jwt")
    with pytest.raises(ValueError, match="X-Edgeway-User"):
        SessionSettings(url="https://a.supabase.co", headers={"X-Edgeway-User": "sub"})


async def test_tokens_never_reach_the_logs_or_the_store_keys(make: Any, auth: AuthServer,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    store = MemoryStore()
    session = make(store=store)
    tokens = [auth.issue("logged", "HS256"), "opaque-token-value", auth.issue("other", "HS256")]
    await session.get(tokens[0])
    await session.get(tokens[1])
    auth.mode = "down"
    await session.get(tokens[2])
    await revoke(session.service, {"token": tokens[0]})
    text = caplog.text + " ".join(store._data)
    assert "session provider failed" in caplog.text
    assert not [token for token in tokens if token in text or token.split(".")[-1] in text]


async def test_the_shared_copy_of_a_remote_result_slides_too(make: Any, auth: AuthServer) -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    session = make(store=store, clock=clock, ttl=100)
    token = auth.issue("slider", "HS256")
    assert (await session.get(token)).status_code == 200
    key = next(k for k in store._data if ":session:" in k)
    first_expiry = store._data[key].expires_ms
    clock.offset = 60  # past half the TTL: the next request's batch carries a refresh of the shared copy
    assert (await session.get(token)).status_code == 200
    assert store._data[key].expires_ms > first_expiry + 50_000
    clock.offset = 150  # past the first expiry: still known here and in the store, without asking again
    other = make(store=store, clock=clock, ttl=100)
    assert (await other.get(token)).status_code == 200 and auth.calls[USER_PATH] == 1



async def test_fastapi_depends_current_user(auth: AuthServer) -> None:
    from fastapi import Depends, FastAPI

    from edgeway.middleware.session import SessionUser

    api = FastAPI()

    @api.get("/me")
    async def me(user: SessionUser = Depends(current_user)) -> dict[str, Any]:  # noqa: B008
        return {"id": user.id, "email": user.claims.get("email")}

    @api.get("/maybe")
    async def maybe(user: SessionUser | None = Depends(optional_user)) -> dict[str, Any]:  # noqa: B008
        return {"id": None if user is None else user.id}

    api.add_middleware(SessionMiddleware, store=MemoryStore(), mode="optional", url=auth.url, anon_key=ANON_KEY,
                       claims=["email"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://t") as http:
        signed_in = await http.get("/me", headers={"authorization": f"Bearer {auth.issue('fast')}"})
        anonymous = await http.get("/me")
        maybe = await http.get("/maybe")
    await lifespan(api)  # its shutdown closes the middleware's provider connections
    assert signed_in.status_code == 200 and signed_in.json() == {"id": "fast", "email": "fast@example.test"}
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Bearer")
    assert maybe.json() == {"id": None}


async def test_the_provider_connections_close_with_the_app(auth: AuthServer) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    middleware = SessionMiddleware(app, store=MemoryStore(), url=auth.url, anon_key=ANON_KEY)
    assert (await middleware.service.provider.get_user(auth.issue("x", "HS256"))).user is not None  # type: ignore[union-attr]
    session = middleware.service._http._session
    assert session is not None and not session.closed
    assert await lifespan(middleware) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert session.closed


async def lifespan(app: Any) -> list[str]:
    """Run an app's startup and shutdown; the message types it sent back."""
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    return sent
