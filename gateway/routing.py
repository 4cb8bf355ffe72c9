"""The route table: ``routes:`` compiled once, first match wins.

Shared by the gateway (each route ends in its upstream's proxy) and by the
in-app middleware (each route ends in the wrapped app), so one policy file
means the same thing in both.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from edgeway.middleware.breaker import CircuitBreaker
from edgeway.middleware.breaker_policy import BreakerPolicy
from edgeway.middleware.cache import CachePolicy
from edgeway.middleware.clientip import TrustedProxies
from edgeway.middleware.metrics import REQUEST_SECONDS, REQUESTS, Increments, tally, timings
from edgeway.middleware.pipeline import PolicyPipeline
from edgeway.middleware.policy import Policy as RoutePolicy
from edgeway.middleware.ratelimit import RateLimitPolicy
from edgeway.middleware.session import SessionPolicy, SessionService
from edgeway.middleware.store import Clock, Store
from edgeway.middleware.users import UserSource, user_source

from .config import HTTP_METHODS, Policy, Route

_METHODS = frozenset(HTTP_METHODS)


class RouteMeter:
    """A route's request metrics, label children bound once (``labels()`` per request costs more than
    the increment); children per (method, status) are bound the first time that pair is seen."""

    __slots__ = ("_requests", "duration", "name")

    def __init__(self, name: str, methods: tuple[str, ...] = ()) -> None:
        self.name = name
        self.duration = timings(REQUEST_SECONDS.labels(name))
        self._requests: dict[tuple[str, int], Increments] = {}
        for method in methods:  # the common answer, so the route shows in a scrape before its first request
            self._child(method, 200)

    def _child(self, method: str, status: int) -> Increments:
        if method not in _METHODS:
            method = "OTHER"
        child = self._requests[(method, status)] = tally(REQUESTS.labels(self.name, method, str(status)))
        return child

    def record(self, method: str, status: int, seconds: float) -> None:
        """Count one answered request and its duration."""
        child = self._requests.get((method, status))
        if child is None:
            child = self._child(method, status)
        child.inc()
        self.duration.observe(seconds)


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """One route ready to match: exact path or prefix (``/api/*``), methods, and the app to call."""

    name: str
    pattern: str
    prefix: str | None
    methods: frozenset[str] | None
    app: Any
    upstream: str | None
    meter: RouteMeter
    fold: bool = False  # match.case_insensitive: pattern and prefix are lower case, compared with the path's
    allow_semicolons: bool = False
    allow_backslashes: bool = False
    answers_now: bool = False  # app.answer_now may answer from memory (a cache-only route)

    def path_matches(self, path: str) -> bool:
        if self.fold:
            path = path.lower()
        if self.prefix is None:
            return path == self.pattern
        # "/api/*" matches "/api/", "/api/x/y" and "/api" itself
        return path.startswith(self.prefix) or path == self.prefix.rstrip("/")


def build_breakers(policy: Policy, store: Store, clock: Clock | None = None) -> dict[str, CircuitBreaker]:
    """One breaker per upstream with a ``breaker:`` block, shared by every route (and retry) using it."""
    instance = getattr(store, "instance_id", None)  # the failover chain's id, so logs name one instance
    return {
        name: CircuitBreaker(
            name, upstream.breaker, store=store, key_prefix=policy.key_prefix, clock=clock,
            probe_timeout=upstream.timeout.connect + upstream.timeout.read + 1.0,
            instance_id=instance if isinstance(instance, str) else None,
        )
        for name, upstream in policy.upstreams.items()
        if upstream.breaker is not None
    }


def route_policies(route: Route, name: str, policy: Policy, store: Store, app: Any = None,
                   user_from: UserSource | None = None, breakers: Mapping[str, CircuitBreaker] | None = None,
                   clock: Clock | None = None, sessions: SessionService | None = None) -> list[RoutePolicy]:
    """The policy objects of one route, in the order they run (session first, the breaker last, before the
    upstream); ``app`` is what they guard (the upstream's proxy, or the wrapped app), which the cache calls to
    refresh stale entries in the background; ``sessions`` is the policy's one session service."""
    policies: list[RoutePolicy] = []
    if route.session != "off" and sessions is not None:
        policies.append(SessionPolicy(sessions, mode=route.session, privileged=route.privileged, route=name))
    if route.limits:
        policies.append(RateLimitPolicy(route.limits, route=name, key_prefix=policy.key_prefix,
                                        user_from=user_from or user_source(policy.user_from)))
    if route.cache is not None:
        policies.append(CachePolicy(route.cache, store=store, route=name, key_prefix=policy.key_prefix,
                                    upstream=app, clock=clock or time.time))
    breaker = breakers.get(route.upstream) if breakers and route.upstream is not None else None
    if breaker is not None:
        policies.append(BreakerPolicy(breaker))
    return policies


class RouteTable:
    """Routes in file order; ``match`` returns the route or the methods other routes allow on the path."""

    def __init__(self, policy: Policy, store: Store, trusted: TrustedProxies,
                 endpoint: Callable[[Route], Any], *, user_from: UserSource | None = None,
                 breakers: Mapping[str, CircuitBreaker] | None = None, clock: Clock | None = None) -> None:
        self.breakers = dict(breakers) if breakers is not None else build_breakers(policy, store, clock)
        routes = []
        self.sessions = SessionService(policy.sessions, store, key_prefix=policy.key_prefix,
                                       clock=clock or time.time) if policy.sessions is not None else None
        """One session service (result caches, JWKS, provider client) for all the routes of the policy."""
        for route in policy.routes:
            name = route.route_id  # never the position in the file: inserting a route must not reset counters
            app = endpoint(route)
            policies = route_policies(route, name, policy, store, app, user_from, self.breakers, clock,
                                      self.sessions)
            if policies:
                app = PolicyPipeline(app, policies=policies, store=store, trusted_proxies=trusted, route=name)
            match = route.match
            pattern = match.path.lower() if match.case_insensitive else match.path
            methods = frozenset(match.methods) if match.methods else None
            meter = RouteMeter(name, match.methods or ("GET",))
            routes.append(CompiledRoute(name, pattern, pattern[:-1] if pattern.endswith("*") else None, methods, app,
                                        route.upstream, meter, match.case_insensitive, match.allow_semicolons,
                                        match.allow_backslashes, isinstance(app, PolicyPipeline) and app.memory_only))
        self.routes = tuple(routes)
        self.answers_now = any(route.answers_now for route in self.routes)
        """Whether some route may be answered from memory (see ``Gateway.answer_now``)."""

    async def close(self) -> None:
        """Release what the routes hold beyond the store (the session provider's connections)."""
        if self.sessions is not None:
            await self.sessions.close()

    def cache_policies(self, *, pattern: str | None = None, path: str | None = None,
                       method: str = "GET") -> list[CachePolicy]:
        """The cache policies of every route, of the routes whose ``match.path`` is ``pattern``, or of the
        route a request for ``path`` reaches (for purges)."""
        if path is not None:
            found = self.match(path, method)
            routes: tuple[CompiledRoute, ...] = (found,) if isinstance(found, CompiledRoute) else ()
        else:
            routes = tuple(r for r in self.routes if pattern is None or r.pattern == pattern)
        return [policy for route in routes for policy in getattr(route.app, "policies", ())
                if isinstance(policy, CachePolicy)]

    def match(self, path: str, method: str) -> CompiledRoute | set[str]:
        allowed: set[str] = set()
        for route in self.routes:
            if route.path_matches(path):
                if route.methods is None or method in route.methods:
                    return route
                allowed |= route.methods
        return allowed


_SLASHES = re.compile(r"//+")
# what stays literal when a normalised path is re-encoded for the upstream (RFC 3986 pchar and '/')
_PATH_SAFE = "/!$&'()*+,;=:@-._~"


def normalize_path(path: str, raw_path: bytes | None) -> tuple[str, bytes | None]:
    """The path routes match and the upstream receives: runs of ``/`` merged (also ``%2F``-encoded ones).

    Returns (path, raw path to send). The raw path stays byte-exact unless
    normalising changed the path or it carries an encoded ``/``: then the
    upstream gets the normalised path re-encoded, so it acts on exactly the
    path the policy matched (``//limited/x`` and ``/%2flimited/x`` are
    ``/limited/x`` to both).
    """
    merged = _SLASHES.sub("/", path) if "//" in path else path
    if merged is path and not (raw_path and b"%" in raw_path and b"%2f" in raw_path.lower()):
        return path, raw_path
    return merged, quote(merged, safe=_PATH_SAFE).encode("ascii")


def needs_normalizing(path: str, raw_path: bytes | None) -> bool:
    """Cheap test for the common path that needs no work (no ``//``, ``%``, ``;`` or ``\\``)."""
    return "//" in path or ";" in path or "\\" in path or (raw_path is not None and b"%" in raw_path)
