"""The policy file inside any ASGI app: ``app = Edgeway.from_policy("policy.yaml").wrap(app)``.

Routes match exactly as in the gateway; a matching route's policies run in
front of the wrapped app (the app is the upstream: upstream URLs are ignored, their
``breaker:`` guards the app, one breaker per upstream name, retries are the gateway's only), and
requests no route matches go straight to the app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeway.middleware.clientip import TrustedProxies
from edgeway.middleware.context import RequestContext, Scope
from edgeway.middleware.responses import Receive, Send
from edgeway.middleware.store import Clock, Store

from .loader import LoadedPolicy, load_policy
from .routing import RouteTable
from .stores import build_store


class Edgeway:
    """A loaded policy ready to wrap ASGI apps."""

    def __init__(self, loaded: LoadedPolicy, *, store: Store | None = None, clock: Clock | None = None) -> None:
        self.loaded = loaded
        self.clock = clock
        self.store = store or build_store(loaded.policy.store, clock)
        self.trusted = TrustedProxies(loaded.policy.trusted_proxies)

    @classmethod
    def from_policy(cls, path: str | Path, *, store: Store | None = None, clock: Clock | None = None) -> Edgeway:
        """Load and validate ``path``; raises :class:`~edgeway.gateway.errors.PolicyError` listing every problem."""
        return cls(load_policy(path), store=store, clock=clock)

    def wrap(self, app: Any) -> Any:
        """``app`` with the policy's routes in front of it."""
        return _Wrapped(app, RouteTable(self.loaded.policy, self.store, self.trusted, lambda route: app,
                                        clock=self.clock), self.trusted, self.store)


class _Wrapped:
    def __init__(self, app: Any, routes: RouteTable, trusted: TrustedProxies, store: Store) -> None:
        self.app = app
        self.routes = routes
        self.trusted = trusted
        self.store = store
        self._started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._started:
            # heartbeats from the app's startup (or, without lifespan, its first request of any route), so
            # peers count this instance even before it serves a limited route
            self._started = True
            await self.store.start()
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        found = self.routes.match(scope["path"], scope["method"])
        if isinstance(found, set):
            await self.app(scope, receive, send)
            return
        RequestContext.of(scope, self.trusted, found.name)
        await found.app(scope, receive, send)
