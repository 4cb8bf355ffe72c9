"""Streams one request to an upstream and its response back; nothing else.

The exchange itself is Edgeway's own HTTP/1.1 client (:mod:`.upstream`): one
keep-alive pool per upstream, the request head written from the client's
header bytes, the response's raw header pairs and body chunks passed on as
they arrive. Nothing is added (no ``User-Agent``, ``Accept-Encoding``), nothing
is decompressed (the client's own ``Accept-Encoding`` decides), no cookie is
kept between requests, and redirects are passed back, never followed.

Request bodies up to ``server.request_buffer`` (64 KiB) are read whole
before a pooled connection is taken, so a client that stalls mid-upload never
holds one (nginx's ``proxy_request_buffering``); larger ones stream. Every read
of a body waits at most ``client_body_timeout`` (then 408), bodies past
``max_request_body`` get 413, and a request that finds all ``max_connections``
busy waits at most ``timeout.pool`` behind at most ``max_pending`` others
(then 503 ``upstream_overloaded``, as Envoy does). Requests without a body
pay for none of this.

Failures before the response starts become JSON errors: connect failure 502
``bad_gateway``, timeout 504 ``upstream_timeout``. After it starts, a failing
upstream aborts the client connection (the response is left incomplete), so a
truncated body never looks like a complete one. A client that disconnects
cancels the upstream request (its connection is closed, never pooled).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from edgeway.middleware.breaker import CircuitBreaker
from edgeway.middleware.clientip import TrustedProxies
from edgeway.middleware.context import RequestContext, Scope
from edgeway.middleware.metrics import DROPPED_HEADERS, UPSTREAM_ERRORS, UPSTREAM_SECONDS, timings
from edgeway.middleware.pipeline import Throttled
from edgeway.middleware.responses import ErrorResponse, Receive, Send

from .config import ServerConfig, Upstream
from .headers import downstream_response_headers, request_body_length, upstream_request_headers
from .retry import Retrier
from .upstream import Pool, Response, UpstreamError, UpstreamTimeout

logger = logging.getLogger("edgeway.proxy")

WATCH_AFTER = 0.1  # seconds a request runs before its client's disconnects are watched (see _Watch)

_CLOSE = ((b"connection", b"close"),)  # the rest of an unread body must not be parsed as a next request


class _ClientGone(Exception):
    """The client disconnected while we were still reading its request body."""


class _BodyRefused(Exception):
    """The request body can't be forwarded: it stalled (408) or grew past max_request_body (413)."""

    def __init__(self, response: ErrorResponse) -> None:
        super().__init__(response.status)
        self.response = response


def _too_large(limit: int) -> _BodyRefused:
    return _BodyRefused(ErrorResponse(413, "request_too_large", f"the request body is over {limit} bytes",
                                      extra={"limit": limit}, headers=_CLOSE))


class _Body:
    """One request body's reading state, shared by the buffering read and the streaming generator."""

    __slots__ = ("refused", "size")

    def __init__(self) -> None:
        self.size = 0
        self.refused: _BodyRefused | None = None


