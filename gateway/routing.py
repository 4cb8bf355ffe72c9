"""The route table: ``routes:`` compiled once, first match wins.

Shared by the gateway (each route ends in its upstream's proxy) and by the
in-app middleware (each route ends in the wrapped app), so one policy file
means the same thing in both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgeway.middleware.cache import CachePolicy
from edgeway.middleware.clientip import TrustedProxies
from edgeway.middleware.pipeline import EdgewayMiddleware
from edgeway.middleware.policy import Policy as RoutePolicy
from edgeway.middleware.ratelimit import RateLimitPolicy
from edgeway.middleware.store import Store

from .config import Policy, Route


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """One route ready to match: exact path or prefix (``/api/*``), methods, and the app to call."""

    name: str
    pattern: str
    prefix: str | None
    methods: frozenset[str] | None
    app: Any

    def path_matches(self, path: str) -> bool:
        if self.prefix is None:
            return path == self.pattern
        # "/api/*" matches "/api/", "/api/x/y" and "/api" itself
        return path.startswith(self.prefix) or path == self.prefix.rstrip("/")


def route_policies(route: Route, name: str, policy: Policy, store: Store, app: Any = None) -> list[RoutePolicy]:
    """The policy objects of one route, in the order they run; ``app`` is what they guard (the upstream's proxy,
    or the wrapped app), which the cache calls to refresh stale entries in the background."""
    policies: list[RoutePolicy] = []
    if route.limits:
        policies.append(RateLimitPolicy(route.limits, route=name, key_prefix=policy.store.key_prefix))
    if route.cache is not None:
        policies.append(CachePolicy(route.cache, store=store, route=name, key_prefix=policy.store.key_prefix,
                                    upstream=app))
    return policies


class RouteTable:
    """Routes in file order; ``match`` returns the route or the methods other routes allow on the path."""

    def __init__(self, policy: Policy, store: Store, trusted: TrustedProxies,
                 endpoint: Callable[[Route], Any]) -> None:
        routes = []
        for index, route in enumerate(policy.routes):
            name = f"{index}:{route.match.path}"
            app = endpoint(route)
            policies = route_policies(route, name, policy, store, app)
            if policies:
                app = EdgewayMiddleware(app, policies=policies, store=store, trusted_proxies=trusted, route=name)
            pattern = route.match.path
            methods = frozenset(route.match.methods) if route.match.methods else None
            routes.append(CompiledRoute(name, pattern, pattern[:-1] if pattern.endswith("*") else None, methods, app))
        self.routes = tuple(routes)

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
