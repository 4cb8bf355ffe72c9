"""Edgeway's policies as pure ASGI middleware, usable in any ASGI app.

``from edgeway.middleware import RateLimitMiddleware, Limit``, ``CircuitBreakerMiddleware``,
``CircuitBreaker`` (``async with breaker:`` around any call); stores come from
:func:`edgeway.middleware.store.open_store`.
"""

from __future__ import annotations

from .breaker import CircuitBreaker, CircuitOpen
from .breaker_config import BreakerSettings
from .breaker_policy import CircuitBreakerMiddleware
from .ratelimit import Limit, RateLimitMiddleware

__all__ = ["BreakerSettings", "CircuitBreaker", "CircuitBreakerMiddleware", "CircuitOpen", "Limit",
           "RateLimitMiddleware"]
