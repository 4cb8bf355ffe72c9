"""Stores: one contract (:mod:`.base`), several backends chosen by URL scheme.

Backends are imported lazily so a deployment only loads what it uses.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import (
    CACHE_COMMANDS,
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
    IndexAdd,
    IndexPurge,
    LimitCheck,
    LimitState,
    Publish,
    RateLimit,
    RateLimitResult,
    Revoke,
    Revoked,
    Set,
    Store,
    StoreConfigurationError,
    StoreError,
    StoreTimeout,
    Subscription,
)

__all__ = [
    "CACHE_COMMANDS",
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
    "IndexAdd",
    "IndexPurge",
    "LimitCheck",
    "LimitState",
    "Publish",
    "RateLimit",
    "RateLimitResult",
    "Revoke",
    "Revoked",
    "Set",
    "Store",
    "StoreConfigurationError",
    "StoreError",
    "StoreTimeout",
    "Subscription",
    "connect_store",
    "open_store",
]

SCHEMES = ("memory", "redis", "rediss", "unix", "upstash+https", "upstash+http", "upstash")


def open_store(url: str, *, timeout: float | None = 0.05, clock: Clock | None = None,
               fallback: Sequence[Store] | None = None, key_prefix: str = "edgeway:") -> Store:
    """The store a URL names, with the same safety as a policy file's ``store:``.

    A shared store (Redis, Upstash) comes inside a
    :class:`~edgeway.middleware.store.failover.FailoverStore`: when it fails, ``fallback``
    takes over (default: an in-process memory store, so limits stay enforced; ``[]``:
    none, so each limit's ``on_store_failure`` decides) and it is used again once it
    answers. ``memory://`` is returned as it is.
    """
    primary = connect_store(url, timeout=timeout, clock=clock)
    if primary.kind == "memory":
        return primary
    from .failover import FailoverStore
    from .memory import MemoryStore

    fallbacks = [MemoryStore(clock=clock)] if fallback is None else list(fallback)
    return FailoverStore(primary, fallbacks, key_prefix=key_prefix)


def connect_store(url: str, *, timeout: float | None = 0.05, clock: Clock | None = None) -> Store:
    """The one backend a URL names, without failover: ``memory://``, ``redis://``, ``rediss://``,
    ``unix://`` or ``upstash+https://``."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "memory":
        from .memory import MemoryStore

        return MemoryStore(clock=clock)
    if scheme in ("redis", "rediss", "unix"):
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
        f"unknown store URL {url!r}: use memory://, redis://, rediss://, unix:// or upstash+https://TOKEN@host"
    )
