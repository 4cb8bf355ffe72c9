"""``/_edgeway/*``: health, readiness, metrics, the OpenAPI document, and the token-guarded admin API.

Operations are described, and handlers registered, in
:mod:`edgeway.gateway.admin_api`. The admin API is off (404 ``admin_disabled``)
unless ``admin.token`` is set; the token is compared in constant time (digests
of equal length, so neither content nor length leaks) and only its digest is
kept. Health, readiness, metrics and the document never need it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from prometheus_client import CONTENT_TYPE_LATEST

from edgeway.middleware.breaker import reset_breaker
from edgeway.middleware.cache_signals import purge
from edgeway.middleware.context import Scope
from edgeway.middleware.metrics import STORE_UP, scrape
from edgeway.middleware.responses import ErrorResponse, Receive, Send
from edgeway.middleware.session import revoke
from edgeway.middleware.store import StoreError
from edgeway.middleware.store.failover import FailoverStore

from .admin_api import JSON, AdminError, AdminRequest, Operation, handler, match, openapi

if TYPE_CHECKING:
    from .app import Gateway

_STARTED = time.time()
MAX_BODY = 64 * 1024


async def _json(send: Send, status: int, payload: JSON, scope: Scope) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body if scope["method"] != "HEAD" else b""})


def token_digest(token: str) -> bytes:
    """What the gateway keeps of the admin token: its SHA-256."""
    return hashlib.sha256(token.encode()).digest()


class AdminEndpoints:
    """Dispatches ``/_edgeway/<path>`` through the operation table; see SPEC.md for the contract."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._public = {"healthz": self.healthz, "readyz": self.readyz, "metrics": self.metrics,
                        "openapi": self.document}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"].removeprefix("/_edgeway/").rstrip("/")
        operation, params, allowed = match(scope["method"], path)
        if operation is None:
            if allowed:
                await ErrorResponse(405, "method_not_allowed", f"use {', '.join(allowed)}",
                                    headers=[(b"allow", ", ".join(allowed).encode())])(scope, receive, send)
            else:
                await ErrorResponse(404, "no_route", f"no gateway endpoint {scope['path']}")(scope, receive, send)
            return
        if not operation.admin:
            await self._public[operation.operation_id](scope, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        try:
            status, payload = await self._run(operation, params, scope, receive)
        except AdminError as error:
            await ErrorResponse(error.status, error.code, error.message, extra=error.extra)(scope, receive, send)
            return
        await _json(send, status, payload, scope)

    async def _run(self, operation: Operation, params: dict[str, str], scope: Scope,
                   receive: Receive) -> tuple[int, JSON]:
        if operation.handler is None:
            raise AdminError(501, "not_implemented", f"{operation.method} /_edgeway/{operation.path} is not "
                             "available in this build")
        body = await _read_json(receive) if operation.body is not None else None
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        return await operation.handler(AdminRequest(self.gateway, scope, params, query, body))

    def _refusal(self, scope: Scope) -> ErrorResponse | None:
        expected = self.gateway.admin_token_digest
        if expected is None:
            return ErrorResponse(404, "admin_disabled", "the admin API is off: set admin.token in the policy")
        supplied: bytes | None = None
        for key, value in scope["headers"]:
            if key == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                # a second Authorization header is ambiguous: refuse rather than pick one
                supplied = credentials.strip() if supplied is None and scheme.lower() == b"bearer" else b""
        if supplied is None or not hmac.compare_digest(hashlib.sha256(supplied).digest(), expected):
            return ErrorResponse(401, "unauthorized", "admin endpoints need Authorization: Bearer <admin token>",
                                 headers=[(b"www-authenticate", b'Bearer realm="edgeway-admin"')])
        return None

    # -- public ---------------------------------------------------------------------------------------

    async def healthz(self, scope: Scope, send: Send) -> None:
        await _json(send, 200, {"status": "ok"}, scope)

    async def readyz(self, scope: Scope, send: Send) -> None:
        """200 while some store serves shared state (``degraded`` when it is a fallback), else 503."""
        gateway = self.gateway
        store = gateway.store
        payload: JSON = {
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
        chain = store_chain(gateway)
        payload["status"] = "ready" if chain[0]["healthy"] else "degraded"
        payload["store"] = {"kind": store.kind, "mode": store.kind, "location": store.describe(), "chain": chain}
        if isinstance(store, FailoverStore):
            payload["store"]["live_instances"] = store.live_instances
            if store.budget is not None:
                payload["store"]["budget"] = store.budget.status()
        await _json(send, 200, payload, scope)

    async def metrics(self, scope: Scope, send: Send) -> None:
        body = scrape()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode()),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body if scope["method"] != "HEAD" else b""})

    async def document(self, scope: Scope, send: Send) -> None:
        from . import __version__  # the package's __init__ imports this module first

        await _json(send, 200, openapi(__version__), scope)


