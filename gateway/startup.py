"""What ``edgeway serve`` says before it takes traffic: one readable block.

The policy file and version, where it listens, every store of the chain with whether it
answers right now, and every route with its policies, so an unreachable primary is seen
at once rather than as one WARNING among many.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from edgeway.middleware.store import StoreError

from .config import Route
from .loader import LoadedPolicy
from .stores import redis_enabled, store_chain

PING_TIMEOUT = 2.0  # seconds; a cold connection (TLS, DNS) needs more than the per-call store timeout


@dataclass(frozen=True)
class StoreReach:
    """One store of the chain and whether it answered a ping."""

    role: str
    location: str
    error: str | None

    @property
    def reachable(self) -> bool:
        return self.error is None


async def probe_stores(loaded: LoadedPolicy) -> list[StoreReach]:
    """Ping every store of the policy's chain once (fresh connections, closed afterwards)."""
    config = loaded.policy.store
    config = config.model_copy(update={"timeout": max(config.timeout, PING_TIMEOUT)})
    chain = store_chain(config)
    primary = redis_enabled(config)
    found = []
    for index, store in enumerate(chain):
        role = "primary" if index == 0 and primary else "fallback"
        try:
            await asyncio.wait_for(store.ping(), PING_TIMEOUT)
            error = None
        except (StoreError, TimeoutError) as exc:
            error = str(exc) or type(exc).__name__
        finally:
            await store.close()
        found.append(StoreReach(role, store.describe(), error))
    return found


def _route_line(route: Route) -> str:
    methods = ",".join(route.match.methods) if route.match.methods else "*"
    target = f" -> {route.upstream}" if route.upstream else ""
    limits = ", ".join(f"{limit.rate} by {'+'.join(limit.key)}" + (" (shadow)" if limit.mode == "shadow" else "")
                       for limit in route.limits)
    policies = f"limits {limits}" if limits else "no policies"
    return f"    {methods} {route.match.path}{target} [id {route.route_id}]: {policies}"


def startup_block(loaded: LoadedPolicy, stores: list[StoreReach], *, host: str, port: int, workers: int) -> str:
    """The block ``serve`` logs once before it starts."""
    policy = loaded.policy
    lines = [
        f"policy {loaded.source} (version {loaded.version}, name {policy.name})",
        f"  listening on http://{host}:{port} ({workers} worker{'s' if workers != 1 else ''})",
        f"  store chain (key prefix {policy.key_prefix}):",
    ]
    if not redis_enabled(policy.store):
        lines.append(f"    primary {policy.store.url.split('://')[0]}:// switched off (store.enabled / "
                     "EDGEWAY_REDIS_ENABLED)")
    for reach in stores:
        state = "reachable" if reach.reachable else f"UNREACHABLE: {reach.error}"
        lines.append(f"    {reach.role} {reach.location}: {state}")
    lines.append(f"  routes ({len(policy.routes)}):")
    lines.extend(_route_line(route) for route in policy.routes)
    return "\n".join(lines)
