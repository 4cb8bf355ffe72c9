"""``/_edgeway/*``: health, readiness, metrics, and the token-guarded admin API.

The admin API is off unless ``admin.token`` is set, and the token is compared
in constant time. Health and metrics never need it.
"""

from __future__ import annotations

import functools
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edgeway.middleware.breaker import reset_breaker
from edgeway.middleware.cache_signals import purge
from edgeway.middleware.context import Scope
from edgeway.middleware.metrics import STORE_UP
from edgeway.middleware.responses import ErrorResponse, Receive, Send
from edgeway.middleware.session import revoke
from edgeway.middleware.store import StoreError
from edgeway.middleware.store.failover import FailoverStore

if TYPE_CHECKING:
    from .app import Gateway

_STARTED = time.time()
_MAX_ADMIN_BODY = 64 * 1024


async def _read_body(receive: Receive) -> bytes:
    body = b""
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body += message.get("body", b"")
        if len(body) > _MAX_ADMIN_BODY:
            raise ValueError(f"the request body is larger than {_MAX_ADMIN_BODY} bytes")
        more = message.get("more_body", False)
    return body


async def _json(send: Send, status: int, payload: dict[str, Any], scope: Scope) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body if scope["method"] != "HEAD" else b""})


class AdminEndpoints:
    """Dispatches ``/_edgeway/<name>``; see SPEC.md for the contract."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = scope["path"].removeprefix("/_edgeway/").rstrip("/")
        method = scope["method"]
        public = {"healthz": self.healthz, "readyz": self.readyz, "metrics": self.metrics}
        admin: dict[tuple[str, str], Callable[[Scope, Send], Awaitable[None]]] = {
            ("GET", "status"): self.status, ("POST", "reload"): self.reload,
            ("POST", "cache/purge"): functools.partial(self.cache_purge, receive=receive),
            ("POST", "sessions/revoke"): functools.partial(self.revoke_session, receive=receive),
        }
        if name in public:
            if method not in ("GET", "HEAD"):
                await ErrorResponse(405, "method_not_allowed", "use GET",
                                    headers=[(b"allow", b"GET, HEAD")])(scope, receive, send)
                return
            await public[name](scope, send)
            return
        if (method, name) in admin:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
            await admin[(method, name)](scope, send)
            return
        if method == "POST" and name.startswith("breakers/") and name.endswith("/reset"):
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
            status, answer = await reset_breaker(self.gateway.breakers, name[len("breakers/"):-len("/reset")])
            await _json(send, status, answer, scope)
            return
        await ErrorResponse(404, "no_route", f"no gateway endpoint {scope['path']}")(scope, receive, send)

    def _refusal(self, scope: Scope) -> ErrorResponse | None:
        token = self.gateway.loaded.policy.admin.token
        if not token:
            return ErrorResponse(404, "admin_disabled", "the admin API is off: set admin.token in the policy")
        supplied = b""
        for key, value in scope["headers"]:
            if key == b"authorization" and value[:7].lower() == b"bearer ":
                supplied = value[7:].strip()
        if not hmac.compare_digest(supplied, token.encode()):
            return ErrorResponse(401, "unauthorized", "admin endpoints need Authorization: Bearer <admin token>",
                                 headers=[(b"www-authenticate", b'Bearer realm="edgeway-admin"')])
        return None

    async def healthz(self, scope: Scope, send: Send) -> None:
        await _json(send, 200, {"status": "ok"}, scope)

    async def readyz(self, scope: Scope, send: Send) -> None:
        """200 while some store serves shared state (``degraded`` when it is a fallback), else 503."""
        gateway = self.gateway
        store = gateway.store
        payload: dict[str, Any] = {
            "policy": {"source": gateway.loaded.source, "version": gateway.loaded.version},
        }
        failover = isinstance(store, FailoverStore)  # it keeps edgeway_store_up per store from health itself
        try:
            await store.ping()
        except StoreError as exc:
            if not failover:
                STORE_UP.labels(store.kind).set(0)
            payload["status"] = "unavailable"
            payload["store"] = {"kind": store.kind, "mode": store.kind, "location": store.describe(), "error": str(exc)}
            await _json(send, 503, payload, scope)
            return
        if not failover:
            STORE_UP.labels(store.kind).set(1)
        chain = store.status() if isinstance(store, FailoverStore) else [
            {"kind": store.kind, "location": store.describe(), "healthy": True}
        ]
        degraded = not chain[0]["healthy"]
        payload["status"] = "degraded" if degraded else "ready"
        payload["store"] = {"kind": store.kind, "mode": store.kind, "location": store.describe(), "chain": chain}
        if isinstance(store, FailoverStore):
            payload["store"]["live_instances"] = store.live_instances
        await _json(send, 200, payload, scope)

    async def metrics(self, scope: Scope, send: Send) -> None:
        body = generate_latest()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode()),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def status(self, scope: Scope, send: Send) -> None:
        gateway = self.gateway
        policy = gateway.loaded.policy
        await _json(send, 200, {
            "policy": {"source": gateway.loaded.source, "version": gateway.loaded.version},
            "store": {"kind": gateway.store.kind, "location": gateway.store.describe()},
            "upstreams": {name: up.url for name, up in policy.upstreams.items()},
            "breakers": {name: breaker.status() for name, breaker in gateway.breakers.items()},
            "routes": [{"path": r.match.path, "methods": r.match.methods, "upstream": r.upstream,
                        "limits": [str(limit.rate) for limit in r.limits]} for r in policy.routes],
            "uptime_seconds": round(time.time() - _STARTED, 1),
        }, scope)

    async def revoke_session(self, scope: Scope, send: Send, *, receive: Receive) -> None:
        """``POST /_edgeway/sessions/revoke``: see :func:`edgeway.middleware.session.revoke`."""
        sessions = self.gateway.sessions
        if sessions is None:
            await ErrorResponse(404, "sessions_disabled", "no sessions: block in the policy")(scope, receive, send)
            return
        try:
            body = json.loads(await _read_body(receive))
        except ValueError as error:  # not JSON, or too large
            await ErrorResponse(400, "bad_request", f"the body must be JSON: {error}")(scope, receive, send)
            return
        status, answer = await revoke(sessions, body)
        if status != 200:
            await ErrorResponse(status, answer.pop("error"), answer.pop("message", None))(scope, receive, send)
            return
        await _json(send, status, answer, scope)

    async def cache_purge(self, scope: Scope, send: Send, *, receive: Receive) -> None:
        """``POST /_edgeway/cache/purge``: the body names what (see :func:`edgeway.middleware.cache.purge`)."""
        try:
            body = json.loads(await _read_body(receive))
            routes = self.gateway.routes
            if isinstance(body, dict) and isinstance(body.get("route"), str):
                policies = routes.cache_policies(pattern=body["route"])
                if not policies:
                    raise ValueError(f"no route with a cache has match.path {body['route']!r}")
            elif isinstance(body, dict) and isinstance(body.get("url"), str):
                method = body.get("method", "GET")
                policies = routes.cache_policies(path=body["url"].partition("?")[0],
                                                 method=method.upper() if isinstance(method, str) else "GET")
            else:
                policies = routes.cache_policies()
            answer = await purge(self.gateway.store, policies, body)
        except (ValueError, UnicodeDecodeError) as exc:
            await ErrorResponse(400, "bad_request", str(exc))(scope, receive, send)
            return
        except StoreError as exc:
            await ErrorResponse(503, "store_unavailable", f"the purge did not reach the store: {exc}")(
                scope, receive, send)
            return
        await _json(send, 200, answer, scope)

    async def reload(self, scope: Scope, send: Send) -> None:
        before = self.gateway.loaded.version
        ok = await self.gateway.reload()
        await _json(send, 200 if ok else 422, {
            "reloaded": ok, "version": self.gateway.loaded.version, "previous": before,
        }, scope)
