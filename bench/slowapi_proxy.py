"""The comparison point: the ``baseline`` Starlette proxy guarded by slowapi, two limits on Redis.

The same Starlette app as ``baseline_proxy.starlette_app`` (one catch-all
route, the same :func:`~baseline_proxy.forward_endpoint`), rate limited the
way slowapi documents it: a :class:`slowapi.Limiter` keyed by remote
address, stored in Redis through the ``limits`` library,
``app.state.limiter``, the ``RateLimitExceeded`` exception handler and
``@limiter.limit(...)`` on the endpoint. (``SlowAPIMiddleware`` only applies
*default* limits and skips decorated routes, so it is left out.) The quotas
are the benchmark's two limits, high enough never to reject during a run.

slowapi's check is synchronous: ``limits``' sync ``redis://`` storage (the
default async Redis backend of ``limits`` does not work with slowapi), one
blocking round trip per limit on the event loop thread. Environment:
``UPSTREAM_URL`` and ``REDIS_URL``.
"""

from __future__ import annotations

import os

from baseline_proxy import METHODS, forward_endpoint, lifespan
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address
from starlette.applications import Starlette
from starlette.routing import Route

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
LIMITS = "1000000/minute;100000000/day"

limiter = Limiter(
    key_func=get_remote_address,
    storage_uri=REDIS_URL,
    storage_options={"socket_connect_timeout": 2, "socket_timeout": 2},  # type: ignore[dict-item]
)
proxy = limiter.limit(LIMITS)(forward_endpoint)  # checked by slowapi, then the baseline's forwarding

app = Starlette(
    routes=[Route("/{path:path}", proxy, methods=METHODS)],
    exception_handlers={RateLimitExceeded: _rate_limit_exceeded_handler},  # type: ignore[dict-item]
    lifespan=lifespan,
)
app.state.limiter = limiter
