"""Edgeway's policies as pure ASGI middleware, usable in any ASGI app.

``from edgeway.middleware import RateLimitMiddleware, Limit, CacheMiddleware``; stores come from
:func:`edgeway.middleware.store.open_store`.
"""

from __future__ import annotations

from .cache import CacheMiddleware, CachePolicy
from .cache_settings import CacheSettings
from .ratelimit import Limit, RateLimitMiddleware

__all__ = ["CacheMiddleware", "CachePolicy", "CacheSettings", "Limit", "RateLimitMiddleware"]
