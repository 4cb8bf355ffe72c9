"""``edgeway explain FILE METHOD PATH``: what the policy does to one request, without sending it.

The route is found by the gateway's own route table and the limits' store
keys by the rate limiter's own key code (trusted proxies, exemptions,
overrides and ``on_missing`` included), so the keys printed are the keys the
gateway would use.
"""

from __future__ import annotations

from collections.abc import Sequence

from edgeway.middleware.clientip import TrustedProxies
from edgeway.middleware.context import RequestContext
from edgeway.middleware.policy import Prepared
from edgeway.middleware.ratelimit import RateLimitPolicy
from edgeway.middleware.responses import ErrorResponse
from edgeway.middleware.store import Algorithm, LimitCheck
from edgeway.middleware.store.memory import MemoryStore

from .config import Policy, Route
from .diff import show
from .routing import RouteTable, route_policies

_WINDOWED = (Algorithm.SLIDING_WINDOW, Algorithm.FIXED_WINDOW)


def _scope(method: str, target: str, headers: Sequence[tuple[str, str]], client_ip: str) -> dict[str, object]:
    path, _, query = target.partition("?")
    return {
        "type": "http", "method": method.upper(), "path": path, "raw_path": path.encode(),
        "query_string": query.encode(), "http_version": "1.1", "scheme": "http",
        "headers": [(name.strip().lower().encode("latin-1"), value.strip().encode("latin-1"))
                    for name, value in headers],
        "client": (client_ip, 0),
    }


def _limits(route: Route, name: str, policy: Policy, ctx: RequestContext) -> list[str]:
    (limiter,) = [p for p in route_policies(route, name, policy, MemoryStore()) if isinstance(p, RateLimitPolicy)]
    outcome = limiter.prepare(ctx)
    if isinstance(outcome, ErrorResponse):
        return [f"  -> answered at once: {outcome.status} {outcome.body.decode()}"]
    # the limiter's per-request state pairs each applied limit with its check (exempt or skipped ones have none)
    state = outcome.state if isinstance(outcome, Prepared) else None
    applied: dict[int, LimitCheck] = {
        id(compiled): check for compiled, check in zip(getattr(state, "active", ()), getattr(state, "checks", ()),
                                                       strict=True)
    }
    lines = []
    for compiled in limiter.limits:
        limit = compiled.limit
        head = (f"  {limit.rate} by {'+'.join(limit.key)} ({limit.algorithm.value}, {limit.mode}, "
                f"cost {limit.cost}, policy name {compiled.id!r})")
        check = applied.get(id(compiled))
        if check is None:
            lines.append(f"{head}\n    not applied to this request (exempt, or its key is missing and on_missing "
                         f"is {limit.on_missing})")
            continue
        suffix = "  (+ ':' + window index)" if check.algorithm in _WINDOWED else ""
        quota = f"quota {check.quota} per {show(check.window_ms / 1000)}s"
        lines.append(f"{head}\n    store key: {check.key}{suffix}\n    {quota}")
    return lines


def explain(policy: Policy, method: str, target: str, headers: Sequence[tuple[str, str]] = (),
            client_ip: str = "127.0.0.1") -> tuple[bool, list[str]]:
    """(whether a route matched, the lines to print) for one request."""
    scope = _scope(method, target, headers, client_ip)
    trusted = TrustedProxies(policy.trusted_proxies)
    table = RouteTable(policy, MemoryStore(), trusted, lambda route: None)
    path = str(scope["path"])
    found = table.match(path, str(scope["method"]))
    lines = [f"{scope['method']} {target}"]
    if isinstance(found, set):
        if found:
            lines.append(f"no route allows {scope['method']} on {path}: 405 method_not_allowed "
                         f"(allowed: {', '.join(sorted(found))})")
        else:
            lines.append(f"no route matches {path}: 404 no_route")
        return False, lines
    index = table.routes.index(found)
    route = policy.routes[index]
    ctx = RequestContext(scope, trusted, found.name)
    methods = ", ".join(route.match.methods) if route.match.methods else "any method"
    upstream = policy.upstreams[route.upstream] if route.upstream is not None else None
    target_text = (f"upstream {route.upstream} ({show(upstream.url)})" if upstream is not None
                   else "the wrapped app (in-app policy)")
    lines.append(f"route: routes[{index}] {route.match.path} ({methods}), id {found.name} -> {target_text}")
    lines.append(f"client ip: {ctx.client_ip}" + (f" (peer {client_ip} is a trusted proxy)"
                                                  if ctx.client_ip != client_ip else ""))
    lines.append("limits:" if route.limits else "limits: none")
    if route.limits:
        lines += _limits(route, found.name, policy, ctx)
    if route.cache is None:
        lines.append("cache: none")
    else:
        cache = route.cache
        lines.append(f"cache: ttl {show(cache.ttl)}s, bodies up to {cache.max_body} bytes")
        values = {"method": str(scope["method"]), "path": path, "query": target.partition("?")[2] or "(empty)",
                  "body": "(the request body)", "user": "(the session's user id)"}
        parts = [f"{part}={values.get(part, ctx.header(part.partition(':')[2]) or '(absent)')}"
                 for part in cache.key]
        lines.append("  key parts: " + ", ".join(parts))
    breaker = upstream.breaker if upstream is not None else None
    if breaker is None:
        lines.append(f"breaker: none on upstream {route.upstream}")
    else:
        lines.append(f"breaker: upstream {route.upstream}: opens after {breaker.failures} failures "
                     f"({show(list(breaker.on))}), stays open {show(breaker.open_for)}s")
    if route.session == "off":
        lines.append("session: off")
    else:
        provider = policy.sessions.provider if policy.sessions else "(no sessions: section)"
        lines.append(f"session: {route.session} (provider {provider})")
    return True, lines
