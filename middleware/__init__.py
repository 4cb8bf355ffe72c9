"""Edgeway's policies as pure ASGI middleware, usable in any ASGI app.

``from edgeway.middleware import RateLimitMiddleware, Limit, CacheMiddleware``; stores come from
:func:`edgeway.middleware.store.open_store`.
"""

from __future__ import annotations

from .cache import CacheMiddleware, CachePolicy
from .cache_settings import CacheSettings
from .ratelimit import Limit, RateLimitMiddleware
from .session import SessionMiddleware, SessionSettings, SessionUser, current_user, optional_user

__all__ = ["CacheMiddleware", "CachePolicy", "CacheSettings", "Limit", "RateLimitMiddleware", "SessionMiddleware",
           "SessionSettings", "SessionUser", "current_user", "optional_user"]
