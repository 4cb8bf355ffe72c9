"""Streams one request to an upstream and its response back; nothing else.

aiohttp carries the hot path (measured in bench/RESULTS.md: httpx's own
transport reached a fraction of its throughput under concurrency). One pooled
session per upstream, created on first use inside the running loop, with:

- no cookie jar (one user's upstream ``Set-Cookie`` must never ride on the
  next user's request);
- no decompression (bytes pass through as sent, the client's own
  ``Accept-Encoding`` decides) and no auto-added request headers;
- redirects passed back, never followed.

Failures before the response starts become JSON errors: connect failure 502
``bad_gateway``, timeout 504 ``upstream_timeout``. After it starts, a failing
upstream aborts the client connection (the response is left incomplete), so a
truncated body never looks like a complete one. A client that disconnects
cancels the upstream request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from yarl import URL

from edgeway.middleware.breaker import CircuitBreaker
from edgeway.middleware.clientip import TrustedProxies
from edgeway.middleware.context import RequestContext, Scope
from edgeway.middleware.metrics import UPSTREAM_ERRORS
from edgeway.middleware.pipeline import Throttled
from edgeway.middleware.responses import ErrorResponse, Receive, Send

from .config import Upstream
from .headers import downstream_response_headers, request_has_body, upstream_request_headers
from .retry import Retrier

logger = logging.getLogger("edgeway.proxy")

WATCH_AFTER = 0.1  # seconds a request runs before its client's disconnects are watched (see _Watch)
_SKIP_AUTO = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


class _ClientGone(Exception):
    """The client disconnected while we were still reading its request body."""


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
        # the proxying task, captured here: arm() may run inside aiohttp's body-writer task
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
                 breaker: CircuitBreaker | None = None, clock: Callable[[], float] | None = None) -> None:
        self.name = name
        self.base = upstream.url
        self.upstream = upstream
        self.trusted = trusted
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=upstream.timeout.connect, sock_read=upstream.timeout.read
        )
        self._errors = Throttled()
        self._bad_gateway = UPSTREAM_ERRORS.labels(name, "bad_gateway")
        self._timeouts = UPSTREAM_ERRORS.labels(name, "upstream_timeout")
        retry = upstream.breaker.retry if upstream.breaker is not None else None
        self._retry = Retrier(retry, breaker, clock=clock or time.monotonic) \
            if retry is not None and breaker is not None else None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self.upstream.max_connections, ttl_dns_cache=60,
                                         enable_cleanup_closed=False)
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO,
            timeout=self._timeout,
        )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = RequestContext.of(scope, self.trusted)
        headers = upstream_request_headers(ctx)
        target = self.base + (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        watch = _Watch(receive)
        has_body = request_has_body(scope)
        retry = self._retry if self._retry is not None and self._retry.replayable(ctx, scope["method"], has_body) \
            else None
        if has_body and retry is None:
            body: Any = self._body(receive, watch)
        else:
            body = ctx.body  # None, or the whole body the pipeline read: sent again as is
            watch.arm()
        session = self._session or self._open()
        started = False
        attempt = 0
        try:
            while True:
                try:
                    async with session.request(
                        scope["method"], URL(target, encoded=True), headers=headers, data=body,
                        allow_redirects=False, compress=None, chunked=None,
                    ) as response:
                        if retry is not None and response.status in retry.statuses:
                            wait = retry.again(attempt)
                            if wait is not None:
                                attempt += 1
                                await asyncio.sleep(wait)
                                continue
                        await send({"type": "http.response.start", "status": response.status,
                                    "headers": downstream_response_headers(response.raw_headers)})
                        started = True
                        content = response.content
                        while True:
                            chunk = await content.readany()
                            if not chunk:
                                await send({"type": "http.response.body", "body": b"", "more_body": False})
                                break
                            last = content.at_eof()
                            await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                            if last:
                                break
                    return
                except (TimeoutError, aiohttp.ClientError, OSError):
                    wait = None if retry is None or started or watch.gone else retry.again(attempt)
                    if wait is None:
                        raise
                    attempt += 1
                    await asyncio.sleep(wait)
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            return  # the client left: the upstream request is cancelled with us
        except _ClientGone:
            return
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if watch.gone:
                return
            if started:
                self._errors.warning("upstream %s failed mid-response (%s): aborting the client response",
                                     self.name, _describe(exc))
                return  # leaving the response incomplete makes the server close the connection
            await self._failed(exc, scope, receive, send)
        finally:
            watch.stop()

    async def _body(self, receive: Receive, watch: _Watch) -> Any:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                watch.gone = True
                raise _ClientGone()
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            if not more:
                watch.arm()
            if chunk:
                yield chunk
            if not more:
                return

    async def _failed(self, exc: BaseException, scope: Scope, receive: Receive, send: Send) -> None:
        if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
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
