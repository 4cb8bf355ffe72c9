"""Circuit breakers shared through the store: one :class:`CircuitBreaker` per upstream.

Every instance keeps a local copy of each breaker (phase, time left, known
failures), so a closed breaker costs a request nothing: no store command, just
an in-flight count. The copy is re-read at most every ``sync_interval`` (1 s)
by one request, its read folded into that request's batch; where the store
carries notifications, a transition is also published and every instance
re-reads at once. Results are recorded after the response, as deferred writes:
failures always, successes only when they matter (the known failure count is
not zero, the failure-rate window, or a probe). Every change is ONE atomic
:class:`~edgeway.middleware.store.BreakerUpdate` (see
:mod:`edgeway.middleware.breaker_state`); when no store answers at all, the
same state machine runs on this instance's own copy, so the breaker still
opens and closes — it never degrades to "always closed".

In code, around any async call (a provider's API, an httpx request)::

    breaker = CircuitBreaker("auth", BreakerSettings(failures=3, open_for="30s"), store=store)

    async with breaker:                 # raises CircuitOpen while open (or past max_in_flight)
        response = await client.get(url)
        if response.status_code >= 500:
            breaker.fail()              # a failure that raised no exception

    @breaker                            # the same, as a decorator: exceptions are failures
    async def fetch_user(token: str) -> dict: ...

The route policy (:class:`~edgeway.middleware.breaker_policy.BreakerPolicy`)
and ``CircuitBreakerMiddleware`` use the same object.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import functools
import logging
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from .breaker_config import BreakerSettings
from .breaker_state import Phase, Reason, State, apply
from .metrics import BREAKER_SHORT_CIRCUITED, BREAKER_STATE, BREAKER_TRANSITIONS
from .store import (
    BreakerEvent,
    BreakerResult,
    BreakerUpdate,
    Clock,
    CommandError,
    Publish,
    Store,
    StoreError,
    Subscription,
)

__all__ = ["Admission", "CircuitBreaker", "CircuitOpen", "Ticket", "reset_breaker"]

logger = logging.getLogger("edgeway.breaker")

P = ParamSpec("P")
T = TypeVar("T")

_PHASE_NAMES = {Phase.CLOSED: "closed", Phase.OPEN: "open", Phase.HALF_OPEN: "half_open"}
_NOTIFIED_SYNC = 10.0  # seconds between re-reads while notifications say what changed (a safety net)


class CircuitOpen(Exception):
    """The breaker refused the call: it is open (``overloaded`` False) or past ``max_in_flight``."""

    def __init__(self, upstream: str, retry_after: int, *, overloaded: bool = False) -> None:
        self.upstream = upstream
        self.retry_after = retry_after
        self.overloaded = overloaded
        what = "has too many calls in flight" if overloaded else "is open"
        super().__init__(f"circuit breaker {upstream!r} {what}; retry in {retry_after}s")


class Admission(enum.Enum):
    """How :meth:`CircuitBreaker.admit` let a call through."""

    CALL = "call"
    PROBE = "probe"
    """The half-open probe: its result closes or reopens the breaker."""


# The members the request path compares with, as plain names: looking an enum member up on its class goes
# through the enum machinery (~0.1-0.2 us each here), and a closed breaker's request did that half a dozen times.
CALL, PROBE, CLOSED = Admission.CALL, Admission.PROBE, Phase.CLOSED


class Ticket:
    """One call inside ``async with breaker:``: how it was admitted, and whether it already failed."""

    __slots__ = ("admission", "failed")

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.failed = False


class CircuitBreaker:
    """One upstream's breaker, shared by every route and every piece of code that calls it."""

    def __init__(
        self,
        name: str,
        settings: BreakerSettings | None = None,
        *,
        store: Store,
        key_prefix: str = "edgeway:",
        probe_timeout: float = 30.0,
        sync_interval: float = 1.0,
        clock: Clock | None = None,
        instance_id: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.settings = settings or BreakerSettings()
        self.store = store
        self.rule = self.settings.rule(probe_timeout)
        self.key = f"{key_prefix}br:{{{name}}}"
        self.channel = f"{key_prefix}breaker"
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self.sync_interval = sync_interval
        self._clock = clock or time.time
        self._rng = rng or random.Random()
        self._rate_mode = self.rule.rate_bp > 0
        self._max_in_flight = self.settings.max_in_flight
        # the local copy of the shared state
        self._phase = Phase.CLOSED
        self._until = 0.0  # open: when a probe may go; half-open: when to ask for the token again
        self._failures = 0
        self._streak = 0
        self._checked = -math.inf  # when the copy was last re-read (or a re-read was sent)
        self._quiet_until = -math.inf  # closed, and nothing due before then: ``before`` is a comparison
        self._pending = 0  # successes not yet sent (failure-rate mode)
        self._local: State | None = None  # this instance's own breaker, used while no store answers
        self._store_down = False
        self.in_flight = 0
        self._calls: contextvars.ContextVar[tuple[Ticket, ...]] = contextvars.ContextVar(f"breaker:{name}",
                                                                                           default=())
        self._subscription: Subscription | None = None
        self._subscribing: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._gauge = BREAKER_STATE.labels(name)
        self._gauge.set(0)
        self._transitions = {phase: BREAKER_TRANSITIONS.labels(name, label) for phase, label in _PHASE_NAMES.items()}
        self._short_circuited = BREAKER_SHORT_CIRCUITED.labels(name)

    # -- what the policy and the context manager call ------------------------------------------

    @property
    def phase(self) -> Phase:
        """This instance's view of the breaker."""
        return self._phase

    def retry_after(self, now: float | None = None) -> int:
        """Whole seconds until a request may get through again (at least 1)."""
        now = self._clock() if now is None else now
        return max(1, math.ceil(self._until - now))

    def before(self) -> BreakerUpdate | None:
        """The command a request must carry, if any: a probe-token request, a due re-read, or nothing.

        Closed and not due for a re-read (nearly every request): a clock read and a comparison.
        """
        now = self._clock()
        if now < self._quiet_until:
            return None
        if self._subscribing is None:
            self._listen()
        if self._phase != Phase.CLOSED and now >= self._until:
            # one request per instance asks for the token; the others wait for its answer
            self._until = now + self.sync_interval
            self._checked = now
            return self._command(BreakerEvent(successes=self._take_pending(), acquire=True))
        command = None
        if now - self._checked >= self._sync_every():
            self._checked = now
            command = self._command(BreakerEvent(successes=self._take_pending()))
        if self._phase == Phase.CLOSED:
            self._quiet_until = self._checked + self._sync_every()
        return command

    def admit(self, command: BreakerUpdate | None, result: object) -> Admission | CircuitOpen:
        """After the batch: how a call may go (pass it to :meth:`record` when it ends), or why it may not.

        Closed with no command (nearly every request): an in-flight count, nothing allocated.
        """
        probe = False
        if command is not None:
            now = self._clock()
            if isinstance(result, BreakerResult):
                self._learn(result, now)
                probe = command.event.acquire and result.granted and result.phase == Phase.HALF_OPEN
            elif isinstance(result, StoreError | CommandError):  # no store answered, or it refused the key
                local = self._apply_locally(command.event, now)
                probe = command.event.acquire and local.granted and local.phase == Phase.HALF_OPEN
        if not probe and self._phase is not CLOSED:
            self._short_circuited.inc()
            # half-open: the probe is out, its answer may close the breaker any moment
            return CircuitOpen(self.name, 1 if self._phase == Phase.HALF_OPEN else self.retry_after())
        if self._max_in_flight is not None and self.in_flight >= self._max_in_flight:
            self._short_circuited.inc()
            return CircuitOpen(self.name, 1, overloaded=True)
        self.in_flight += 1
        return PROBE if probe else CALL

    def record(self, admission: Admission, failed: bool | None) -> BreakerUpdate | None:
        """The call ended: failed True/False, or None when it says nothing (4xx, the client left).

        Returns the write to make, if any (none for a success while closed with no failures known);
        pass its outcome to :meth:`written`.
        """
        self.in_flight -= 1
        if admission is PROBE:
            if failed is None:  # nothing learned: hand the token back so the next call probes
                return self._command(BreakerEvent(probe=True))
            event = BreakerEvent(failures=1, probe=True) if failed else BreakerEvent(successes=1, probe=True)
            return self._command(event)
        if failed is None:
            return None
        if failed:
            return self._command(BreakerEvent(successes=self._take_pending(), failures=1))
        if self._rate_mode:
            self._pending += 1
            if self._clock() - self._checked >= self.sync_interval:
                self._checked = self._clock()
                return self._command(BreakerEvent(successes=self._take_pending()))
            return None
        if self._failures > 0:  # a success between failures resets the count everywhere
            self._failures = 0
            return self._command(BreakerEvent(successes=1))
        return None

    def written(self, command: BreakerUpdate, outcome: object) -> None:
        """What the store answered to a command from :meth:`record` (a result, a StoreError or CommandError)."""
        now = self._clock()
        if isinstance(outcome, BreakerResult):
            self._learn(outcome, now)
        elif isinstance(outcome, StoreError | CommandError):
            self._apply_locally(command.event, now)

    async def reset(self) -> dict[str, object]:
        """Close the breaker everywhere (the admin endpoint); returns its new status."""
        command = BreakerUpdate(self.key, self.rule, BreakerEvent(reset=True))
        self._local = None
        try:
            (result,) = await self.store.execute([command])
        except StoreError as error:
            result = error
        self.written(command, result)
        if self._phase != Phase.CLOSED or self._until:
            self._phase, self._until, self._failures, self._streak = Phase.CLOSED, 0.0, 0, 0
            self._gauge.set(0)
        return self.status()

    def status(self) -> dict[str, object]:
        """This instance's view, for ``/_edgeway/status``."""
        now = self._clock()
        status: dict[str, object] = {
            "state": _PHASE_NAMES[self._phase], "failures": self._failures, "openings": self._streak,
            "in_flight": self.in_flight, "shared": not self._store_down,
        }
        if self._phase != Phase.CLOSED:
            status["retry_after"] = self.retry_after(now)
        return status

    async def close(self) -> None:
        """Stop listening for notifications and wait for background writes; call it before closing the store."""
        if self._subscribing is not None:
            self._subscribing.cancel()
        if self._subscription is not None:
            await self._subscription.close()
            self._subscription = None
            self._quiet_until = -math.inf
        if self._background:
            await asyncio.wait(self._background, timeout=1.0)

    # -- in code: async with breaker / @breaker -------------------------------------------------

    async def __aenter__(self) -> CircuitBreaker:
        command = self.before()
        result: object = None
        if command is not None:
            try:
                (result,) = await self.store.execute([command])
            except StoreError as error:
                result = error
        admitted = self.admit(command, result)
        if isinstance(admitted, CircuitOpen):
            raise admitted
        self._calls.set((*self._calls.get(), Ticket(admitted)))
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        calls = self._calls.get()
        ticket = calls[-1]
        self._calls.set(calls[:-1])
        if isinstance(error, asyncio.CancelledError):
            failed: bool | None = None  # the caller gave up: says nothing about the upstream
        else:
            failed = error is not None or ticket.failed
        command = self.record(ticket.admission, failed)
        if command is not None:
            self._spawn(self._write(command))

    def fail(self) -> None:
        """Inside ``async with breaker:``: count this call as a failure although it raised nothing."""
        calls = self._calls.get()
        if not calls:
            raise RuntimeError("breaker.fail() is only meaningful inside `async with breaker:`")
        calls[-1].failed = True

    def __call__(self, function: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        """Decorate an async function: each call runs inside ``async with breaker:``."""

        @functools.wraps(function)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            async with self:
                return await function(*args, **kwargs)

        return guarded

    # -- internals --------------------------------------------------------------------------------

    def _sync_every(self) -> float:
        return _NOTIFIED_SYNC if self._subscription is not None and not self._store_down else self.sync_interval

    def _take_pending(self) -> int:
        pending, self._pending = self._pending, 0
        return pending

    def _command(self, event: BreakerEvent) -> BreakerUpdate:
        if self._phase != Phase.CLOSED:  # carried so a fresh fallback store continues from our view
            remaining = max(0, round((self._until - self._clock()) * 1000))
            event = event._replace(seed_phase=int(Phase.OPEN), seed_remaining_ms=remaining,
                                   seed_streak=self._streak)
        if event.failures:
            event = event._replace(jitter=self._rng.randrange(0, 101))
        return BreakerUpdate(self.key, self.rule, event)

    def _apply_locally(self, event: BreakerEvent, now: float) -> BreakerResult:
        """No store answered: run the same state machine on this instance's own copy."""
        if not self._store_down:
            logger.warning("breaker %s (instance %s): no store answers (or it refused the breaker's key); "
                           "using this instance's own breaker",
                           self.name, self.instance_id)
        self._store_down = True
        self._quiet_until = -math.inf  # re-read sooner while no store answers
        self._local, result = apply(self._local, self.rule, event, math.floor(now * 1000))
        self._learn(result, now, shared=False)
        return result

    def _learn(self, result: BreakerResult, now: float, *, shared: bool = True) -> None:
        if shared and self._store_down:
            self._store_down, self._local = False, None
            logger.warning("breaker %s (instance %s): the store answers again", self.name, self.instance_id)
        phase = Phase(result.phase)
        self._failures, self._streak = result.failures, result.streak
        # open: a probe may go then; half-open: the token expires then (meanwhile re-reads see it close)
        self._until = 0.0 if phase == Phase.CLOSED else now + result.remaining_ms / 1000
        if phase != self._phase:
            self._gauge.set(int(phase))
        self._phase = phase
        if phase != Phase.CLOSED:
            self._quiet_until = -math.inf
        if result.reason:
            reason = Reason(result.reason)
            self._transitions[phase].inc()
            logger.warning("breaker %s -> %s: %s (instance %s%s)", self.name, _PHASE_NAMES[phase], reason.text,
                           self.instance_id, "" if shared else ", local breaker")
            if shared and self.store.notifies:
                self._spawn(self._publish())

    async def _write(self, command: BreakerUpdate) -> None:
        try:
            (result,) = await self.store.execute([command])
        except StoreError as error:
            self.written(command, error)
        else:
            self.written(command, result)

    async def _publish(self) -> None:
        try:
            await self.store.execute([Publish(self.channel, self.name)])
        except StoreError as error:
            logger.debug("breaker %s: could not publish a transition: %s", self.name, error)

    def _listen(self) -> None:
        if self._subscribing is None and self.store.notifies:
            self._subscribing = self._spawn(self._subscribe())

    async def _subscribe(self) -> None:
        try:
            self._subscription = await self.store.subscribe(self.channel, self._notified)
        except StoreError as error:
            logger.warning("breaker %s: no notifications (%s); re-reading every %gs", self.name, error,
                           self.sync_interval)

    def _notified(self, message: str) -> None:
        if message == self.name:
            self._checked = self._quiet_until = -math.inf  # re-read with the next request

    def _spawn(self, work: Awaitable[T]) -> asyncio.Task[T]:
        task: asyncio.Task[T] = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task



async def reset_breaker(breakers: Mapping[str, CircuitBreaker], upstream: str) -> tuple[int, dict[str, object]]:
    """``POST /_edgeway/breakers/{upstream}/reset``: (HTTP status, JSON answer)."""
    breaker = breakers.get(upstream)
    if breaker is None:
        known = ", ".join(sorted(breakers)) or "none"
        return 404, {"error": "no_breaker", "message": f"upstream {upstream!r} has no breaker (breakers: {known})"}
    status = await breaker.reset()
    logger.warning("breaker %s reset by the admin API (instance %s)", upstream, breaker.instance_id)
    return 200, {"upstream": upstream, **status}
