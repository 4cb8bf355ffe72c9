"""Stores: one contract (:mod:`.base`), several backends chosen by URL scheme.

Backends are imported lazily so a deployment only loads what it uses.
"""

from __future__ import annotations

from .base import (
    Algorithm,
    BreakerEvent,
    BreakerResult,
    BreakerRule,
    BreakerUpdate,
    Clock,
    Command,
    CommandError,
    Delete,
    Get,
    Handler,
    Heartbeat,
    Incr,
    LimitCheck,
    LimitState,
    Publish,
    RateLimit,
    RateLimitResult,
    Set,
    Store,
    StoreConfigurationError,
    StoreError,
    StoreTimeout,
    Subscription,
)

__all__ = [
    "Algorithm",
    "BreakerEvent",
    "BreakerResult",
    "BreakerRule",
    "BreakerUpdate",
    "Clock",
    "Command",
    "CommandError",
    "Delete",
    "Get",
    "Handler",
    "Heartbeat",
    "Incr",
    "LimitCheck",
    "LimitState",
    "Publish",
    "RateLimit",
    "RateLimitResult",
    "Set",
    "Store",
    "StoreConfigurationError",
    "StoreError",
    "StoreTimeout",
    "Subscription",
    "open_store",
]

SCHEMES = ("memory", "redis", "rediss", "upstash+https", "upstash+http", "upstash")


def open_store(url: str, *, timeout: float | None = 0.05, clock: Clock | None = None) -> Store:
    """Build the store a URL names: ``memory://``, ``redis://``, ``rediss://`` or ``upstash+https://``."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "memory":
        from .memory import MemoryStore

        return MemoryStore(clock=clock)
    if scheme in ("redis", "rediss"):
        from .redis import RedisStore

        return RedisStore(url, timeout=timeout, clock=clock)
    if scheme in ("upstash+https", "upstash+http", "upstash"):
        from .upstash import UpstashStore

        return UpstashStore(None if scheme == "upstash" else url, timeout=timeout, clock=clock)
    if scheme in ("redis+sentinel", "redis+cluster"):
        raise StoreConfigurationError(
            f"{scheme}:// is not supported yet; point store.url at the current primary (redis://host:port) "
            "for now. Keys already use hash tags, so Cluster support needs no key migration."
        )
    raise StoreConfigurationError(
        f"unknown store URL {url!r}: use memory://, redis://, rediss:// or upstash+https://TOKEN@host"
    )
