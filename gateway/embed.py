"""The policy file inside an ASGI app.

FastAPI / Starlette, keeping ``app`` the framework's object (``dependency_overrides``,
``state``, ``include_router`` stay usable)::

    app.add_middleware(EdgewayMiddleware, policy="policy.yaml")

Any other ASGI app: ``app = Edgeway.from_policy("policy.yaml").wrap(app)``.

Routes match exactly as in the gateway; a matching route's policies run in front of
the app (upstreams are not needed: the app is the upstream; an upstream's ``breaker:``
guards the app on the routes naming it, retries are the gateway's only), and requests
no route matches go straight to the app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeway.middleware.clientip import TrustedProxies
from edgeway.middleware.context import SCOPE_KEY, RequestContext, Scope
from edgeway.middleware.responses import Message, Receive, Send
from edgeway.middleware.store import Clock, Store
from edgeway.middleware.users import UserFrom, user_source

from .loader import LoadedPolicy, load_policy
from .routing import RouteTable
from .stores import build_store


class Edgeway:
    """A loaded policy ready to mount in ASGI apps."""

    def __init__(self, loaded: LoadedPolicy, *, store: Store | None = None, clock: Clock | None = None,
                 user_from: UserFrom | None = None) -> None:
        self.loaded = loaded
        self.clock = clock
        self.store = store or build_store(loaded.policy.store, clock, key_prefix=loaded.policy.key_prefix)
        self.trusted = TrustedProxies(loaded.policy.trusted_proxies)
        self.user_from = user_source(user_from)

    @classmethod
    def from_policy(cls, path: str | Path, *, store: Store | None = None, clock: Clock | None = None,
                    user_from: UserFrom | None = None) -> Edgeway:
        """Load and validate ``path`` as an in-app policy (no upstreams needed); raises
        :class:`~edgeway.gateway.errors.PolicyError` listing every problem."""
        return cls(load_policy(path, mode="in-app"), store=store, clock=clock, user_from=user_from)

    def wrap(self, app: Any) -> EdgewayMiddleware:
        """``app`` with the policy's routes in front of it (for plain ASGI apps; FastAPI and
        Starlette apps keep their own object with ``app.add_middleware(EdgewayMiddleware, ...)``)."""
        return EdgewayMiddleware(app, policy=self)


class EdgewayMiddleware:
    """Pure ASGI middleware applying a policy file's routes: ``app.add_middleware(EdgewayMiddleware,
    policy="policy.yaml")``.

    ``policy`` is a file path (validated as an in-app policy), a loaded policy or an
    :class:`Edgeway`. ``user_from`` supplies the user for ``key: user`` limits when the
    app's own authentication (``scope["user"]``) has none: ``"header:X-User-Id"`` or a
    function of the ASGI scope. The store is closed when the app shuts down.
    """

    def __init__(self, app: Any, *, policy: str | Path | LoadedPolicy | Edgeway, store: Store | None = None,
                 clock: Clock | None = None, user_from: UserFrom | None = None) -> None:
        if isinstance(policy, Edgeway):
            edgeway = policy
        else:
            loaded = policy if isinstance(policy, LoadedPolicy) else load_policy(policy, mode="in-app")
            edgeway = Edgeway(loaded, store=store, clock=clock, user_from=user_from)
        self.app = app
        self.edgeway = edgeway
        self.trusted = edgeway.trusted
        self.routes = RouteTable(edgeway.loaded.policy, edgeway.store, edgeway.trusted, lambda route: app,
                                 user_from=edgeway.user_from, clock=edgeway.clock)
        self._started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._started:
            # heartbeats from the app's startup (or, without lifespan, its first request of any route), so
            # peers count this instance even before it serves a limited route
            self._started = True
            await self.edgeway.store.start()
        kind = scope["type"]
        if kind == "lifespan":
            await self.app(scope, receive, self._closing_store(send))
            return
        if kind != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        if any(name.startswith(b"x-edgeway-") for name, _ in headers):
            # identity fields are Edgeway's alone: a client's copies never reach the app, on any route
            scope["headers"] = [pair for pair in headers if not pair[0].startswith(b"x-edgeway-")]
        found = self.routes.match(scope["path"], scope["method"])
        if isinstance(found, set):
            await self.app(scope, receive, send)
            return
        made = SCOPE_KEY not in scope
        RequestContext.of(scope, self.trusted, found.name)
        try:
            await found.app(scope, receive, send)
        finally:
            if made:  # unlinked from its scope, the request's context is freed at once (see Gateway.__call__)
                scope.pop(SCOPE_KEY, None)

    def _closing_store(self, send: Send) -> Send:
        async def send_closing(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                for breaker in self.routes.breakers.values():  # their subscriptions before the store
                    await breaker.close()
                await self.routes.close()
                await self.edgeway.store.close()
            await send(message)

        return send_closing
