"""The embedded store: everything in this process, nothing to install.

It implements the same commands with the same semantics as the Lua scripts in
``lua/ratelimit.lua`` (the shared store suite holds both to it). State is per
process: two instances on memory each enforce their own counters.
"""

from __future__ import annotations

import abc
import asyncio
import bisect
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
    StoreError,
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
        self._data: dict[str, _Entry] = {}
        self._max_keys = max_keys
        self._fanout = Fanout()

    async def subscribe(self, channel: str, handler: Handler) -> Subscription:
        """In-process fan-out: only subscribers of this same MemoryStore object hear a Publish."""
        return await self._fanout.add(channel, handler)

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
        if isinstance(command, RateLimit):
            return self._rate_limit(command, now)
        if isinstance(command, Heartbeat):
            return self._heartbeat(command, now)
        if isinstance(command, BreakerUpdate):
            return self._breaker(command, int(now))
        raise TypeError(f"unknown store command {command!r}")

    def _breaker(self, command: BreakerUpdate, now: int) -> BreakerResult:
        current = self._get(command.key, now)
        if current is not None and not isinstance(current, State):
            raise StoreError(f"WRONGTYPE: {command.key} holds no breaker state")
        state, result = apply(current, command.rule, command.event, now)
        self._put(command.key, state, now + ttl_ms(command.rule))
        return result

    def _delete(self, command: Delete, now: float) -> int:
        if command.if_value is not None:
            current = self._get(command.key, now)
            if not isinstance(current, str | bytes) or _as_bytes(current) != _as_bytes(command.if_value):
                return 0
        return 1 if self._data.pop(command.key, None) is not None else 0

    def _incr(self, command: Incr, now: float) -> int:
        entry = self._data.get(command.key)
        if entry is None or entry.expires_ms <= now:
            value, expires = command.amount, now + command.ttl_ms
        else:
            try:
                value = int(entry.value) + command.amount  # type: ignore[call-overload]
            except (TypeError, ValueError):
                raise StoreError(f"Incr: the value at {command.key!r} is not an integer") from None
            expires = entry.expires_ms
        self._put(command.key, str(value), expires)
        return value

    def _get(self, key: str, now: float) -> object:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry.expires_ms <= now:
            del self._data[key]
            return None
        return entry.value

    def _put(self, key: str, value: object, expires_ms: float) -> None:
        self._data.pop(key, None)  # re-insert so dict order approximates age for eviction
        self._data[key] = _Entry(value, expires_ms)
        if len(self._data) > self._max_keys:
            self._evict()

    def _evict(self) -> None:
        now = self._now_ms()
        for key in [k for k, e in self._data.items() if e.expires_ms <= now]:
            del self._data[key]
        while len(self._data) > self._max_keys:
            del self._data[next(iter(self._data))]

    def _heartbeat(self, command: Heartbeat, now: float) -> int:
        seen = self._get(command.key, now)
        members: dict[str, float] = seen if isinstance(seen, dict) else {}
        members[command.instance] = now
        live = {member: at for member, at in members.items() if at > now - command.ttl_ms}
        self._put(command.key, live, now + command.ttl_ms)
        return len(live)

    # -- rate limits: phase 1 reads and decides, phase 2 charges (all or none) --

    def _rate_limit(self, command: RateLimit, now: float) -> RateLimitResult:
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
        if isinstance(entry, _Bucket):
            self.tokens = min(self.capacity, entry.tokens + max(0.0, now - entry.ts) * self.rate)
        else:
            self.tokens = float(self.capacity)
        self.allowed = self.tokens >= check.cost

    def charge(self) -> None:
        self.tokens -= self.check.cost
        ttl = math.ceil(self.capacity / self.rate) + _SLACK_MS
        self.store._put(self.check.key, _Bucket(self.tokens, self.now), self.now + ttl)

    def state(self, check: LimitCheck) -> LimitState:
        remaining = max(0, math.floor(self.tokens))
        reset = math.ceil((self.capacity - self.tokens) / self.rate)
        if self.allowed:
            retry = 0
        elif check.cost > self.capacity:
            retry = check.window_ms
        else:
            retry = max(1, math.ceil((check.cost - self.tokens) / self.rate))
        return LimitState(self.allowed, remaining, int(reset), int(retry))
