"""The interface every policy (rate limit, cache, breaker, session) implements.

A policy never calls the store itself. For each request it:

1. ``prepare(ctx)``: returns the store commands it needs *before* the upstream
   is called (limit check, cache lookup, session lookup, breaker state), or an
   immediate answer (e.g. 400 for a missing rate-limit key with
   ``on_missing: deny``). The pipeline sends the commands of ALL the route's
   policies as one batch: one store round trip per request.
2. ``decide(ctx, results)``: gets the results of its own commands, in order,
   and either answers the request itself (429, cached hit, 401, 503) or lets
   it through, adding response headers to ``ctx.response_headers``.
   ``store_failed(ctx, error)`` replaces ``decide`` when the batch failed
   (``StoreError``) or when one of the policy's own commands was refused
   (``CommandError``: that request's error, see :mod:`.store.base`).
3. ``finish(ctx, prepared, response)``: once the response has ended — sent
   in full, or abandoned (the client left, the app stopped early:
   ``response.complete`` is False and ``body`` None) — returns writes that can
   wait (cache fill, breaker result, post-response cost); they go out
   together, off the request's critical path. A policy
   that needs the response body sets ``response_body_limit`` (bytes); the
   pipeline then keeps a copy of bodies up to the largest such limit while
   streaming them on, never delaying them.

Per-request state lives in the context (``ctx``) or in the value ``prepare``
returns, never on the policy object, which is shared by all requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .context import RequestContext
from .responses import ErrorResponse
from .store import Command, CommandError, StoreError

Headers = Sequence[tuple[bytes, bytes]]


class Prepared:
    """What ``prepare`` returns: the commands to batch and the policy's private state for this request."""

    __slots__ = ("commands", "state")

    def __init__(self, commands: Sequence[Command] = (), state: object = None) -> None:
        self.commands = commands
        self.state = state


class Completed:
    """The response as the policies see it in ``finish``: body is None unless asked for, when too large, or
    when the response did not complete (``complete`` False: the client left or the app stopped early)."""

    __slots__ = ("body", "complete", "headers", "status")

    def __init__(self, status: int, headers: Headers, body: bytes | None, complete: bool = True) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.complete = complete

    def header(self, name: bytes) -> bytes | None:
        """First value of a response header (``name`` in lower case)."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class Policy(Protocol):
    """A route policy; see the module docstring for the request protocol."""

    name: str
    response_body_limit: int
    """Bytes of the response body ``finish`` wants to see (0: none)."""
    wants_finish: bool
    """False when ``finish`` never returns writes, so the pipeline can skip tracking the response."""

    def prepare(self, ctx: RequestContext) -> Prepared | ErrorResponse:
        """Commands for the shared batch, or an immediate answer."""
        ...

    def decide(self, ctx: RequestContext, prepared: Prepared, results: Sequence[object]) -> ErrorResponse | None:
        """Answer the request (returned response) or let it through (None)."""
        ...

    def store_failed(self, ctx: RequestContext, prepared: Prepared,
                     error: StoreError | CommandError) -> ErrorResponse | None:
        """Like ``decide`` when the store could not be reached or refused this policy's command: its failure mode."""
        ...

    def finish(self, ctx: RequestContext, prepared: Prepared, response: Completed) -> Sequence[Command]:
        """Deferred writes once the upstream answered."""
        ...
