"""The interface every policy (rate limit, cache, breaker, session) implements.

A policy never calls the store itself. For each request the pipeline
(:mod:`edgeway.middleware.pipeline`) drives it through these steps:

0. When any policy sets ``request_body_limit`` and the request has a body,
   the pipeline reads it once, up to the largest such limit, into
   ``ctx.body`` (``None`` when it is larger: ``ctx.body_too_large``), and
   replays it to the app byte for byte.
1. ``prepare(ctx)``: returns the store commands it needs *before* the
   upstream is called (limit check, cache lookup, revocation check, probe
   token), or an immediate :class:`Answer` (400 for a missing rate-limit key,
   401 for a token that fails local checks). The pipeline sends the commands
   of ALL the route's policies as one batch: one store round trip per
   request. A policy that cannot say what it needs without waiting (a token
   only the auth provider can validate) returns :class:`Pending`; the
   pipeline awaits it before preparing the next policy, which may depend on
   what it found (``ctx.user``). That wait is off the common path.
2. ``decide(ctx, prepared, results)``: gets the results of its own commands,
   in order, and either answers the request itself (429, a cached response,
   401, 503) or lets it through (None), adding response headers to
   ``ctx.response_headers``. It may also return :class:`Pending` (waiting
   for another instance's cache fill), resolved to an answer or None.
   ``store_failed(ctx, prepared, error)`` replaces ``decide`` when the batch
   failed (``StoreError``), or when one of the policy's own commands was
   refused (``CommandError``: that request's error, not an outage; see
   :mod:`.store.base`): the policy's failure mode.
3. ``respond(ctx, prepared, start)`` (policies with ``wants_respond``): sees
   the app's ``http.response.start`` message before the client does; it may
   edit its headers in place (``Cache-Status``), or return an answer that
   replaces the whole response (a stale entry instead of a 502). What it
   learns there and must write (a cost the upstream reports in a header) it
   queues with ``ctx.defer(commands)``: sent at once, in the background.
4. ``finish(ctx, prepared, response)`` (policies with ``wants_finish``): once
   the response ended — completely or not (``response.complete``) — returns
   writes that can wait (cache fill, breaker result, post-response cost);
   they go out together, off the request's critical path. A policy that
   needs the response body sets ``response_body_limit`` (bytes); the
   pipeline then keeps a copy of bodies up to the largest such limit, chunk
   by chunk, while streaming them on, never delaying them.
5. ``written(ctx, prepared, outcome)``: once those writes ran, the policy's
   share of their results (or the :class:`StoreError` that stopped them), for
   a policy that learns from what it wrote (the breaker: did this failure open
   it?). Off the request's path.

Per-request state lives in the context (``ctx``) or in the value ``prepare``
returns, never on the policy object, which is shared by all requests.
"""

from __future__ import annotations

from collections.abc import Awaitable, MutableMapping, Sequence
from typing import Any, Protocol

from .context import RequestContext
from .responses import Message, Receive, Send
from .store import Command, CommandError, StoreError

Headers = Sequence[tuple[bytes, bytes]]


class Answer(Protocol):
    """A response Edgeway sends itself (an error, a cached response): an ASGI app whose status, headers and body
    chunks a server may also write itself (:meth:`PolicyPipeline.answer_now`). Not changed once made: one
    answer may serve many requests (a hot cache entry's); ``responses.with_headers`` copies it with more fields."""

    status: int
    headers: list[tuple[bytes, bytes]]

    @property
    def chunks(self) -> Sequence[bytes]: ...

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None: ...


class Prepared:
    """What ``prepare`` returns: the commands to batch and the policy's private state for this request."""

    __slots__ = ("commands", "state")

    def __init__(self, commands: Sequence[Command] = (), state: object = None) -> None:
        self.commands = commands
        self.state = state


class Pending:
    """A step that must wait (an auth provider call, another instance's cache fill) before it can say.

    Returned by ``prepare`` it resolves to ``Prepared`` or an answer; returned
    by ``decide``/``store_failed`` it resolves to an answer or None.
    """

    __slots__ = ("awaitable",)

    def __init__(self, awaitable: Awaitable[Prepared | Answer | None]) -> None:
        self.awaitable = awaitable


