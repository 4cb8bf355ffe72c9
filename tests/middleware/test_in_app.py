"""Edgeway inside a FastAPI/Starlette app: the app object kept, users found, paths left alone, and the
no-file form as safe as the policy form."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, BaseUser, SimpleUser, UnauthenticatedUser
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from edgeway import EdgewayMiddleware
from edgeway.middleware import Limit, RateLimitMiddleware
from edgeway.middleware.clientip import TrustedProxies
from edgeway.middleware.context import SCOPE_KEY, RequestContext
from edgeway.middleware.store import Command, Store, open_store
from edgeway.middleware.store.failover import FailoverStore
from edgeway.middleware.store.memory import MemoryStore
from edgeway.middleware.users import find_user, scope_user, user_source
from tests.servers import free_port

CLIENT = "198.51.100.1"
PROXY = "10.0.0.1"

IN_APP_POLICY = """\
version: 1
name: shop
routes:
  - match: { path: /api/*, methods: POST }
    limits: [{ rate: 2/minute }]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def client(app: object, peer: str = CLIENT) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(peer, 1)),  # type: ignore[arg-type]
                             base_url="http://t")


# -- 2. mounted the FastAPI way ---------------------------------------------------------------------


def current_user() -> str:
    return "from-the-real-auth"


async def test_add_middleware_keeps_the_fastapi_object_and_limits_it(tmp_path: Path) -> None:
    app = FastAPI()

    @app.post("/api/chat")
    async def chat(user: str = Depends(current_user)) -> dict[str, str]:
        return {"user": user}

    app.add_middleware(EdgewayMiddleware, policy=str(write(tmp_path, IN_APP_POLICY)))
    # what `wrap()` lost: overrides, state and routers added afterwards
    assert isinstance(app, FastAPI)
    app.dependency_overrides[current_user] = lambda: "overridden"
    app.state.ready = True
    router = APIRouter()

    @router.post("/api/later")
    async def later() -> dict[str, bool]:
        return {"later": True}

    app.include_router(router)
    async with client(app) as http:
        chats = [await http.post("/api/chat") for _ in range(3)]
        later_answer = await http.post("/api/later")
        docs = [await http.get("/openapi.json") for _ in range(4)]
    assert [r.status_code for r in chats] == [200, 200, 429]
    assert chats[0].json() == {"user": "overridden"}
    assert chats[2].json()["error"] == "rate_limited" and chats[2].headers["edgeway-error"] == "rate_limited"
    assert later_answer.status_code == 429  # the same route (/api/*), the same client: its quota is spent
    assert all(r.status_code == 200 for r in docs)  # no route matches: straight to the app


async def test_wrap_still_serves_plain_asgi_apps(tmp_path: Path) -> None:
    from edgeway import Edgeway

    async def chat(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Edgeway.from_policy(write(tmp_path, IN_APP_POLICY)).wrap(Starlette(routes=[Route("/api/x", chat,
                                                                                             methods=["POST"])]))
    assert isinstance(app, EdgewayMiddleware)
    async with client(app) as http:
        assert [(await http.post("/api/x")).status_code for _ in range(3)] == [200, 200, 429]


class RecordingStore(MemoryStore):
    closed = 0

    async def close(self) -> None:
        self.closed += 1


async def test_the_store_closes_when_the_app_shuts_down(tmp_path: Path) -> None:
    store = RecordingStore()

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    middleware = EdgewayMiddleware(app, policy=write(tmp_path, IN_APP_POLICY), store=store)
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive():  # type: ignore[no-untyped-def]
        return next(messages)

    async def send(message):  # type: ignore[no-untyped-def]
        sent.append(message["type"])

    await middleware({"type": "lifespan"}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"] and store.closed == 1


# -- 3. per-user limits in-app ----------------------------------------------------------------------


USER_POLICY = """\
version: 1
trusted_proxies: [10.0.0.0/8]
routes:
  - match: { path: /api/* }
    limits: [{ rate: 1/minute, key: user, on_missing: deny }]
"""


class BearerNames(AuthenticationBackend):
    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        name = conn.headers.get("authorization", "").removeprefix("Bearer ")
        return (AuthCredentials(["user"]), SimpleUser(name)) if name else None


async def whoami(request: object) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def test_key_user_comes_from_the_apps_own_authentication(tmp_path: Path) -> None:
    app = Starlette(routes=[Route("/api/me", whoami)])
    app.add_middleware(EdgewayMiddleware, policy=write(tmp_path, USER_POLICY))
    app.add_middleware(AuthenticationMiddleware, backend=BearerNames())  # added last: runs first
    async with client(app) as http:
        alice = [(await http.get("/api/me", headers={"authorization": "Bearer alice"})).status_code for _ in range(2)]
        bob = (await http.get("/api/me", headers={"authorization": "Bearer bob"})).status_code
        anonymous = await http.get("/api/me")
    assert alice == [200, 429] and bob == 200  # one client address, two users: separate quotas
    assert anonymous.status_code == 400 and anonymous.json()["error"] == "missing_key"


async def test_user_from_header_is_believed_from_trusted_proxies_only(tmp_path: Path) -> None:
    policy = write(tmp_path, USER_POLICY.replace("trusted_proxies:", "user_from: header:X-User-Id\ntrusted_proxies:"))
    app = Starlette(routes=[Route("/api/me", whoami)])
    app.add_middleware(EdgewayMiddleware, policy=policy)
    async with client(app, peer=PROXY) as http:
        alice = [(await http.get("/api/me", headers={"x-user-id": "alice"})).status_code for _ in range(2)]
        bob = (await http.get("/api/me", headers={"x-user-id": "bob"})).status_code
    async with client(app, peer=CLIENT) as http:
        forged = await http.get("/api/me", headers={"x-user-id": "carol"})
    assert alice == [200, 429] and bob == 200
    assert forged.status_code == 400 and forged.json()["error"] == "missing_key"


async def test_user_from_a_function_in_the_python_api() -> None:
    def tenant_user(scope: dict[str, object]) -> str | None:
        return dict(scope["headers"]).get(b"x-session", b"").decode() or None  # type: ignore[call-overload]

    app = RateLimitMiddleware(Starlette(routes=[Route("/", whoami)]), store=MemoryStore(), user_from=tenant_user,
                              limits=[Limit(rate="1/minute", key="user", on_missing="deny")])
    async with client(app) as http:
        first = [(await http.get("/", headers={"x-session": "s1"})).status_code for _ in range(2)]
        other = (await http.get("/", headers={"x-session": "s2"})).status_code
    assert first == [200, 429] and other == 200


class Named(BaseUser):
    def __init__(self, ident: str, authenticated: bool = True) -> None:
        self.ident, self.authenticated = ident, authenticated

    @property
    def is_authenticated(self) -> bool:
        return self.authenticated

    @property
    def identity(self) -> str:
        return self.ident


@pytest.mark.parametrize(
    ("ctx_user", "scope_entry", "header", "expected"),
    [
        ("from-session", Named("from-app"), "from-header", "from-session"),  # the session policy's verified user
        (None, Named("from-app"), "from-header", "from-app"),
        (None, Named("anon", authenticated=False), "from-header", "from-header"),
        (None, UnauthenticatedUser(), None, None),
        (None, SimpleUser("alice"), None, "alice"),
        (None, None, "from-header", "from-header"),
        (None, None, None, None),
    ],
)
def test_user_lookup_order(ctx_user: str | None, scope_entry: object, header: str | None,
                           expected: str | None) -> None:
    scope: dict[str, object] = {"type": "http", "client": (PROXY, 1),
                                "headers": [(b"x-user-id", header.encode())] if header else []}
    if scope_entry is not None:
        scope["user"] = scope_entry
    ctx = RequestContext(scope, TrustedProxies(["10.0.0.0/8"]))
    ctx.user = ctx_user
    scope[SCOPE_KEY] = ctx
    assert find_user(ctx, user_source("header:X-User-Id")) == expected


def test_scope_user_reads_common_user_objects() -> None:
    assert scope_user({"user": "plain"}) == "plain"
    assert scope_user({"user": SimpleUser("bo")}) == "bo"
    assert scope_user({}) is None
    with pytest.raises(ValueError, match="expected header:NAME or a function"):
        user_source("cookie:sid")


# -- 6. the no-file form is as safe as the policy form ----------------------------------------------


async def ok(request: object) -> PlainTextResponse:
    return PlainTextResponse("ok")


def plain_app() -> Starlette:
    return Starlette(routes=[Route("/api/x", ok), Route("/docs", ok), Route("/healthz", ok), Route("/docs/oauth", ok)])


async def test_open_store_falls_back_to_memory_when_redis_is_down() -> None:
    store = open_store(f"redis://127.0.0.1:{free_port()}")  # nothing listens there
    assert isinstance(store, FailoverStore)
    app = RateLimitMiddleware(plain_app(), limits=[Limit(rate="3/minute")], store=store)
    async with client(app) as http:
        statuses = [(await http.get("/api/x")).status_code for _ in range(6)]
    await store.close()
    assert statuses == [200, 200, 200, 429, 429, 429]


async def test_open_store_without_fallback_leaves_it_to_on_store_failure() -> None:
    store = open_store(f"redis://127.0.0.1:{free_port()}", fallback=[])
    app = RateLimitMiddleware(plain_app(), limits=[Limit(rate="1/minute", on_store_failure="closed")], store=store)
    async with client(app) as http:
        answer = await http.get("/api/x")
    await store.close()
    assert answer.status_code == 503 and answer.json()["error"] == "store_unavailable"


async def test_exclude_leaves_docs_and_health_checks_alone() -> None:
    app = RateLimitMiddleware(plain_app(), limits=["1/minute"], store=MemoryStore(),
                              exclude=["/docs*", "/healthz"])
    async with client(app) as http:
        free = [(await http.get(path)).status_code for path in ("/docs", "/docs/oauth", "/healthz") * 2]
        limited = [(await http.get("/api/x")).status_code for _ in range(2)]
        unlimited_headers = (await http.get("/healthz")).headers
    assert free == [200] * 6 and limited == [200, 429]
    assert "ratelimit" not in unlimited_headers


async def test_paths_limits_only_those_paths() -> None:
    app = RateLimitMiddleware(plain_app(), limits=["1/minute"], store=MemoryStore(), paths=["/api/*"])
    async with client(app) as http:
        docs = [(await http.get("/docs")).status_code for _ in range(3)]
        api = [(await http.get("/api/x")).status_code for _ in range(2)]
    assert docs == [200, 200, 200] and api == [200, 429]


def test_bad_path_entries_are_refused() -> None:
    with pytest.raises(ValueError, match="bad exclude entry 'docs'"):
        RateLimitMiddleware(plain_app(), limits=["1/minute"], store=MemoryStore(), exclude=["docs"])


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[Sequence[Command]] = []

    async def execute(self, commands: Sequence[Command], *, timeout: float | None = None) -> list[object]:
        self.batches.append(commands)
        return await super().execute(commands, timeout=timeout)


async def test_excluded_paths_cost_no_store_call() -> None:
    store = CountingStore()
    app = RateLimitMiddleware(plain_app(), limits=["5/minute"], store=store, exclude=["/healthz"])
    async with client(app) as http:
        for _ in range(3):
            await http.get("/healthz")
    assert store.batches == []


def test_open_store_memory_is_returned_as_it_is() -> None:
    store: Store = open_store("memory://")
    assert isinstance(store, MemoryStore)

