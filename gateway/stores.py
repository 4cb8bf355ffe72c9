"""Assemble the store chain a policy's ``store:`` section describes.

``url`` is the primary; ``fallback`` lists what takes over, in order, when it
fails (absent: ``[memory]``; ``[]``: nothing, so each limit's
``on_store_failure`` decides). Anything but a lone ``memory://`` is wrapped in
a :class:`~edgeway.middleware.store.failover.FailoverStore` for health tracking and
automatic return.
"""

from __future__ import annotations

import os

from edgeway.middleware.store import Clock, Store, StoreConfigurationError, connect_store
from edgeway.middleware.store.failover import FailoverStore
from edgeway.middleware.store.memory import MemoryStore

from .config import FallbackEntry, StoreConfig


def redis_enabled(config: StoreConfig) -> bool:
    """The kill switch: ``store.enabled: false`` or ``EDGEWAY_REDIS_ENABLED=false`` skips the primary."""
    flag = os.environ.get("EDGEWAY_REDIS_ENABLED", "").strip().lower()
    return config.enabled and flag not in ("0", "false", "no", "off")


def _fallback(entry: FallbackEntry, config: StoreConfig, clock: Clock | None) -> Store:
    if entry.supabase is not None:
        from edgeway.middleware.store.postgres import SupabaseStore

        return SupabaseStore(entry.supabase.url, entry.supabase.key, timeout=config.timeout, clock=clock)
    if entry.postgres is not None:
        from edgeway.middleware.store.postgres import PostgresStore

        return PostgresStore(entry.postgres.dsn, timeout=config.timeout, clock=clock)
    if entry.memory:
        return MemoryStore(clock=clock)
    raise StoreConfigurationError("a fallback entry must be memory, {supabase: {...}} or {postgres: {...}}")


def store_chain(config: StoreConfig, clock: Clock | None = None) -> list[Store]:
    """The stores ``store:`` names, in the order they are tried (primary first unless switched off)."""
    entries = config.fallback if config.fallback is not None else (FallbackEntry(memory=True),)
    fallbacks = [_fallback(entry, config, clock) for entry in entries]
    if redis_enabled(config):
        return [connect_store(config.url, timeout=config.timeout, clock=clock), *fallbacks]
    return fallbacks or [MemoryStore(clock=clock)]


def build_store(config: StoreConfig, clock: Clock | None = None, *, key_prefix: str | None = None) -> Store:
    """The primary store with its fallbacks, as the policy describes (see the module docstring).

    ``key_prefix`` (the policy's, with its ``name``) names the heartbeat set; default ``store.key_prefix``.
    """
    if config.url.lower().startswith("memory://"):
        return MemoryStore(clock=clock)
    chain = store_chain(config, clock)
    if len(chain) == 1 and isinstance(chain[0], MemoryStore):
        return chain[0]
    budget = None
    if config.budget is not None and redis_enabled(config):
        from edgeway.middleware.store.budget import CommandBudget

        budget = CommandBudget(config.budget, on_exhausted=config.on_budget_exhausted, key_prefix=config.key_prefix,
                               store=chain[0].kind, clock=clock)
    return FailoverStore(
        chain[0], chain[1:], budget=budget,
        failures=config.failures, window=config.failure_window, probe_initial=config.probe_interval,
        instances=config.instances, min_instances=config.min_instances,
        key_prefix=config.key_prefix if key_prefix is None else key_prefix,
    )
