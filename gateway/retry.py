"""Retries of idempotent requests to one upstream (``breaker.retry``), within a budget.

A request is sent again only when it can be replayed exactly — no body, or a
body the pipeline read whole into ``ctx.body`` — and its method is idempotent
(GET, HEAD, OPTIONS, PUT, DELETE; POST and PATCH only with the configured
``idempotency_header``), only for a failure before the response started (no
connection, a timeout, or a status the breaker counts as a failure), never
while the upstream's breaker is open, and only while the budget allows: over
a sliding 10 s window, retries stay within ``budget`` (20%) of the requests
this instance sent to that upstream. Waits are exponential with full jitter.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterable, Callable

from edgeway.middleware.breaker import CircuitBreaker
from edgeway.middleware.breaker_config import IDEMPOTENT_METHODS, RetrySettings
from edgeway.middleware.breaker_state import Phase
from edgeway.middleware.context import RequestContext

from .upstream import Pool, Response, UpstreamError

__all__ = ["Retrier", "RetryBudget"]

BUDGET_WINDOW = 10.0


class RetryBudget:
    """Retries as a share of requests over a sliding window (two fixed windows, the older one weighted)."""

    __slots__ = ("_clock", "_index", "_previous", "_requests", "_retries", "_share", "_window")

    def __init__(self, share: float, *, window: float = BUDGET_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._share = share
        self._window = window
        self._clock = clock
        self._index = 0
        self._requests = 0
        self._retries = 0
        self._previous = (0, 0)

    def _roll(self) -> float:
        now = self._clock()
        index = math.floor(now / self._window)
        if index != self._index:
            self._previous = (self._requests, self._retries) if index == self._index + 1 else (0, 0)
            self._index, self._requests, self._retries = index, 0, 0
        return (now - index * self._window) / self._window

    def request(self) -> None:
        """Count one request (first attempts only)."""
        self._roll()
        self._requests += 1

    def take(self) -> bool:
        """Spend one retry if the budget has room."""
        elapsed = self._roll()
        weight = 1.0 - elapsed
        requests = self._previous[0] * weight + self._requests
        retries = self._previous[1] * weight + self._retries
        if retries + 1 > self._share * requests:
            return False
        self._retries += 1
        return True


class Retrier:
    """Whether and when one upstream's failed request is sent again."""

    def __init__(self, settings: RetrySettings, breaker: CircuitBreaker, *,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.breaker = breaker
        self.statuses = breaker.settings.statuses
        self.budget = RetryBudget(settings.budget / 100, clock=clock)
        self._rng = rng or random.Random()
        self._idempotency = settings.idempotency_header.lower() if settings.idempotency_header else None

    def replayable(self, ctx: RequestContext, method: str, body: object) -> bool:
        """Whether this request may be sent more than once (``body``: None or bytes held whole, not a
        stream); counts it for the budget."""
        if body is not None and not isinstance(body, bytes):
            return False  # streamed on, not held: it cannot be sent again
        if method not in IDEMPOTENT_METHODS and (self._idempotency is None or ctx.header(self._idempotency) is None):
            return False
        self.budget.request()
        return True

    def again(self, attempt: int) -> float | None:
        """Seconds to wait before retry number ``attempt + 1``, or None: no retry."""
        if attempt >= self.settings.attempts or self.breaker.phase != Phase.CLOSED or not self.budget.take():
            return None
        return self._rng.uniform(0, min(self.settings.max_backoff, self.settings.backoff * 2**attempt))

    async def send(self, pool: Pool, method: str, target: bytes, headers: list[tuple[bytes, bytes]],
                   body: bytes | AsyncIterable[bytes] | None, gone: Callable[[], bool]) -> Response:
        """``pool.request`` sent again while this policy allows; the last attempt's response (or its error).
        Only for a request :meth:`replayable` accepted; ``gone()``: the client left, stop."""
        attempt = 0
        while True:
            try:
                response = await pool.request(method, target, headers, body)
            except UpstreamError:
                wait = None if gone() else self.again(attempt)
                if wait is None:
                    raise
            else:
                wait = self.again(attempt) if response.status in self.statuses else None
                if wait is None:
                    return response
                response.release()
            attempt += 1
            await asyncio.sleep(wait)
