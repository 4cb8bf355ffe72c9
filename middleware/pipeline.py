"""Runs a route's policies around an app with ONE store round trip per request.

``PolicyPipeline(app, policies=[...], store=...)`` is the one place a
request's policy path is visible: prepare every policy -> one batched
``store.execute`` -> let each policy decide -> call the app with the policies'
response headers added -> hand the deferred writes to the store in the
background. docs/architecture.md draws the path. Each policy's own middleware
class (``RateLimitMiddleware``, ...) is this class with a single policy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any

from .clientip import IPNetwork, TrustedProxies
from .context import SCOPE_KEY, RequestContext, Scope
from .policy import Answer, Completed, Pending, Policy, Prepared
from .responses import ErrorResponse, Message, Receive, Send, with_headers
from .store import Command, CommandError, Store, StoreError

logger = logging.getLogger("edgeway")

ASGIApp = Any  # Callable[[Scope, Receive, Send], Awaitable[None]]


class Throttled:
    """Logs a recurring condition at most once per ``every`` seconds, with a count of what it skipped."""

    __slots__ = ("_every", "_last", "_skipped")

    def __init__(self, every: float = 10.0) -> None:
        self._every = every
        self._last = -float("inf")
        self._skipped = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self._every:
            self._skipped += 1
            return
        suffix = f" ({self._skipped} more since last report)" if self._skipped else ""
        self._last, self._skipped = now, 0
        logger.warning(message + suffix, *args)


class PathFilter:
    """Which paths a middleware applies to: ``paths`` (all when None) minus ``exclude``.

    Entries match as route paths do: exactly, or as a prefix when they end in ``*``
    (``/docs*`` covers ``/docs`` and ``/docs/oauth2-redirect``).
    """

    __slots__ = ("_exclude", "_paths")

    def __init__(self, paths: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> None:
        self._paths = None if paths is None else self._compile(paths, "paths")
        self._exclude = self._compile(exclude, "exclude")

    @staticmethod
    def _compile(entries: Iterable[str], what: str) -> tuple[tuple[str, bool], ...]:
        if isinstance(entries, str):
            entries = [entries]
        compiled = []
        for entry in entries:
            if not entry.startswith("/") or "*" in entry[:-1]:
                raise ValueError(f"bad {what} entry {entry!r}: a path starting with '/', optionally ending in *")
            compiled.append((entry[:-1], True) if entry.endswith("*") else (entry, False))
        return tuple(compiled)

    @staticmethod
    def _matches(path: str, entries: tuple[tuple[str, bool], ...]) -> bool:
        return any(path.startswith(text) if prefix else path == text for text, prefix in entries)

    def __bool__(self) -> bool:
        return self._paths is not None or bool(self._exclude)

    def applies(self, path: str) -> bool:
        """Whether the policies run for ``path``."""
        if self._paths is not None and not self._matches(path, self._paths):
            return False
        return not self._matches(path, self._exclude)


class PolicyPipeline:
    """Pure ASGI middleware running ``policies`` (in order) in front of ``app``.

    ``paths`` (default: every path) and ``exclude`` choose where the policies run; other
    requests go straight to ``app``, so docs and health checks never eat a client's quota.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        policies: Sequence[Policy],
        store: Store,
        trusted_proxies: TrustedProxies | Iterable[str | IPNetwork] = (),
        route: str = "",
        body_timeout: float = 10.0,
        paths: Iterable[str] | None = None,
        exclude: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.paths = PathFilter(paths, exclude)
        self.policies = tuple(policies)
        self.store = store
        self.trusted = trusted_proxies if isinstance(trusted_proxies, TrustedProxies) else TrustedProxies(
            trusted_proxies
        )
        self.route = route
        self.body_timeout = body_timeout
        self._request_body_limit = max((policy.request_body_limit for policy in self.policies), default=0)
        self._body_limit = max((policy.response_body_limit for policy in self.policies), default=0)
        self._respond = tuple(i for i, policy in enumerate(self.policies) if policy.wants_respond)
        self._finishing = tuple(i for i, policy in enumerate(self.policies) if policy.wants_finish)
        self._track = bool(self._respond or self._finishing)
        self._background: set[asyncio.Task[None]] = set()
        self._store_failures = Throttled()
        # answer_now applies: one policy that decides from memory (with more, an answer also runs the others'
        # finish), reading no body, on every path
        self.memory_only = len(self.policies) == 1 and self.policies[0].decides_from_memory and \
            not self._request_body_limit and not self.paths

    def answer_now(self, ctx: RequestContext) -> Answer | None:
        """The answer when every policy decides from memory alone (a hot cache entry), computed without
        awaiting; None: nothing was decided, changed or counted, and the request runs through ``__call__``.

        The server calls this to write such an answer straight from the connection's protocol, with no
        ASGI task (edgeway serve's cache-hit fast path); the answer is the one ``__call__`` would send.
        """
        if not self.memory_only:
            return None
        policy = self.policies[0]
        prepared = policy.prepare(ctx)
        if not isinstance(prepared, Prepared) or prepared.commands:
            return None
        answer = policy.decide(ctx, prepared, ())
        if isinstance(answer, Pending):  # the contract says it cannot; never leave an awaitable behind
            close = getattr(answer.awaitable, "close", None)
            if close is not None:
                close()
            return None
        if answer is not None and ctx.response_headers:
            return with_headers(answer, ctx.response_headers)
        return answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.paths and not self.paths.applies(scope["path"])):
            await self.app(scope, receive, send)
            return
        ctx = scope.get(SCOPE_KEY)
        made = ctx is None  # in an app: this pipeline makes the request's context and unlinks it at the end
        if ctx is None:
            ctx = scope[SCOPE_KEY] = RequestContext(scope, self.trusted, self.route)
        elif self.route and not ctx.route:
            ctx.route = self.route
        try:
            if self._request_body_limit and ctx.has_body:
                replay, refusal = await self._read_body(ctx, receive)
                if refusal is not None:
                    await self._answer(refusal, ctx, scope, receive, send)
                    return
                if replay is None:
                    return
                receive = replay
            prepared: list[Prepared] = []
            batch: list[Command] = []
            for policy in self.policies:
                step = policy.prepare(ctx)
                outcome = await step.awaitable if isinstance(step, Pending) else step
                if not isinstance(outcome, Prepared):
                    if outcome is not None:
                        await self._answer(outcome, ctx, scope, receive, send)
                        return
                    outcome = Prepared()
                prepared.append(outcome)
                batch.extend(outcome.commands)

            answer = await self._decide(ctx, prepared, batch)
            if answer is not None:
                try:
                    await self._answer(answer, ctx, scope, receive, send)
                finally:
                    if self._track and len(self.policies) > 1:
                        # the app never ran: a policy that decided before the answering one may hold something
                        # to release (the cache's fill lock when the breaker answers)
                        self._finish(ctx, prepared, Completed(0, (), None, complete=False))
                return

            await self._call_app(ctx, prepared, scope, receive, send)
        finally:
            if made:  # the scope and its context point at each other: unlinked, both are freed by refcount
                scope.pop(SCOPE_KEY, None)  # as soon as the server drops the scope, not by the cyclic collector

    async def _read_body(self, ctx: RequestContext, receive: Receive) -> tuple[Receive | None, Answer | None]:
        """Read the body once, up to the policies' limit: a ``receive`` that replays it, or a refusal.

        The refusal is a 408 when the client stalls; both are None when it left.
        """
        limit = self._request_body_limit
        chunks: list[bytes] = []
        size = 0
        more = True
        try:
            async with asyncio.timeout(self.body_timeout):
                while more and size <= limit:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None, None
                    chunk = message.get("body", b"")
                    chunks.append(chunk)
                    size += len(chunk)
                    more = message.get("more_body", False)
        except TimeoutError:
            return None, ErrorResponse(408, "request_timeout",
                                       f"the request body did not arrive within {self.body_timeout:g}s",
                                       headers=[(b"connection", b"close")])
        data = b"".join(chunks)
        if more or size > limit:
            ctx.body_too_large = True
        else:
            ctx.body = data
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": data, "more_body": more}

        return replay, None

    async def _decide(self, ctx: RequestContext, prepared: list[Prepared], batch: list[Command]) -> Answer | None:
        if batch:
            try:
                results = await self.store.execute(batch)
            except StoreError as error:
                self._store_failures.warning("store %s failed: %s", self.store.describe(), error)
                for policy, prep in zip(self.policies, prepared, strict=True):
                    answer = await _settled(policy.store_failed(ctx, prep, error))
                    if answer is not None:
                        return answer
                return None
        else:
            results = []
        offset = 0
        for policy, prep in zip(self.policies, prepared, strict=True):
            count = len(prep.commands)
            own = results[offset : offset + count] if count else ()
            offset += count
            refused = None
            for result in own:
                if type(result) is CommandError:
                    refused = result
                    break
            if refused is not None:  # this request's error, not an outage: the policy's failure mode decides
                self._store_failures.warning("store %s refused a command: %s", self.store.describe(), refused)
                outcome = policy.store_failed(ctx, prep, refused)
            else:
                outcome = policy.decide(ctx, prep, own)
            if outcome is not None:  # (awaited only when it waits: a coroutine per policy costs on every request)
                answer = await _settled(outcome) if isinstance(outcome, Pending) else outcome
                if answer is not None:
                    return answer
        return None

    async def _answer(self, response: Answer, ctx: RequestContext, scope: Scope, receive: Receive,
                      send: Send) -> None:
        if ctx.response_headers:
            response = with_headers(response, ctx.response_headers)
        await response(scope, receive, send)

    async def _call_app(self, ctx: RequestContext, prepared: list[Prepared], scope: Scope, receive: Receive,
                        send: Send) -> None:
        extra = ctx.response_headers
        if not self._track:
            if not extra:
                await self.app(scope, receive, send)
                return

            def send_adding_headers(message: Message) -> Awaitable[None]:  # send's own awaitable: no extra level
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", ()), *extra]
                return send(message)

            await self.app(scope, receive, send_adding_headers)
            return
        tracked = _Tracked(self, ctx, prepared, scope, receive, send)
        try:
            await self.app(scope, receive, tracked.send)
        finally:
            self._finish(ctx, prepared, tracked.completed())

    def _finish(self, ctx: RequestContext, prepared: list[Prepared], response: Completed) -> None:
        writes: list[Command] | None = None  # (made only when there is something to write: rarely)
        shares: list[tuple[Policy, Prepared, int]] = []
        policies = self.policies
        for index in self._finishing:
            policy, prep = policies[index], prepared[index]
            mine = policy.finish(ctx, prep, response)
            if mine:
                writes = [*writes, *mine] if writes else list(mine)
                shares.append((policy, prep, len(mine)))
        if ctx.deferred:
            writes = [*writes, *ctx.deferred] if writes else ctx.deferred
            ctx.deferred = None
        if writes:
            self._write_soon(writes, ctx, shares)

    def _write_soon(self, writes: list[Command], ctx: RequestContext | None = None,
                    shares: Sequence[tuple[Policy, Prepared, int]] = ()) -> None:
        """Send ``writes`` in the background, off the request's critical path; ``shares``: whose they are
        (policy, its prepared state, how many of the first commands), told what came of them."""
        task = asyncio.get_running_loop().create_task(self._write(writes, ctx, shares))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _write(self, writes: list[Command], ctx: RequestContext | None,
                     shares: Sequence[tuple[Policy, Prepared, int]]) -> None:
        try:
            results = await self.store.execute(writes)
        except StoreError as error:
            self._store_failures.warning("deferred store write to %s failed: %s", self.store.describe(), error)
            if ctx is not None:
                for policy, prep, _ in shares:
                    policy.written(ctx, prep, error)
            return
        refused = next((r for r in results if type(r) is CommandError), None)
        if refused is not None:
            self._store_failures.warning("store %s refused a deferred write: %s", self.store.describe(), refused)
        if ctx is not None:
            offset = 0
            for policy, prep, count in shares:
                policy.written(ctx, prep, results[offset : offset + count])
                offset += count