class _Watch:
    """Cancels the proxying task when the client disconnects (uvicorn's send() ignores a gone client).

    Watching needs a task blocked in ``receive()``; a task per request costs
    ~10% of the proxy's throughput, so it starts only once a request has run
    for ``WATCH_AFTER`` seconds: fast requests never pay for it, and a slow one
    (an AI call, a long stream) is cancelled at most that long after its client left.
    """

    __slots__ = ("done", "gone", "handle", "receive", "task", "victim")

    def __init__(self, receive: Receive) -> None:
        self.gone = False
        self.done = False
        self.receive = receive
        self.task: asyncio.Task[None] | None = None
        self.handle: asyncio.TimerHandle | None = None
        # the proxying task, captured here: arm() may run inside the upstream client's body-writer task
        # (the request body generator), which is not the task to cancel
        victim = asyncio.current_task()
        assert victim is not None
        self.victim = victim

    def arm(self) -> None:
        """Start watching soon, once the request body has been read."""
        if not self.done:
            self.handle = asyncio.get_running_loop().call_later(WATCH_AFTER, self._start)

    def _start(self) -> None:
        self.handle = None
        if not self.done:
            self.task = asyncio.get_running_loop().create_task(self._wait())

    async def _wait(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                if not self.done:
                    self.gone = True
                    self.victim.cancel()
                return

    def stop(self) -> None:
        self.done = True
        if self.handle is not None:
            self.handle.cancel()
        if self.task is not None:
            self.task.cancel()


class UpstreamProxy:
    """An ASGI app forwarding every request to one upstream."""

    def __init__(self, name: str, upstream: Upstream, trusted: TrustedProxies,
                 server: ServerConfig | None = None, breaker: CircuitBreaker | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        server = server or ServerConfig()
        self.name = name
        self.base = upstream.url
        self.upstream = upstream
        self.trusted = trusted
        self._pool: Pool | None = None
        # one slot per pooled connection, taken before a connection: waiting for a slot is bounded (pool
        # timeout, max_pending), and the pool never waits
        self._slots = asyncio.Semaphore(upstream.max_connections)
        self._waiting = 0
        self._buffer = server.request_buffer
        self._max_body = server.max_request_body
        self._body_timeout = server.client_body_timeout
        self._drop_underscores = server.headers_with_underscores == "drop"
        self._dropped = DROPPED_HEADERS.labels("underscore")
        self._errors = Throttled()
        self._bad_gateway = UPSTREAM_ERRORS.labels(name, "bad_gateway")
        self._timeouts = UPSTREAM_ERRORS.labels(name, "upstream_timeout")
        self._latency = timings(UPSTREAM_SECONDS.labels(name))
        retry = upstream.breaker.retry if upstream.breaker is not None else None
        self._retry = Retrier(retry, breaker, clock=clock or time.monotonic) \
            if retry is not None and breaker is not None else None

    def _open(self) -> Pool:
        timeout = self.upstream.timeout
        self._pool = Pool(self.base, connect_timeout=timeout.connect, read_timeout=timeout.read)
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = RequestContext.of(scope, self.trusted)
        headers, dropped = upstream_request_headers(ctx, drop_underscores=self._drop_underscores)
        if dropped:
            self._dropped.inc(dropped)
        target: bytes = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        watch = _Watch(receive)
        length = request_body_length(scope)
        state: _Body | None = None
        body: bytes | AsyncIterator[bytes] | None = None
        if length == 0:
            watch.arm()
        else:
            state = _Body()
            try:
                if length is not None and length > self._max_body:
                    raise _too_large(self._max_body)
                head, complete = await self._buffered(receive, watch, state)
            except _ClientGone:
                return
            except _BodyRefused as refused:
                await refused.response(scope, receive, send)
                return
            body = head if complete else self._stream(head, receive, watch, state)
        if not self._slots.locked():
            await self._slots.acquire()  # immediate: a slot is free
        elif not await self._wait_for_slot():
            await self._overloaded(scope, receive, send, close=length != 0)
            watch.stop()
            return
        pool = self._pool or self._open()
        method: str = scope["method"]
        response: Response | None = None
        started = False
        ctx.upstream = self.name
        sent_at = time.perf_counter()
        try:
            if self._retry is not None and self._retry.replayable(ctx, method, body):
                response = await self._retry.send(pool, method, target, headers, body, lambda: watch.gone)
            else:
                response = await pool.request(method, target, headers, body, length=length)
            ctx.upstream_seconds = waited = time.perf_counter() - sent_at
            self._latency.observe(waited)
            await send({"type": "http.response.start", "status": response.status,
                        "headers": downstream_response_headers(response.headers)})
            started = True
            while True:
                chunk = await response.read()
                if not chunk:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    break
                last = response.done
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                if last:
                    break
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            return  # the client left: the upstream connection is closed with us
        except UpstreamError as exc:
            if watch.gone:
                return
            if state is not None and state.refused is not None:  # the body stream failed in the client's writer
                if not started:
                    await state.refused.response(scope, receive, send)
                return
            if started:
                self._errors.warning("upstream %s failed mid-response (%s): aborting the client response",
                                     self.name, _describe(exc))
                return  # leaving the response incomplete makes the server close the connection
            await self._failed(exc, scope, receive, send)
        finally:
            if response is not None:
                response.release()
            self._slots.release()
            watch.stop()

    async def _wait_for_slot(self) -> bool:
        """Wait for a free connection slot, bounded by max_pending and the pool timeout; False when refused."""
        if self._waiting >= self.upstream.max_pending:
            return False
        self._waiting += 1
        try:
            async with asyncio.timeout(self.upstream.timeout.pool):
                await self._slots.acquire()
        except TimeoutError:
            return False
        finally:
            self._waiting -= 1
        return True

    async def _overloaded(self, scope: Scope, receive: Receive, send: Send, *, close: bool) -> None:
        UPSTREAM_ERRORS.labels(self.name, "upstream_overloaded").inc()
        self._errors.warning("upstream %s: all %d connections busy and the wait bounded: answering 503",
                             self.name, self.upstream.max_connections)
        await ErrorResponse(503, "upstream_overloaded", f"upstream {self.name} is overloaded",
                            extra={"upstream": self.name},
                            headers=[(b"retry-after", b"1"), *(_CLOSE if close else ())])(scope, receive, send)

    async def _next(self, receive: Receive, watch: _Watch, state: _Body) -> tuple[bytes, bool]:
        """The next piece of the request body, waiting at most client_body_timeout; checks max_request_body."""
        try:
            async with asyncio.timeout(self._body_timeout):
                message = await receive()
        except TimeoutError:
            state.refused = _BodyRefused(ErrorResponse(
                408, "request_timeout", f"no request body data for {self._body_timeout:g}s", headers=_CLOSE))
            raise state.refused from None
        if message["type"] == "http.disconnect":
            watch.gone = True
            raise _ClientGone()
        chunk: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        state.size += len(chunk)
        if state.size > self._max_body:
            state.refused = _too_large(self._max_body)
            raise state.refused
        if not more:
            watch.arm()
        return chunk, more

    async def _buffered(self, receive: Receive, watch: _Watch, state: _Body) -> tuple[bytes, bool]:
        """Read up to request_buffer bytes of the body; (bytes, whether that was all of it)."""
        chunk, more = await self._next(receive, watch, state)
        if not more or len(chunk) >= self._buffer:
            return chunk, not more
        parts = [chunk]
        while more and state.size < self._buffer:
            chunk, more = await self._next(receive, watch, state)
            parts.append(chunk)
        return b"".join(parts), not more

    async def _stream(self, head: bytes, receive: Receive, watch: _Watch, state: _Body) -> AsyncIterator[bytes]:
        yield head
        more = True
        while more:
            chunk, more = await self._next(receive, watch, state)
            if chunk:
                yield chunk

    async def _failed(self, exc: BaseException, scope: Scope, receive: Receive, send: Send) -> None:
        if isinstance(exc, UpstreamTimeout):
            self._timeouts.inc()
            self._errors.warning("upstream %s timed out: %s", self.name, _describe(exc))
            response = ErrorResponse(504, "upstream_timeout", f"upstream {self.name} did not answer in time",
                                     extra={"upstream": self.name})
        else:
            self._bad_gateway.inc()
            self._errors.warning("upstream %s failed: %s", self.name, _describe(exc))
            response = ErrorResponse(502, "bad_gateway", f"could not reach upstream {self.name}",
                                     extra={"upstream": self.name})
        await response(scope, receive, send)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
