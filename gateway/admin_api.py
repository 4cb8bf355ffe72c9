"""The table of ``/_edgeway/*`` operations: what each takes and answers, its handler, and the OpenAPI document.

Every gateway endpoint is one :class:`Operation` in :data:`OPERATIONS`; the
dispatcher (:mod:`edgeway.gateway.admin`) matches requests against it and
``GET /_edgeway/openapi.json`` is generated from it, so the document cannot
drift from what is served. To add a handler, write it in a module of its own
and register it::

    from .admin_api import AdminError, AdminRequest, handler

    @handler("POST", "cache/purge")
    async def purge(request: AdminRequest) -> tuple[int, dict[str, Any]]:
        body = request.body            # the JSON object sent (validated as an object, not deeper)
        ...
        return 200, {"purged": n}      # or raise AdminError(400, "bad_request", "say what is wrong")

then import that module in :mod:`edgeway.gateway.admin` (one line, beside the
others). Operations described here without a handler yet answer 501
``not_implemented``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from edgeway.middleware.context import Scope

if TYPE_CHECKING:
    from .app import Gateway

JSON = dict[str, Any]


class AdminError(Exception):
    """Raised by a handler to answer ``status`` with ``{"error": code, "message": ...}`` and ``Edgeway-Error``."""

    def __init__(self, status: int, code: str, message: str, *, extra: JSON | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


@dataclass(frozen=True)
class AdminRequest:
    """What a handler gets: the gateway, the request, path parameters, query and JSON body."""

    gateway: Gateway
    scope: Scope
    params: dict[str, str]
    query: dict[str, str]
    body: JSON | None


Handler = Callable[[AdminRequest], Awaitable[tuple[int, JSON]]]


@dataclass(frozen=True)
class Operation:
    """One gateway endpoint: ``METHOD /_edgeway/<path>`` (``{name}`` segments are parameters)."""

    method: str
    path: str
    operation_id: str
    summary: str
    response: JSON
    """JSON schema of the 200 answer."""
    body: JSON | None = None
    """JSON schema of the request body; None: the operation takes none."""
    query: tuple[tuple[str, str], ...] = ()
    """(name, description) of boolean-like query flags."""
    admin: bool = True
    """False for the public endpoints (health, readiness, metrics, this document)."""
    content_type: str = "application/json"
    extra_responses: dict[int, str] = field(default_factory=dict)
    handler: Handler | None = None

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(self.path)) + "$")


_OBJ: JSON = {"type": "object"}
_INSTANCE: JSON = {"type": "object", "required": ["id", "version"],
                   "properties": {"id": {"type": "string"}, "version": {"type": "string"}, "pid": {"type": "integer"},
                                  "reloaded": {"type": ["boolean", "null"]},
                                  "problems": {"type": "array", "items": {"type": "string"}}}}
_VERSIONED: JSON = {"type": "object", "properties": {"source": {"type": "string"}, "version": {"type": "string"}}}

OPERATIONS: dict[tuple[str, str], Operation] = {}


def _add(operation: Operation) -> None:
    OPERATIONS[(operation.method, operation.path)] = operation


def handler(method: str, path: str) -> Callable[[Handler], Handler]:
    """Register the handler of the described operation ``method path`` (see the module docstring)."""
    def register(function: Handler) -> Handler:
        key = (method, path)
        if key not in OPERATIONS:
            raise KeyError(f"no admin operation {method} /_edgeway/{path} is described in admin_api.py")
        OPERATIONS[key] = replace(OPERATIONS[key], handler=function)
        return function
    return register


def match(method: str, path: str) -> tuple[Operation | None, dict[str, str], list[str]]:
    """The operation for ``method path`` with its path parameters, or None and the methods the path allows."""
    allowed: list[str] = []
    for operation in OPERATIONS.values():
        found = operation.pattern.match(path)
        if found is None:
            continue
        if operation.method == method or (method == "HEAD" and operation.method == "GET"):
            return operation, found.groupdict(), []
        allowed.append(operation.method)
    return None, {}, allowed


# -- the operations SPEC.md names --------------------------------------------------------------------

_add(Operation("GET", "healthz", "healthz", "Liveness: 200 while the process serves.",
               {"type": "object", "properties": {"status": {"const": "ok"}}}, admin=False))
_add(Operation("GET", "readyz", "readyz", "Readiness: 200 while a store serves shared state (status degraded on a "
               "fallback), 503 when none does; shows the store mode, chain and month's command budget.",
               {"type": "object", "required": ["status", "store"],
                "properties": {"status": {"enum": ["ready", "degraded"]}, "store": _OBJ, "policy": _VERSIONED}},
               admin=False, extra_responses={503: "No store answers."}))
_add(Operation("GET", "metrics", "metrics", "Prometheus text exposition of every Edgeway metric.",
               {"type": "string"}, admin=False, content_type="text/plain"))
_add(Operation("GET", "openapi.json", "openapi", "This document.", _OBJ, admin=False))
_add(Operation(
    "GET", "status", "status",
    "The policy version served, the store chain with health, upstreams, routes with their policies, and the live "
    "instances.",
    {"type": "object", "required": ["instance", "policy", "store", "upstreams", "routes"],
     "properties": {"instance": _OBJ, "policy": _VERSIONED, "store": _OBJ, "upstreams": _OBJ,
                    "routes": {"type": "array", "items": _OBJ},
                    "instances": {"type": "array", "items": _INSTANCE}}},
))
_add(Operation(
    "POST", "reload", "reload",
    "Re-read the policy file; an invalid file is refused (422, every problem as FILE:LINE:COL) and the running "
    "policy keeps serving.",
    {"type": "object", "required": ["reloaded", "version"],
     "properties": {"reloaded": {"type": "boolean"}, "version": {"type": "string"}, "previous": {"type": "string"},
                    "broadcast": {"type": "boolean"}, "instances": {"type": "array", "items": _INSTANCE}}},
    query=(("all", "1: every instance sharing the store reloads (through the store's notifications)"),),
    extra_responses={422: "The policy file is invalid; the running policy stays.",
                     409: "all=1, but the store carries no notifications between instances."},
))
_add(Operation(
    "POST", "cache/purge", "purgeCache",
    "Delete cached responses: all, a route's (its match.path), a tag's, or one request's entry.",
    {"type": "object", "required": ["purged"], "properties": {"purged": {"type": "integer", "minimum": 0}}},
    body={"oneOf": [
        {"type": "object", "required": ["all"], "properties": {"all": {"const": True}}, "additionalProperties": False},
        {"type": "object", "required": ["route"], "properties": {"route": {"type": "string"}},
         "additionalProperties": False},
        {"type": "object", "required": ["tag"], "properties": {"tag": {"type": "string"}},
         "additionalProperties": False},
        {"type": "object", "required": ["url"], "additionalProperties": False,
         "properties": {"url": {"type": "string"}, "method": {"type": "string", "default": "GET"}}},
    ]},
))
_add(Operation(
    "POST", "breakers/{upstream}/reset", "resetBreaker",
    "Close an upstream's circuit breaker for every instance sharing the store.",
    {"type": "object", "required": ["upstream"], "properties": {"upstream": {"type": "string"},
                                                                 "state": {"type": "string"}}},
    extra_responses={404: "No such upstream, or it has no breaker."},
))
_add(Operation(
    "POST", "sessions/revoke", "revokeSession",
    "Forget cached sessions: one token's, one JWT id's, or every session of a user.",
    {"type": "object", "required": ["revoked"], "properties": {"revoked": {"const": True}}},
    body={"oneOf": [
        {"type": "object", "required": ["token"], "properties": {"token": {"type": "string"}},
         "additionalProperties": False},
        {"type": "object", "required": ["jti"], "properties": {"jti": {"type": "string"}},
         "additionalProperties": False},
        {"type": "object", "required": ["user"], "properties": {"user": {"type": "string"}},
         "additionalProperties": False},
    ]},
))


# -- the document -------------------------------------------------------------------------------------

_ERROR: JSON = {"type": "object", "required": ["error"],
                "properties": {"error": {"type": "string"}, "message": {"type": "string"}}}


def _error_response(description: str) -> JSON:
    return {"description": description,
            "headers": {"Edgeway-Error": {"description": "The error code, as in the body.",
                                          "schema": {"type": "string"}}},
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def openapi(version: str) -> JSON:
    """The OpenAPI 3.1 document of every operation in :data:`OPERATIONS`."""
    paths: dict[str, JSON] = {}
    for operation in OPERATIONS.values():
        responses: dict[str, JSON] = {"200": {
            "description": "OK", "content": {operation.content_type: {"schema": operation.response}}}}
        for status, description in operation.extra_responses.items():
            responses[str(status)] = _error_response(description)
        entry: JSON = {"operationId": operation.operation_id, "summary": operation.summary, "responses": responses}
        parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                      for name in re.findall(r"{(\w+)}", operation.path)]
        parameters += [{"name": name, "in": "query", "required": False, "description": text,
                        "schema": {"type": "string", "enum": ["0", "1"]}} for name, text in operation.query]
        if parameters:
            entry["parameters"] = parameters
        if operation.body is not None:
            entry["requestBody"] = {"required": True, "content": {"application/json": {"schema": operation.body}}}
            responses["400"] = _error_response("The body is not valid JSON of the documented shape.")
        if operation.admin:
            entry["security"] = [{"adminToken": []}]
            responses["401"] = _error_response("Missing or wrong admin token.")
            responses["404"] = responses.get("404") or _error_response("The admin API is off (no admin.token).")
        else:
            entry["security"] = []
        paths.setdefault(f"/_edgeway/{operation.path}", {})[operation.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "Edgeway gateway and admin API", "version": version,
                 "description": "Endpoints under /_edgeway/. Admin operations need Authorization: Bearer "
                                "<admin.token>; they are off while the policy sets no token."},
        "paths": paths,
        "components": {
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": _ERROR},
        },
    }
