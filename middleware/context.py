"""The per-request context every policy of a route shares.

Created once per request and kept in the ASGI scope, so the proxy, the rate
limiter, the cache and the session check read the client address, headers and
query once and see each other's findings (``user`` set by the session policy,
response headers added by any of them).
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any
from urllib.parse import parse_qs

from .clientip import TrustedProxies, parse_forwarded_for, parse_x_forwarded_for
from .store.base import Command, Revoked

SCOPE_KEY = "edgeway.context"

Scope = MutableMapping[str, Any]


class RequestContext:
    """Facts about one request, computed lazily and at most once."""

    __slots__ = ("_client_ip", "_headers", "_query", "body", "body_too_large", "deferred", "identity", "outcomes",
                 "request_id", "response_headers", "revocation", "route", "scope", "stale", "trusted", "upstream",
                 "upstream_seconds", "user")

    def __init__(self, scope: Scope, trusted: TrustedProxies, route: str = "") -> None:
        self.scope = scope
        self.trusted = trusted
        self.route = route
        self.user: str | None = None
        """The verified user id (set by the session policy, or the app's own authentication)."""
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.identity: Sequence[tuple[bytes, bytes]] = ()
        """``X-Edgeway-*`` headers the session policy vouches for (the user id, claims): the proxy sends these
        and drops every client-supplied ``X-Edgeway-*`` field."""
        self.revocation: Revoked | None = None
        """The session's revocation check, which the rate limiter adds to its command as a guard."""
        self.body: bytes | None = None
        """The request body, when a policy asked the pipeline to read it and it fit the limit."""
        self.body_too_large = False
        """True when a policy asked for the body and it was larger than the limit (it is streamed on)."""
        self.stale: Any = None
        """A stale cached answer the cache found (``stale_if_error``): the breaker and upstream errors use it."""
        self.deferred: list[Command] | None = None
        """Writes a policy wants sent now, off the critical path (see :meth:`defer`)."""
        self.outcomes: dict[str, str] = {}
        """What each policy did (``{"cache": "hit"}``), for the access log and metrics."""
        self.upstream: str | None = None
        """The upstream the gateway called, if it did."""
        self.upstream_seconds: float | None = None
        """Time until the upstream's response headers arrived; None when it was not called."""
        self.request_id: str = ""
        """``X-Request-Id`` of the request, or the one the gateway generated and forwarded."""
        self._client_ip: str | None = None
        self._headers: dict[str, list[str]] | None = None
        self._query: dict[str, list[str]] | None = None

    @classmethod
    def of(cls, scope: Scope, trusted: TrustedProxies, route: str = "") -> RequestContext:
        """The request's context, created on first use."""
        context = scope.get(SCOPE_KEY)
        if context is None:
            context = scope[SCOPE_KEY] = cls(scope, trusted, route)
        elif route and not context.route:
            context.route = route
        return context

    @property
    def headers(self) -> dict[str, list[str]]:
        """Request headers by lower-case name, every value kept."""
        if self._headers is None:
            headers: dict[str, list[str]] = {}
            for name, value in self.scope["headers"]:
                headers.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
            self._headers = headers
        return self._headers

    def header(self, name: str) -> str | None:
        """The first value of a header (``name`` in lower case), or None."""
        values = self.headers.get(name)
        return values[0] if values else None

    def query(self, name: str) -> str | None:
        """The first value of a query parameter, or None."""
        if self._query is None:
            self._query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        values = self._query.get(name)
        return values[0] if values else None

    def defer(self, commands: Sequence[Command]) -> None:
        """Queue writes to go out in the background as soon as the pipeline can send them.

        A policy's ``respond`` uses it for what is known at the response start
        (a cost the upstream reports in a header), so it never waits for the end of
        a long stream, nor depends on the client staying.
        """
        if self.deferred is None:
            self.deferred = []
        self.deferred.extend(commands)

    @property
    def has_body(self) -> bool:
        """Whether the request declares a body (a non-zero Content-Length, or Transfer-Encoding)."""
        for name, value in self.scope["headers"]:
            if name == b"content-length":
                return value.strip() not in (b"0", b"")
            if name == b"transfer-encoding":
                return True
        return False

    @property
    def peer(self) -> str:
        client = self.scope.get("client")
        return str(client[0]) if client else ""

    @property
    def client_ip(self) -> str:
        """The real client address (see :mod:`edgeway.middleware.clientip`)."""
        if self._client_ip is None:
            peer = self.peer
            if peer in self.trusted:
                hops = parse_x_forwarded_for(self.headers.get("x-forwarded-for", ()))
                if not hops:
                    hops = parse_forwarded_for(self.headers.get("forwarded", ()))
                self._client_ip = self.trusted.client_address(peer, hops)
            else:
                self._client_ip = peer
        return self._client_ip
