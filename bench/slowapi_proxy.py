"""The comparison point: the baseline forwarder guarded by slowapi, two limits on Redis.

A Starlette app with one catch-all route, rate limited the way slowapi
documents it: a :class:`slowapi.Limiter` keyed by remote address, stored in
Redis through the ``limits`` library, ``app.state.limiter``, the
``RateLimitExceeded`` exception handler and ``@limiter.limit(...)`` on the
endpoint. (``SlowAPIMiddleware`` only applies *default* limits and skips
decorated routes, so it is left out.) The quotas are the benchmark's two
limits, high enough never to reject during a run.

slowapi's check is synchronous: ``limits``' sync ``redis://`` storage (the
default async Redis backend of ``limits`` does not work with slowapi), one
blocking round trip per limit on the event loop thread. Environment:
``UPSTREAM_URL`` and ``REDIS_URL``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from baseline_proxy import close_session, forward
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
LIMITS = "1000000/minute;100000000/day"
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

limiter = Limiter(
    key_func=get_remote_address,
    storage_uri=REDIS_URL,
    storage_options={"socket_connect_timeout": 2, "socket_timeout": 2},  # type: ignore[dict-item]
)


class Forwarded(Response):
    """A response that is the baseline forwarder itself (so both proxies share one code path)."""

    def __init__(self) -> None:  # no body, headers or status of its own
        pass

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await forward(scope, receive, send)


@limiter.limit(LIMITS)
async def proxy(request: Request) -> Response:
    """Every path: checked by slowapi, then forwarded upstream."""
    return Forwarded()


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    yield
    await close_session()


app = Starlette(
    routes=[Route("/{path:path}", proxy, methods=METHODS)],
    exception_handlers={RateLimitExceeded: _rate_limit_exceeded_handler},  # type: ignore[dict-item]
    lifespan=lifespan,
)
app.state.limiter = limiter
