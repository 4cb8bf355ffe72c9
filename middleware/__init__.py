"""Edgeway's policies as pure ASGI middleware, usable in any ASGI app.

``from edgeway.middleware import RateLimitMiddleware, Limit``; stores come from
:func:`edgeway.middleware.store.open_store`.
"""

from __future__ import annotations

from .ratelimit import Limit, RateLimitMiddleware
from .session import SessionMiddleware, SessionSettings, SessionUser, current_user, optional_user

__all__ = ["Limit", "RateLimitMiddleware", "SessionMiddleware", "SessionSettings", "SessionUser", "current_user",
           "optional_user"]
