"""``store.budget``: count the commands sent to the primary store against a monthly allowance.

Hosted Redis plans bill by command (Upstash's free tier: 500,000 a month).
Every instance counts what it sends (a revocation check that rides in the
same batch's rate-limit script counted too: the count errs high, never low)
and adds it to one counter kept in the
store itself (``{prefix}budget:YYYY-MM``, UTC months), so all instances share
the month's total. The increment is folded into a batch that goes to the
store anyway, never sent on its own: with an instance's first batch (so it
learns the month's total at once), then once enough has accumulated
(``limit // 1000`` commands) or ``FLUSH_EVERY`` seconds have passed: at most one
extra command per batch, usually far fewer. The answer to the increment is the
month's total so far, which readyz, status and the metrics show; a warning is
logged once a month at 80%, and at 100% ``on_exhausted: fallback`` moves
everything off the primary until the month turns (``alert`` only tells).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..metrics import STORE_BUDGET_LIMIT, STORE_BUDGET_USED
from .base import Incr

logger = logging.getLogger("edgeway.store")

WARN_AT = 0.8
FLUSH_EVERY = 300.0
KEY_TTL_MS = 40 * 86_400_000  # past the end of any month


def month_of(epoch: float) -> str:
    """``YYYY-MM`` of a moment, in UTC."""
    return time.strftime("%Y-%m", time.gmtime(epoch))


class CommandBudget:
    """The month's command count of one store, and what to do past its limit (see the module docstring)."""

    def __init__(self, limit: int, *, on_exhausted: str = "alert", key_prefix: str = "edgeway:", store: str = "redis",
                 clock: Callable[[], float] | None = None, flush_every: float = FLUSH_EVERY) -> None:
        self.limit = limit
        self.on_exhausted = on_exhausted
        self.store = store
        self._prefix = key_prefix
        self._clock = clock or time.time
        self._flush_every = flush_every
        self._flush_at = max(1, limit // 1000)
        self._pending = 0
        self._last_flush = -float("inf")
        self.month = month_of(self._clock())
        self.used: int | None = None
        """The month's total as the store last answered; None until the first increment came back."""
        self._warned = ""
        self._exhausted_logged = ""
        self._used_gauge = STORE_BUDGET_USED.labels(store)
        STORE_BUDGET_LIMIT.labels(store).set(limit)

    def charge(self, sent: int) -> Incr | None:
        """Count ``sent`` commands; the increment to fold into this batch when it is time, else None."""
        self._pending += sent
        now = time.monotonic()
        if self._pending < self._flush_at and now - self._last_flush < self._flush_every:
            return None
        month = month_of(self._clock())
        amount, self._pending, self._last_flush = self._pending + 1, 0, now  # +1: the increment itself
        return Incr(f"{self._prefix}budget:{month}", amount, ttl_ms=KEY_TTL_MS)

    def refund(self, incr: Incr) -> None:
        """The batch carrying ``incr`` failed: count its commands again with the next one."""
        self._pending += incr.amount - 1

    def record(self, incr: Incr, total: object) -> None:
        """The store's answer to ``incr``: the month's total."""
        month = incr.key.rsplit(":", 1)[-1]
        if month < self.month:
            return  # a late answer from the month before
        self.month, self.used = month, int(total)  # type: ignore[call-overload]
        self._used_gauge.set(self.used)
        if self.used >= self.limit * WARN_AT and self._warned != month:
            self._warned = month
            logger.warning("store %s used %d of its %d commands for %s (%d%%)", self.store, self.used, self.limit,
                           month, 100 * self.used // self.limit)
        if self.used >= self.limit and self._exhausted_logged != month:
            self._exhausted_logged = month
            action = ("shared state moves to the next store until the month turns"
                      if self.on_exhausted == "fallback" else "on_budget_exhausted: alert, so nothing changes")
            logger.warning("store %s budget of %d commands for %s is used up: %s", self.store, self.limit, month,
                           action)

    @property
    def exhausted(self) -> bool:
        """Whether this month's count reached the limit (a new month starts from zero)."""
        return self.used is not None and self.used >= self.limit and self.month == month_of(self._clock())

    @property
    def diverting(self) -> bool:
        """Whether to keep the primary out of use: exhausted with ``on_exhausted: fallback``."""
        return self.on_exhausted == "fallback" and self.exhausted

    def status(self) -> dict[str, object]:
        """The month's use, for readyz and status."""
        current = month_of(self._clock())
        used = self.used if self.month == current else 0 if self.used is not None else None
        return {
            "month": current, "used": used, "limit": self.limit,
            "percent": None if used is None else round(100 * used / self.limit, 1),
            "warning": used is not None and used >= self.limit * WARN_AT,
            "exhausted": self.exhausted, "on_exhausted": self.on_exhausted,
            "pending": self._pending,
        }
