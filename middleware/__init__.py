"""Edgeway's policies as pure ASGI middleware, usable in any ASGI app.

``from edgeway.middleware import RateLimitMiddleware, Limit``; stores come from
:func:`edgeway.middleware.store.open_store`.
"""

from __future__ import annotations

from .ratelimit import Limit, RateLimitMiddleware

__all__ = ["Limit", "RateLimitMiddleware"]