async def _dropped() -> None:
    """What sending a replaced response's own body amounts to: nothing."""


async def _settled(outcome: Answer | Pending | None) -> Answer | None:
    """A decision, once any wait it asked for is over."""
    if isinstance(outcome, Pending):
        result = await outcome.awaitable
        return None if result is None or isinstance(result, Prepared) else result
    return outcome


class _Tracked(Completed):
    """One response watched for the policies, and what they see of it in ``finish``: headers added,
    ``respond`` hooks, body kept up to the limit. It is its own :class:`Completed` (no second object)."""

    __slots__ = ("ctx", "limit", "pipeline", "prepared", "receive", "replaced", "scope", "size", "started",
                 "upstream_send")

    def __init__(self, pipeline: PolicyPipeline, ctx: RequestContext, prepared: list[Prepared], scope: Scope,
                 receive: Receive, send: Send) -> None:
        # Completed's fields, set here rather than through its __init__ (one call less per request)
        self.status = 0
        self.headers = ()
        self.limit = limit = pipeline._body_limit
        self.chunks = [] if limit else None
        self.complete = False
        self.elapsed = 0.0
        self.pipeline = pipeline
        self.ctx = ctx
        self.prepared = prepared
        self.scope = scope
        self.receive = receive
        self.upstream_send = send
        self.size = 0
        self.replaced = False
        self.started = time.monotonic()

    def send(self, message: Message) -> Awaitable[None]:
        """Watch one message on its way; returns the server's own awaitable (no coroutine level of its own)
        unless a policy's answer replaces the response."""
        kind = message["type"]
        if kind == "http.response.body":
            if not message.get("more_body", False):
                self.complete = True  # the app handed over its whole response
            if self.chunks is not None or self.replaced:
                return self._body(message)
            return self.upstream_send(message)
        if kind == "http.response.start":
            self.elapsed = time.monotonic() - self.started
            extra = self.ctx.response_headers
            if extra:
                message["headers"] = [*message.get("headers", ()), *extra]
            self.status = message["status"]
            self.headers = message.get("headers", ())
            if self.pipeline._respond or self.ctx.deferred:
                return self._respond(message)
        return self.upstream_send(message)

    def _body(self, message: Message) -> Awaitable[None]:
        if self.replaced:
            return _dropped()
        chunks = self.chunks
        if chunks is not None:
            body = message.get("body", b"")
            self.size += len(body)
            if self.size <= self.limit:
                if body:
                    chunks.append(body)
            else:
                self.chunks = None
        return self.upstream_send(message)

    def _respond(self, message: Message) -> Awaitable[None]:
        """The response start, past the policies' ``respond`` hooks; then their deferred writes go."""
        pipeline = self.pipeline
        if pipeline._respond:
            policies = pipeline.policies
            for index in pipeline._respond:
                answer = policies[index].respond(self.ctx, self.prepared[index], message)
                if answer is not None:
                    # the policy answers instead (a stale entry for a 502); the app's own body is dropped
                    self.replaced = True
                    self.chunks = None
                    return answer(self.scope, self.receive, self.upstream_send)
            self.headers = message.get("headers", ())  # a respond hook may have replaced the list
        if self.ctx.deferred:
            pipeline._write_soon(self.ctx.deferred)
            self.ctx.deferred = None
        return self.upstream_send(message)

    def completed(self) -> Completed:
        """The response as it ended (``complete`` False and no body when cut short)."""
        if not self.status:
            self.elapsed = time.monotonic() - self.started
            self.chunks = None
        elif not self.complete:
            self.chunks = None
        return self
