"""The embedded store: everything in this process, nothing to install.

It implements the same commands with the same semantics as the Lua scripts in
``lua/ratelimit.lua`` (the shared store suite holds both to it). State is per
process: two instances on memory each enforce their own counters.

Bounded: past ``max_keys`` keys it evicts expired keys first (a heap by
expiry), then the least recently *used* (reads count, so a rejected client
whose counter is only read is the last to be forgotten). Both are O(log n)
per insert.
"""

from __future__ import annotations

import abc
import asyncio
import bisect
import collections
import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..breaker_state import State, apply, ttl_ms
from .base import (
    Algorithm,
    BreakerResult,
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
    Subscription,
)
from .notify import Fanout

_SLACK_MS = 1000  # keys outlive their window a little so a late reader still sees them


@dataclass(slots=True)
class _Entry:
    value: object
    expires_ms: float


@dataclass(slots=True)
class _Bucket:
    tokens: float
    ts: float


@dataclass(slots=True)
class _Log:
    stamps: list[tuple[float, int]] = field(default_factory=list)  # (time ms, sequence), sorted


class MemoryStore(Store):
    """In-process store with the full command set; ``clock`` is injectable for tests."""

    kind = "memory"
    notifies = True

    def __init__(self, *, clock: Clock | None = None, max_keys: int = 100_000) -> None:
        self._clock = clock or time.time
        self._data: collections.OrderedDict[str, _Entry] = collections.OrderedDict()  # least recently used first
        self._expiries: list[tuple[float, str]] = []  # heap; entries go stale when a key is rewritten or removed
        self._max_keys = max_keys
        self._fanout = Fanout()

    async def subscribe(self, channel: str, handler: Handler) -> Subscription:
        """In-process fan-out: only subscribers of this same MemoryStore object hear a Publish."""
        return await self._fanout.add(channel, handler)

    async def close(self) -> None:
        """End every subscription (the data stays: the store may be used again)."""
        self._fanout.close_all()

    def _now_ms(self) -> float:
        return math.floor(self._clock() * 1000)

    async def execute(self, commands: Sequence[Command], *, timeout: float | None = None) -> list[object]:
        now = self._now_ms()
        return [self._run(command, now) for command in commands]

    async def ping(self) -> None:
        return None

    # -- commands -----------------------------------------------------------

    def _run(self, command: Command, now: float) -> object:
        if isinstance(command, Get):
            value = self._get(command.key, now)
            if isinstance(value, str):
                return value.encode() if command.binary else value
            if isinstance(value, bytes):
                return value if command.binary else value.decode(errors="replace")
            return None
        if isinstance(command, Set):
            if command.only_if_absent:
                if self._get(command.key, now) is not None:
                    return False
                self._put(command.key, command.value, now + command.ttl_ms)
                return True
            self._put(command.key, command.value, now + command.ttl_ms)
            return None
        if isinstance(command, Delete):
            return self._delete(command, now)
        if isinstance(command, Incr):
            return self._incr(command, now)
        if isinstance(command, Publish):
            count = self._fanout.count(command.channel)
            if count:  # after this batch, like a message arriving over the network
                asyncio.get_running_loop().call_soon(self._fanout.dispatch, command.channel, command.message)
            return count
        if isinstance(command, IndexAdd):
            self._index_add(command, now)
            return None
        if isinstance(command, IndexPurge):
            return self._index_purge(command, now)
        if isinstance(command, RateLimit):
            return self._rate_limit(command, now)
        if isinstance(command, Heartbeat):
            return self._heartbeat(command, now)
        if isinstance(command, Revoked):
            return self._revoked(command, now)
        if isinstance(command, Revoke):
            self._put(command.key, str(command.at_ms), now + max(1, command.ttl_ms))
            return None
        if isinstance(command, BreakerUpdate):
            return self._breaker(command, int(now))
        raise TypeError(f"unknown store command {command!r}")

    def _breaker(self, command: BreakerUpdate, now: int) -> BreakerResult | CommandError:
        current = self._get(command.key, now)
        if current is not None and not isinstance(current, State):
            return CommandError(f"WRONGTYPE: {command.key} holds no breaker state")
        state, result = apply(current, command.rule, command.event, now)
        self._put(command.key, state, now + ttl_ms(command.rule))
        return result

    def _delete(self, command: Delete, now: float) -> int:
        if command.if_value is not None:
            current = self._get(command.key, now)
            if not isinstance(current, str | bytes) or _as_bytes(current) != _as_bytes(command.if_value):
                return 0
        entry = self._data.pop(command.key, None)
        return 1 if entry is not None and entry.expires_ms > now else 0

    def _incr(self, command: Incr, now: float) -> int | CommandError:
        entry = self._data.get(command.key)
        if entry is None or entry.expires_ms <= now:
            value, expires = command.amount, now + command.ttl_ms
        else:
            try:
                value = int(entry.value) + command.amount  # type: ignore[call-overload]
            except (TypeError, ValueError):
                return CommandError(f"Incr: the value at {command.key!r} is not an integer")
            expires = entry.expires_ms
        self._put(command.key, str(value), expires)
        return value

    def _index_add(self, command: IndexAdd, now: float) -> None:
        found = self._get(command.index, now)
        members: dict[tuple[str, str], float] = found if isinstance(found, dict) else {}
        members[(command.label, command.member)] = now + command.ttl_ms
        live = {member: until for member, until in members.items() if until > now}
        self._put(command.index, live, max(live.values()))

    def _index_purge(self, command: IndexPurge, now: float) -> int:
        found = self._get(command.index, now)
        if not isinstance(found, dict):
            return 0
        chosen = [m for m in found if command.label is None or m[0] == command.label]
        for member in chosen:
            del found[member]
        if not found or command.label is None:
            self._data.pop(command.index, None)
        deleted = 0
        for _, key in chosen:
            if self._get(key, now) is not None:
                del self._data[key]
                deleted += 1
        return deleted

    def _get(self, key: str, now: float) -> object:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry.expires_ms <= now:
            del self._data[key]
            return None
        self._data.move_to_end(key)  # a read is a use: an abuser only ever rejected stays the most recent
        return entry.value

    def _put(self, key: str, value: object, expires_ms: float) -> None:
        entry = self._data.get(key)
        if entry is not None and entry.expires_ms == expires_ms:
            entry.value = value  # same expiry: the heap entry stays valid
        else:
            self._data[key] = _Entry(value, expires_ms)
            heapq.heappush(self._expiries, (expires_ms, key))
        self._data.move_to_end(key)
        if len(self._data) > self._max_keys:
            self._evict()
        elif len(self._expiries) > 2 * self._max_keys:
            self._compact()

    def _evict(self) -> None:
        now = self._now_ms()
        heap, data = self._expiries, self._data
        while heap and heap[0][0] <= now and len(data) > self._max_keys:
            expires_ms, key = heapq.heappop(heap)
            entry = data.get(key)
            if entry is not None and entry.expires_ms == expires_ms:  # else stale: the key was rewritten
                del data[key]
        while len(data) > self._max_keys:
            data.popitem(last=False)

    def _compact(self) -> None:
        """Drop stale heap entries (amortised O(1) per insert: runs once the heap is twice the key limit)."""
        self._expiries = [(entry.expires_ms, key) for key, entry in self._data.items()]
        heapq.heapify(self._expiries)

    def _heartbeat(self, command: Heartbeat, now: float) -> int:
        seen = self._get(command.key, now)
        members: dict[str, float] = seen if isinstance(seen, dict) else {}
        members[command.instance] = now
        live = {member: at for member, at in members.items() if at > now - command.ttl_ms}
        self._put(command.key, live, now + command.ttl_ms)
        return len(live)

    # -- rate limits: phase 1 reads and decides, phase 2 charges (all or none) --

    def _revoked(self, command: Revoked, now: float) -> bool:
        for key in command.keys:
            value = self._get(key, now)
            if isinstance(value, str) and value.lstrip("-").isdigit() and int(value) > command.issued_at_ms:
                return True
        return False

    def _rate_limit(self, command: RateLimit, now: float) -> RateLimitResult | CommandError:
        for check in command.checks:  # all checked before any is charged, as the script and the SQL do
            if check.quota < 1 or check.window_ms < 1 or check.cost < 0 or check.burst < 0:
                return CommandError(f"bad limit {check.key}: quota and window_ms must be positive, cost and "
                                    "burst not negative")
        if command.guard is not None and self._revoked(command.guard, now):
            return RateLimitResult(False, (), revoked=True)
        plans = [self._plan(check, now) for check in command.checks]
        allowed = all(plan.allowed for plan, check in zip(plans, command.checks, strict=True) if check.enforced)
        states = []
        for plan, check in zip(plans, command.checks, strict=True):
            if allowed:
                plan.charge()
            states.append(plan.state(check))
        return RateLimitResult(allowed, tuple(states))

    def _plan(self, check: LimitCheck, now: float) -> _Plan:
        algorithm = check.algorithm
        if algorithm is Algorithm.FIXED_WINDOW:
            return _FixedWindow(self, check, now)
        if algorithm is Algorithm.SLIDING_WINDOW:
            return _SlidingWindow(self, check, now)
        if algorithm is Algorithm.SLIDING_LOG:
            return _SlidingLog(self, check, now)
        return _TokenBucket(self, check, now)


