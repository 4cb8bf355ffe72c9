"""The circuit breaker's state machine: pure functions of (state, rule, event, now), no I/O.

The store runs :func:`apply` atomically on the breaker's shared state: this
module in :class:`~edgeway.middleware.store.memory.MemoryStore` (and in each
instance's own breaker when every store is down), ``lua/breaker.lua`` on Redis
and Upstash, ``edgeway.breaker_update`` in PostgreSQL; the shared store suite
holds them to the same answers, so every time is an integer of milliseconds and
every comparison is integer arithmetic.

::

    CLOSED --(failures in a row, or failure rate over the window)--> OPEN
    OPEN   --(open time over, one caller gets the probe token)-----> HALF_OPEN
    HALF_OPEN --(probe failed)--> OPEN, open time x streak (max_open_ms)
    HALF_OPEN --(success_threshold probe successes)--> CLOSED
    any    --(reset)--> CLOSED

Results that arrive while OPEN, and non-probe results while HALF_OPEN (requests
let through before it opened), change nothing. A probe token that is never
returned (the probing instance died) expires after ``probe_ms``; a probe that
says nothing (its client left) hands it back at once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from .store.base import BreakerEvent, BreakerResult, BreakerRule

__all__ = ["Phase", "Reason", "State", "apply", "open_duration", "ttl_ms"]


class Phase(enum.IntEnum):
    """A breaker's phase; the values are what the store and the state gauge carry."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class Reason(enum.IntEnum):
    """Why a breaker changed phase (``BreakerResult.reason``); 0 when it did not."""

    NONE = 0
    FAILURES = 1
    FAILURE_RATE = 2
    PROBE_FAILED = 3
    PROBE_SUCCEEDED = 4
    RESET = 5
    HALF_OPEN = 6

    @property
    def text(self) -> str:
        """The words a transition's log line uses."""
        return {
            Reason.NONE: "no change",
            Reason.FAILURES: "consecutive failures",
            Reason.FAILURE_RATE: "failure rate over the window",
            Reason.PROBE_FAILED: "the half-open probe failed",
            Reason.PROBE_SUCCEEDED: "the half-open probe succeeded",
            Reason.RESET: "reset by an operator",
            Reason.HALF_OPEN: "open time over: probing",
        }[self]


@dataclass(frozen=True, slots=True)
class State:
    """One breaker's shared state (the fields of its Redis hash, its PostgreSQL row)."""

    phase: Phase = Phase.CLOSED
    failures: int = 0
    """Consecutive failures while closed."""
    streak: int = 0
    """Openings in a row: 1 after the first, +1 per failed probe, 0 once closed."""
    until_ms: int = 0
    """OPEN: when a probe may go. HALF_OPEN: when the probe token expires."""
    successes: int = 0
    """Probe successes so far in HALF_OPEN."""
    window: int = 0
    """Index of the current failure-rate window (``now // window_ms``)."""
    total: int = 0
    failed: int = 0
    previous_total: int = 0
    previous_failed: int = 0


def open_duration(rule: BreakerRule, streak: int, jitter: int) -> int:
    """ms an opening lasts: ``open_ms`` x streak, at most ``max_open_ms``, minus ``jitter`` per mille."""
    base = min(rule.open_ms * max(1, streak), rule.max_open_ms)
    return base - base * jitter // 1000


def _roll(state: State, rule: BreakerRule, now: int) -> State:
    index = now // rule.window_ms
    if index == state.window:
        return state
    if index == state.window + 1:
        return replace(state, window=index, total=0, failed=0, previous_total=state.total,
                       previous_failed=state.failed)
    return replace(state, window=index, total=0, failed=0, previous_total=0, previous_failed=0)


def _rate_tripped(state: State, rule: BreakerRule, now: int) -> bool:
    """Failure rate over the sliding window (the previous window weighted by how much of it still
    overlaps), scaled by ``window_ms`` so everything stays in integers."""
    if rule.rate_bp <= 0:
        return False
    weight = rule.window_ms - (now - state.window * rule.window_ms)
    total = state.previous_total * weight + state.total * rule.window_ms
    failed = state.previous_failed * weight + state.failed * rule.window_ms
    return total >= rule.min_requests * rule.window_ms and failed * 10000 >= rule.rate_bp * total


def _open(state: State, rule: BreakerRule, now: int, streak: int, jitter: int) -> State:
    return State(Phase.OPEN, 0, streak, now + open_duration(rule, streak, jitter), 0, now // rule.window_ms)


def _closed(rule: BreakerRule, now: int) -> State:
    return State(Phase.CLOSED, window=now // rule.window_ms)


def apply(state: State | None, rule: BreakerRule, event: BreakerEvent, now: int) -> tuple[State, BreakerResult]:
    """The breaker after ``event`` at ``now`` (ms), and what the caller learns; ``state`` None: no state yet."""
    reason = Reason.NONE
    if state is None:
        state = State(window=now // rule.window_ms)
        if event.seed_phase != Phase.CLOSED:
            # the store has nothing (a fallback just took over): carry on from the caller's view
            state = State(Phase.OPEN, 0, max(1, event.seed_streak), now + max(0, event.seed_remaining_ms), 0,
                          now // rule.window_ms)
    if event.reset:
        if state.phase != Phase.CLOSED:
            reason = Reason.RESET
        state = _closed(rule, now)
    state = _roll(state, rule, now)

    if state.phase == Phase.CLOSED:
        if event.successes or event.failures:
            failures = 0 if event.successes else state.failures
            state = replace(state, failures=failures + event.failures,
                            total=state.total + event.successes + event.failures,
                            failed=state.failed + event.failures)
            if event.failures:
                if rule.failures > 0 and state.failures >= rule.failures:
                    reason = Reason.FAILURES
                elif _rate_tripped(state, rule, now):
                    reason = Reason.FAILURE_RATE
                if reason in (Reason.FAILURES, Reason.FAILURE_RATE):
                    state = _open(state, rule, now, 1, event.jitter)
    elif state.phase == Phase.HALF_OPEN and event.probe:
        if event.failures:
            reason = Reason.PROBE_FAILED
            state = _open(state, rule, now, state.streak + 1, event.jitter)
        elif event.successes:
            successes = state.successes + event.successes
            if successes >= rule.success_threshold:
                reason = Reason.PROBE_SUCCEEDED
                state = _closed(rule, now)
            else:  # hand the token back: the next request probes
                state = replace(state, successes=successes, until_ms=now)
        else:  # the probe said nothing (its client left): hand the token back at once
            state = replace(state, until_ms=min(state.until_ms, now))

    granted = state.phase == Phase.CLOSED
    if event.acquire and state.phase != Phase.CLOSED and now >= state.until_ms:
        if state.phase == Phase.OPEN:
            reason = Reason.HALF_OPEN
            state = replace(state, phase=Phase.HALF_OPEN, successes=0)
        state = replace(state, until_ms=now + rule.probe_ms)
        granted = True
    remaining = 0 if state.phase == Phase.CLOSED else max(0, state.until_ms - now)
    return state, BreakerResult(int(state.phase), remaining, state.failures, granted, int(reason), state.streak)


def ttl_ms(rule: BreakerRule) -> int:
    """How long the store keeps a breaker's state after its last update."""
    return 2 * rule.window_ms + rule.max_open_ms + 60_000