class Completed:
    """The response as the policies see it in ``finish``.

    ``chunks`` holds the body as the app sent it (event boundaries kept) when a
    policy asked for it and it fit the limit, else None. ``complete`` is True
    once the app handed over its last body message, False when the response was
    cut short (the client left, the app failed); ``status`` is 0 when it never
    started. ``elapsed`` is the seconds from the request's arrival to the
    response start (time to first byte).
    """

    __slots__ = ("chunks", "complete", "elapsed", "headers", "status")

    def __init__(self, status: int, headers: Headers, chunks: list[bytes] | None, *, complete: bool = True,
                 elapsed: float = 0.0) -> None:
        self.status = status
        self.headers = headers
        self.chunks = chunks
        self.complete = complete
        self.elapsed = elapsed

    @property
    def body(self) -> bytes | None:
        """The whole kept body, or None (not asked for, or over the limit)."""
        return None if self.chunks is None else b"".join(self.chunks)

    def header(self, name: bytes) -> bytes | None:
        """First value of a response header (``name`` in lower case)."""
        size = len(name)
        for key, value in self.headers:
            if len(key) == size and key.lower() == name:
                return value
        return None


class Policy(Protocol):
    """A route policy; see the module docstring for the request protocol."""

    name: str
    request_body_limit: int
    """Bytes of the request body ``prepare`` wants in ``ctx.body`` (0: none)."""
    response_body_limit: int
    """Bytes of the response body ``finish`` wants to see (0: none)."""
    wants_respond: bool
    """True when ``respond`` must see the response start."""
    wants_finish: bool
    """False when ``finish`` never returns writes nor needs to run, so the pipeline can skip tracking."""
    decides_from_memory: bool
    """True when ``prepare`` changes nothing (it may be run and its result dropped) and, having returned no
    commands, ``decide`` answers without awaiting (a hot cache entry). A route whose policies all say so can
    be answered by :meth:`PolicyPipeline.answer_now`, without an ASGI task or a store round trip."""

    def prepare(self, ctx: RequestContext) -> Prepared | Answer | Pending:
        """Commands for the shared batch, an immediate answer, or a wait for one of those."""
        ...

    def decide(self, ctx: RequestContext, prepared: Prepared, results: Sequence[object]) -> Answer | Pending | None:
        """Answer the request (returned response) or let it through (None)."""
        ...

    def store_failed(self, ctx: RequestContext, prepared: Prepared,
                     error: StoreError | CommandError) -> Answer | Pending | None:
        """Like ``decide`` when the store could not be reached or refused this policy's command: its failure mode."""
        ...

    def respond(self, ctx: RequestContext, prepared: Prepared, start: Message) -> Answer | None:
        """Edit the response start in place, or return an answer that replaces the response."""
        ...

    def finish(self, ctx: RequestContext, prepared: Prepared, response: Completed) -> Sequence[Command]:
        """Deferred writes once the response ended."""
        ...

    def written(self, ctx: RequestContext, prepared: Prepared, outcome: Sequence[object] | StoreError) -> None:
        """The results of this policy's deferred writes, in order, or the error that stopped them."""
        ...


class BasePolicy:
    """Defaults for the optional parts of :class:`Policy`; policies subclass it and override what they use."""

    name = "policy"
    request_body_limit = 0
    response_body_limit = 0
    wants_respond = False
    wants_finish = False
    decides_from_memory = False

    def store_failed(self, ctx: RequestContext, prepared: Prepared,
                     error: StoreError | CommandError) -> Answer | Pending | None:
        return None

    def respond(self, ctx: RequestContext, prepared: Prepared, start: Message) -> Answer | None:
        return None

    def finish(self, ctx: RequestContext, prepared: Prepared, response: Completed) -> Sequence[Command]:
        return ()

    def written(self, ctx: RequestContext, prepared: Prepared, outcome: Sequence[object] | StoreError) -> None:
        return None