async def _read_json(receive: Receive) -> JSON:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise AdminError(400, "bad_request", "the client left before sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise AdminError(413, "payload_too_large", f"admin request bodies are limited to {MAX_BODY} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    try:
        body = json.loads(b"".join(chunks) or b"null")
    except ValueError:
        raise AdminError(400, "bad_request", "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise AdminError(400, "bad_request", "the body must be a JSON object")
    return body


def store_chain(gateway: Gateway) -> list[dict[str, object]]:
    """Each store of the chain with its health (a lone store counts as healthy while it answers)."""
    store = gateway.store
    if isinstance(store, FailoverStore):
        return store.status()
    return [{"kind": store.kind, "location": store.describe(), "healthy": True}]


def _public_url(url: str) -> str:
    """An upstream URL without credentials (``http://user:pass@host`` -> ``http://host``)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


# -- admin operations served by the gateway itself ----------------------------------------------------


@handler("GET", "status")
async def status(request: AdminRequest) -> tuple[int, JSON]:
    gateway = request.gateway
    policy = gateway.loaded.policy
    store = gateway.store
    store_info: dict[str, Any] = {"kind": store.kind, "mode": store.kind, "location": store.describe(),
                                  "chain": store_chain(gateway)}
    if isinstance(store, FailoverStore):
        store_info["live_instances"] = store.live_instances
        if store.budget is not None:
            store_info["budget"] = store.budget.status()
    upstreams = {
        name: {"url": _public_url(up.url), "timeout": up.timeout.model_dump(mode="json"),
               "breaker": up.breaker.model_dump(mode="json") if up.breaker else None}
        for name, up in policy.upstreams.items()
    }
    routes = [
        {"name": route.route_id, **route.model_dump(mode="json")}
        for route in policy.routes
    ]
    return 200, {
        "instance": {"id": gateway.instance_id, "pid": os.getpid(), "version": gateway.loaded.version,
                     "uptime_seconds": round(time.time() - _STARTED, 1)},
        "policy": {"source": gateway.loaded.source, "version": gateway.loaded.version},
        "store": store_info,
        "upstreams": upstreams,
        "routes": routes,
        "breakers": {name: breaker.status() for name, breaker in gateway.breakers.items()},
        "instances": [gateway.cluster.here(), *await gateway.cluster.ask("roll-call")],
    }


@handler("POST", "reload")
async def reload(request: AdminRequest) -> tuple[int, JSON]:
    """Re-read the policy file; with ``?all=1`` every instance sharing the store does, and the answer lists
    what each now serves (instances that did not answer in time are missing from the list)."""
    gateway = request.gateway
    before = gateway.loaded.version
    everywhere = request.query.get("all", "0") not in ("", "0", "false")
    if gateway.policy_path is None:
        raise AdminError(409, "no_policy_file", "this gateway was built from a policy object, not a file")
    if everywhere and not gateway.cluster.available:
        raise AdminError(409, "broadcast_unavailable", f"the {gateway.store.kind} store carries no notifications "
                         "between instances: reload each one, or use a Redis store")
    problems = await gateway.reload_file()
    if problems is not None:
        raise AdminError(422, "invalid_policy", "the policy file is invalid; the running policy keeps serving",
                         extra={"reloaded": False, "version": before, "problems": problems.splitlines()})
    answer: JSON = {"reloaded": True, "version": gateway.loaded.version, "previous": before}
    if everywhere:
        answer["broadcast"] = True
        answer["instances"] = [gateway.cluster.here(reloaded=True), *await gateway.cluster.ask("reload")]
    return 200, answer


def _refused(status: int, answer: JSON) -> AdminError:
    return AdminError(status, str(answer.pop("error", "bad_request")), str(answer.pop("message", "")), extra=answer)


@handler("POST", "cache/purge")
async def cache_purge(request: AdminRequest) -> tuple[int, JSON]:
    """The body names what (see :func:`edgeway.middleware.cache_signals.purge`); entries live in the shared
    store, so a purge holds for every instance at once."""
    body = request.body or {}
    routes = request.gateway.routes
    try:
        if isinstance(body.get("route"), str):
            policies = routes.cache_policies(pattern=body["route"])
            if not policies:
                raise ValueError(f"no route with a cache has match.path {body['route']!r}")
        elif isinstance(body.get("url"), str):
            method = body.get("method", "GET")
            policies = routes.cache_policies(path=body["url"].partition("?")[0],
                                             method=method.upper() if isinstance(method, str) else "GET")
        else:
            policies = routes.cache_policies()
        answer: JSON = await purge(request.gateway.store, policies, body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdminError(400, "bad_request", str(exc)) from None
    except StoreError as exc:
        raise AdminError(503, "store_unavailable", f"the purge did not reach the store: {exc}") from None
    return 200, answer


@handler("POST", "sessions/revoke")
async def revoke_session(request: AdminRequest) -> tuple[int, JSON]:
    """See :func:`edgeway.middleware.session.revoke`."""
    sessions = request.gateway.sessions
    if sessions is None:
        raise AdminError(404, "sessions_disabled", "no sessions: block in the policy")
    status, answer = await revoke(sessions, request.body or {})
    if status != 200:
        raise _refused(status, answer)
    return 200, answer


@handler("POST", "breakers/{upstream}/reset")
async def breaker_reset(request: AdminRequest) -> tuple[int, JSON]:
    """Close an upstream's breaker for every instance sharing the store."""
    status, answer = await reset_breaker(request.gateway.breakers, request.params["upstream"])
    if status != 200:
        raise _refused(status, answer)
    return 200, answer