class _Plan(abc.ABC):
    """One limit's decision for one request: read in ``__init__``, ``charge`` if admitted, then ``state``."""

    allowed: bool

    @abc.abstractmethod
    def charge(self) -> None:
        """Record this request's cost."""

    @abc.abstractmethod
    def state(self, check: LimitCheck) -> LimitState:
        """What the limit reports after the decision."""


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _int_value(value: object) -> int:
    return value if isinstance(value, int) else 0


class _FixedWindow(_Plan):
    def __init__(self, store: MemoryStore, check: LimitCheck, now: float) -> None:
        window = check.window_ms
        start = (now // window) * window
        self.store, self.check, self.now = store, check, now
        self.key = f"{check.key}:{int(now // window)}"
        self.count = _int_value(store._get(self.key, now))
        self.reset = start + window - now
        self.allowed = self.count + check.cost <= check.quota

    def charge(self) -> None:
        self.count += self.check.cost
        self.store._put(self.key, self.count, self.now + self.check.window_ms + _SLACK_MS)

    def state(self, check: LimitCheck) -> LimitState:
        remaining = max(0, check.quota - self.count)
        return LimitState(self.allowed, remaining, int(self.reset), 0 if self.allowed else int(self.reset))


class _SlidingWindow(_Plan):
    def __init__(self, store: MemoryStore, check: LimitCheck, now: float) -> None:
        window = check.window_ms
        index = int(now // window)
        self.store, self.check, self.now = store, check, now
        self.key = f"{check.key}:{index}"
        self.current = _int_value(store._get(self.key, now))
        self.previous = _int_value(store._get(f"{check.key}:{index - 1}", now))
        self.elapsed = now - index * window
        self.estimate = self.previous * (window - self.elapsed) / window + self.current
        self.allowed = self.estimate + check.cost <= check.quota

    def charge(self) -> None:
        self.current += self.check.cost
        self.estimate += self.check.cost
        self.store._put(self.key, self.current, self.now + 2 * self.check.window_ms + _SLACK_MS)

    def state(self, check: LimitCheck) -> LimitState:
        window = check.window_ms
        remaining = max(0, math.floor(check.quota - self.estimate))
        reset = window - self.elapsed
        retry = 0 if self.allowed else _sliding_retry(self, check)
        return LimitState(self.allowed, remaining, int(reset), int(retry))


def _sliding_retry(plan: _SlidingWindow, check: LimitCheck) -> float:
    """How long until ``estimate + cost <= quota`` as the previous window's weight fades."""
    window, quota, cost = check.window_ms, check.quota, check.cost
    if cost > quota:
        return window
    if plan.current + cost <= quota:
        # still inside this window: previous * (window - e) / window + current + cost <= quota
        need = window - (quota - plan.current - cost) * window / plan.previous
        return max(1, math.ceil(need - plan.elapsed))
    # only the next window helps: current becomes "previous" there
    need = window - (quota - cost) * window / plan.current
    return max(1, math.ceil(window - plan.elapsed + need))


class _SlidingLog(_Plan):
    def __init__(self, store: MemoryStore, check: LimitCheck, now: float) -> None:
        self.store, self.check, self.now = store, check, now
        entry = store._get(check.key, now)
        self.log = entry if isinstance(entry, _Log) else _Log()
        cut = bisect.bisect_right(self.log.stamps, (now - check.window_ms, math.inf))
        del self.log.stamps[:cut]
        self.count = len(self.log.stamps)
        self.allowed = self.count + check.cost <= check.quota

    def charge(self) -> None:
        base = self.count
        for i in range(self.check.cost):
            self.log.stamps.append((self.now, base + i))
        self.count += self.check.cost
        self.store._put(self.check.key, self.log, self.now + self.check.window_ms + _SLACK_MS)

    def state(self, check: LimitCheck) -> LimitState:
        stamps = self.log.stamps
        remaining = max(0, check.quota - self.count)
        reset = stamps[0][0] + check.window_ms - self.now if stamps else 0
        if self.allowed:
            retry = 0.0
        elif check.cost > check.quota:
            retry = check.window_ms
        else:
            # the (count + cost - quota)-th oldest entry must leave the window
            retry = max(1, stamps[self.count + check.cost - check.quota - 1][0] + check.window_ms - self.now)
        return LimitState(self.allowed, remaining, int(reset), int(retry))


class _TokenBucket(_Plan):
    def __init__(self, store: MemoryStore, check: LimitCheck, now: float) -> None:
        self.store, self.check, self.now = store, check, now
        self.capacity = check.burst or check.quota
        self.rate = check.quota / check.window_ms  # tokens per ms
        entry = store._get(check.key, now)
        # (base, base_ts): the stored level and its time, from which every later read computes the level
        if isinstance(entry, _Bucket):
            self.base, self.base_ts = entry.tokens, entry.ts
            self.tokens = min(self.capacity, entry.tokens + max(0.0, now - entry.ts) * self.rate)
        else:
            self.base, self.base_ts = float(self.capacity), now
            self.tokens = float(self.capacity)
        self.allowed = self.tokens >= check.cost

    def charge(self) -> None:
        self.tokens -= self.check.cost
        self.base, self.base_ts = self.tokens, self.now
        # live until refilled from the current level: shadow and cost_from debits push it below zero
        ttl = math.ceil((self.capacity - self.tokens) / self.rate) + _SLACK_MS
        self.store._put(self.check.key, _Bucket(self.tokens, self.now), self.now + ttl)

    def state(self, check: LimitCheck) -> LimitState:
        remaining = max(0, math.floor(self.tokens))
        reset = math.ceil((self.capacity - self.tokens) / self.rate)
        if self.allowed:
            retry = 0
        elif check.cost > self.capacity:
            retry = check.window_ms
        else:
            retry = _bucket_retry(self, check.cost)
        return LimitState(self.allowed, remaining, int(reset), int(retry))


def _bucket_retry(plan: _TokenBucket, cost: int) -> int:
    """The first whole ms at which a later read (same arithmetic) finds ``cost`` tokens.

    ``ceil`` alone can land one ms short in floating point, so the level is recomputed as a read would.
    """
    need = math.ceil((cost - plan.base) / plan.rate)
    if plan.base + need * plan.rate < cost:
        need += 1
    return max(1, int(plan.base_ts + need - plan.now))
