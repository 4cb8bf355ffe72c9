"""Failover: the primary store with health tracking, then the fallbacks, and back by itself.

Commands come in two kinds, which fall back differently:

- shared state that must hold across instances (``RateLimit``, ``Heartbeat``,
  ``BreakerUpdate``) goes to the first healthy store of the chain: the
  primary (Redis), then each fallback in order (Supabase/Postgres, then memory);
- per-instance caches (``Get``/``Set``/``Delete``/``Incr``/``IndexAdd``/``IndexPurge``, locks included:
  response and session cache) go to the primary while it is healthy, else to
  memory: a cache miss is acceptable, an error is not.

Notifications: ``Publish`` travels like shared state (the current mode's store,
then along the chain); :meth:`FailoverStore.subscribe` subscribes to every store
of the chain that carries notifications, so a message published while the
chain runs on a fallback still reaches every instance.

Health is counted per kind of work: ``write`` (any batch that writes:
limits, heartbeats, cache fills) and ``read`` (batches of cache reads only). A
server that answers reads but cannot write (a read-only replica, ``OOM`` under
``noeviction``) fails writes while reads succeed: the successful reads do not
hide it. ``failures`` consecutive failures of one kind within ``window``
seconds mark the store down; calls then skip it without paying its timeout, and
a background probe (exponential backoff with jitter, never faster than
``MIN_PROBE_INTERVAL``) does the work that failed — a real write of a
short-lived probe key, or a PING for reads — until it succeeds, when the store
is used again. A per-command error (:class:`~.base.CommandError`) is a result,
not a failure: it never marks a store down and is never re-run on a fallback.

The mode (``kind``, readyz, ``edgeway_store_mode``) and each store's
``edgeway_store_up`` follow health, changing when a store is marked down or
comes back, not when a request happens to use a store.

Honest degraded limits: while rate limits run on memory (no shared store
left), every instance enforces ``quota // live_instances`` (at least 1), where
the instance count comes from the heartbeats instances keep in the last shared
store that worked (every 5 s, live for 15 s), or from a static ``instances``
override, never below ``min_instances``. N instances on memory therefore admit
about the limit in total, not N times it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..metrics import LIVE_INSTANCES, STORE_FALLBACKS, STORE_MODE, STORE_MODE_CHANGES, STORE_UP
from .base import (
    CACHE_COMMANDS,
    Command,
    CommandError,
    Get,
    Handler,
    Heartbeat,
    LimitCheck,
    Publish,
    RateLimit,
    Revoke,
    Revoked,
    Set,
    Store,
    StoreError,
    Subscription,
)
from .budget import CommandBudget
from .memory import MemoryStore
from .metering import StoreMeter
from .notify import stop

logger = logging.getLogger("edgeway.store")

HEARTBEAT_EVERY = 5.0
HEARTBEAT_TTL_MS = 15_000
MIN_PROBE_INTERVAL = 0.05  # seconds; the schema's floor for store.probe_interval too
PROBE_KEY_TTL_MS = 1_000
WRITE, READ = "write", "read"
"""The kinds of work whose health is counted apart."""


def work_kind(commands: Sequence[Command]) -> str:
    """``read`` for a batch that stores nothing (cache reads, notifications: a replica serves them), else ``write``."""
    return READ if all(type(command) is Get or type(command) is Publish for command in commands) else WRITE


@dataclass
class _Health:
    """Health of one kind of work on one store."""

    healthy: bool = True
    failures: int = 0
    first_failure: float = 0.0


@dataclass
class _Member:
    """A store in the chain with its health per kind of work."""

    store: Store
    shared: bool  # False for the memory store: its state is per instance
    health: dict[str, _Health] = field(default_factory=lambda: {WRITE: _Health(), READ: _Health()})
    probing: bool = False
    missed: list[Command] = field(default_factory=list)  # revocations it did not take: replayed on recovery
    meter: StoreMeter = field(init=False)
    healthy: bool = True
    """Every kind of work healthy: kept in step with ``health`` by :meth:`recount` (read on every call)."""

    def __post_init__(self) -> None:
        self.meter = StoreMeter(self.store)

    def recount(self) -> None:
        self.healthy = all(health.healthy for health in self.health.values())

    def failing(self) -> list[str]:
        return [kind for kind, health in self.health.items() if not health.healthy]


class FailoverStore(Store):
    """A chain of stores behaving as one; ``kind`` is the mode currently serving shared state."""

    def __init__(
        self,
        primary: Store,
        fallbacks: Sequence[Store] = (),
        *,
        failures: int = 3,
        window: float = 10.0,
        probe_initial: float = 0.5,
        probe_max: float = 15.0,
        instances: int | None = None,
        min_instances: int = 1,
        key_prefix: str = "edgeway:",
        instance_id: str | None = None,
        heartbeat_every: float = HEARTBEAT_EVERY,
        budget: CommandBudget | None = None,
    ) -> None:
        chain = [primary, *fallbacks]
        self._members = [_Member(store, shared=not isinstance(store, MemoryStore)) for store in chain]
        memory = [m.store for m in self._members if isinstance(m.store, MemoryStore)]
        cache = memory[0] if memory else MemoryStore()  # where caches go when the primary is down
        self._cache = next((m.meter for m in self._members if m.store is cache), None) or StoreMeter(cache)
        self._failures = failures
        self._window = window
        self._probe_initial = max(probe_initial, MIN_PROBE_INTERVAL)
        self._probe_max = probe_max
        self._instances = instances
        self._min_instances = max(1, min_instances)
        self._live = self._min_instances
        self._heartbeat_key = f"{key_prefix}instances"
        self._heartbeat_every = heartbeat_every
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self._tasks: set[asyncio.Task[None]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._probe_key = f"{key_prefix}probe:{self.instance_id}"
        self._mode = primary.kind
        self.budget = budget
        """``store.budget`` of the primary, when set."""
        self._diverted = False  # the budget keeps the primary out of use (on_budget_exhausted: fallback)
        STORE_MODE.labels(self._mode).set(1)
        self._refresh()

    # -- what readyz and metrics show ------------------------------------------

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self._mode

    @property
    def live_instances(self) -> int:
        """The instance count degraded limits divide by."""
        if self._instances is not None:
            return max(self._instances, self._min_instances)
        return max(self._live, self._min_instances)

    def describe(self) -> str:
        return " -> ".join(m.store.describe() + ("" if m.healthy else " (down)") for m in self._members)

    def status(self) -> list[dict[str, object]]:
        """Each store of the chain with its health (and the kinds of work failing on it), for readyz."""
        return [{"kind": m.store.kind, "location": m.store.describe(), "healthy": m.healthy, "failing": m.failing()}
                for m in self._members]

    # -- the contract -----------------------------------------------------------

    async def start(self) -> None:
        """Start heartbeating now (application startup), so peers count this instance before it serves."""
        self._start_heartbeat()

    async def execute(self, commands: Sequence[Command], *, timeout: float | None = None) -> list[object]:
        self._start_heartbeat()
        if self.budget is not None and self.budget.diverting != self._diverted:  # exhausted, or a new month
            self._diverted = not self._diverted
            self._refresh()
        if commands and isinstance(commands[0], Revoke):
            return await self._everywhere(commands, timeout)
        shared: list[int] = []  # which commands are shared state: worked out only once the primary is passed
        for position, member in enumerate(self._members):
            if not member.healthy or (position == 0 and self._diverted):
                continue
            if not member.shared:  # memory, the last resort: per instance, limits divided by live instances
                results = await member.meter.run(self._degrade(commands), timeout)
                if position > 0:  # revocations live in the shared stores: this instance's memory cannot know
                    results = [None if isinstance(c, Revoked) else r for c, r in zip(commands, results, strict=True)]
                return results
            if position > 0:
                shared = shared or [i for i, c in enumerate(commands) if not isinstance(c, CACHE_COMMANDS)]
                if not shared:  # only caches: memory, without bothering the fallback
                    return await self._cache.run(commands, timeout)
            try:
                if position == 0:
                    results = await self._primary(member, commands, timeout)
                elif len(shared) == len(commands):
                    results = await member.meter.run(commands, timeout)
                else:
                    results = await self._split(member.meter, commands, shared, timeout)
            except StoreError as error:
                STORE_FALLBACKS.labels(member.store.kind).inc()
                self._failed(member, work_kind(commands), error)
                continue
            if member.health[WRITE].failures or member.health[READ].failures:  # the common case skips this
                self._succeeded(member, work_kind(commands))
            return results
        raise StoreError("no store left: every store in the chain failed (store.fallback: [] allows none)")

    async def _primary(self, member: _Member, commands: Sequence[Command], timeout: float | None) -> list[object]:
        """A batch to the primary, with the budget's increment folded in when one is due."""
        budget = self.budget
        incr = budget.charge(len(commands)) if budget is not None else None
        if incr is None:
            return await member.meter.run(commands, timeout)
        assert budget is not None
        try:
            results = await member.meter.run([*commands, incr], timeout)
        except StoreError:
            budget.refund(incr)
            raise
        budget.record(incr, results.pop())
        return results

    async def _everywhere(self, commands: Sequence[Command], timeout: float | None) -> list[object]:
        """Revocations go to every healthy store, so they hold after a failover; one shared store must take them."""
        results: list[object] | None = None
        errors: list[StoreError] = []
        taken = False
        for member in self._members:
            if not member.healthy:
                if member.shared:
                    member.missed.extend(commands)
                continue
            try:
                answer = await member.meter.run(commands, timeout)
            except StoreError as error:
                self._failed(member, WRITE, error)
                errors.append(error)
                if member.shared:
                    member.missed.extend(commands)
                continue
            if member.shared or results is None:
                results = answer
            taken = taken or member.shared
        if results is None or (not taken and any(m.shared for m in self._members)):
            raise StoreError(f"no shared store took the revocation: {'; '.join(map(str, errors)) or 'none healthy'}")
        return results

    async def _split(self, remote: StoreMeter, commands: Sequence[Command], shared: list[int],
                     timeout: float | None) -> list[object]:
        """Shared state on a fallback store, caches in memory; results back in command order."""
        shared_set = set(shared)
        local = [i for i in range(len(commands)) if i not in shared_set]
        results: list[object] = [None] * len(commands)
        remote_results = await remote.run([commands[i] for i in shared], timeout)
        local_results = await self._cache.run([commands[i] for i in local], timeout) if local else []
        for i, value in zip(shared, remote_results, strict=True):
            results[i] = value
        for i, value in zip(local, local_results, strict=True):
            results[i] = value
        return results

    @property
    def notifies(self) -> bool:  # type: ignore[override]
        return any(member.store.notifies for member in self._members)

    async def subscribe(self, channel: str, handler: Handler) -> Subscription:
        """Subscribe on every store of the chain that carries notifications (see the module docstring)."""
        subscriptions = [await m.store.subscribe(channel, handler) for m in self._members if m.store.notifies]
        if not subscriptions:
            raise StoreError(f"no store of the chain {self.describe()} carries notifications")
        return _Subscriptions(channel, subscriptions)

    async def ping(self) -> None:
        for member in self._members:
            if member.healthy:
                try:
                    await member.store.ping()
                except StoreError as error:
                    self._failed(member, READ, error)
                    continue
                return
        raise StoreError("no store answers")

    async def memory_usage(self) -> tuple[int, int] | None:
        """The primary's memory, while it is healthy (the fallbacks' is not what fills up)."""
        primary = self._members[0]
        return await primary.store.memory_usage() if primary.healthy else None

    async def close(self) -> None:
        """Stop probes and heartbeats, then close every store of the chain (and so every subscription)."""
        tasks = [*self._tasks, *([self._heartbeat] if self._heartbeat else [])]
        self._heartbeat = None
        await asyncio.gather(*(stop(task, "a store probe or heartbeat") for task in tasks))
        for member in self._members:
            await member.store.close()

    # -- degraded limits ------------------------------------------------------------

    def _degrade(self, commands: Sequence[Command]) -> list[Command]:
        live = self.live_instances
        if live <= 1:
            return list(commands)
        return [RateLimit(tuple(_share(check, live) for check in c.checks), c.guard) if isinstance(c, RateLimit)
                else c for c in commands]

    # -- health -----------------------------------------------------------------

    def _failed(self, member: _Member, kind: str, error: StoreError) -> None:
        health = member.health[kind]
        now = time.monotonic()
        if health.failures == 0 or now - health.first_failure > self._window:
            health.failures, health.first_failure = 0, now
        health.failures += 1
        if health.healthy and health.failures >= self._failures:
            health.healthy = False
            member.recount()
            logger.warning("store %s marked down after %d failed %ss (%s); using the next store",
                           member.store.describe(), health.failures, kind, error)
            self._refresh()
            self._probe(member)

    def _succeeded(self, member: _Member, kind: str) -> None:
        member.health[kind].failures = 0  # a read that works says nothing about writes

    def _refresh(self) -> None:
        """Mode and up-ness from health: the first healthy store serves shared state."""
        for member in self._members:
            STORE_UP.labels(member.store.kind).set(1 if member.healthy else 0)
        serving = next((m for i, m in enumerate(self._members) if m.healthy and not (i == 0 and self._diverted)),
                       self._members[-1])
        self._set_mode(serving.store.kind)

    def _set_mode(self, mode: str) -> None:
        if mode != self._mode:
            logger.warning("store mode %s -> %s", self._mode, mode)
            STORE_MODE.labels(self._mode).set(0)
            STORE_MODE.labels(mode).set(1)
            STORE_MODE_CHANGES.labels(self._mode, mode).inc()
            self._mode = mode

    def _probe(self, member: _Member) -> None:
        if member.probing:
            return
        member.probing = True
        task = asyncio.get_running_loop().create_task(self._probe_loop(member))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe_once(self, member: _Member, kind: str) -> None:
        """The work that failed, for real: a write of a short-lived key, or a PING for reads."""
        if kind == READ:
            await member.store.ping()
            return
        (result,) = await member.store.execute([Set(self._probe_key, "1", PROBE_KEY_TTL_MS)])
        if isinstance(result, CommandError):
            raise StoreError(f"probe write refused: {result}")

    async def _probe_loop(self, member: _Member) -> None:
        delay = self._probe_initial
        try:
            while not member.healthy:
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                try:
                    for kind in member.failing():
                        await self._probe_once(member, kind)
                    if member.missed:  # revocations made while it was down: it refuses those sessions too
                        await member.store.execute(member.missed)
                        member.missed = []
                except StoreError:
                    delay = min(delay * 2, self._probe_max)
                    continue
                for health in member.health.values():
                    health.healthy, health.failures = True, 0
                member.recount()
                logger.warning("store %s answers again; using it", member.store.describe())
                self._refresh()
        finally:
            member.probing = False

    # -- heartbeats -------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None and self._instances is None and len(self._members) > 1:
            self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    async def _heartbeat_loop(self) -> None:
        beat = Heartbeat(self._heartbeat_key, self.instance_id, HEARTBEAT_TTL_MS)
        while True:
            for member in self._members:
                if member.healthy and member.shared and not (self._diverted and member is self._members[0]):
                    try:
                        (live,) = await (self._primary(member, [beat], 1.0) if member is self._members[0]
                                         else member.meter.run([beat], 1.0))
                    except StoreError as error:
                        self._failed(member, WRITE, error)
                        continue
                    if isinstance(live, CommandError):
                        logger.warning("heartbeat refused by %s: %s", member.store.describe(), live)
                        continue
                    self._succeeded(member, WRITE)
                    self._live = int(live)  # type: ignore[call-overload]
                    LIVE_INSTANCES.set(self._live)
                    break
            await asyncio.sleep(self._heartbeat_every)


class _Subscriptions(Subscription):
    """One subscription per store of the chain, closed together."""

    def __init__(self, channel: str, parts: list[Subscription]) -> None:
        self.channel = channel
        self._parts = parts

    async def close(self) -> None:
        parts, self._parts = self._parts, []
        for part in parts:
            await part.close()


def _share(check: LimitCheck, live: int) -> LimitCheck:
    return check._replace(quota=max(1, check.quota // live), burst=max(1, check.burst // live) if check.burst else 0)
