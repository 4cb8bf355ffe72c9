"""Edgeway's policies as pure ASGI middleware, usable in any ASGI app.

``from edgeway.middleware import RateLimitMiddleware, Limit, CacheMiddleware``,
``CircuitBreakerMiddleware``, ``CircuitBreaker`` (``async with breaker:`` around any call); stores come from
:func:`edgeway.middleware.store.open_store`.
"""

from __future__ import annotations

from .breaker import CircuitBreaker, CircuitOpen
from .breaker_config import BreakerSettings
from .breaker_policy import CircuitBreakerMiddleware
from .cache import CacheMiddleware, CachePolicy
from .cache_settings import CacheSettings
from .ratelimit import Limit, RateLimitMiddleware
from .session import SessionMiddleware, SessionSettings, SessionUser, current_user, optional_user

__all__ = ["BreakerSettings", "CacheMiddleware", "CachePolicy", "CacheSettings", "CircuitBreaker",
           "CircuitBreakerMiddleware", "CircuitOpen", "Limit", "RateLimitMiddleware", "SessionMiddleware",
           "SessionSettings", "SessionUser", "current_user", "optional_user"]
