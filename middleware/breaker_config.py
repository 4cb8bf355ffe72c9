"""An upstream's ``breaker:`` block as a validated, frozen model (the YAML keys of SPEC.md).

Used by the policy file (``upstreams.NAME.breaker``) and by
:class:`~edgeway.middleware.breaker.CircuitBreaker` /
``CircuitBreakerMiddleware`` in code, so both accept the same settings.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from .store import BreakerRule
from .units import Duration

__all__ = ["BreakerSettings", "FallbackResponse", "RetrySettings", "parse_percent"]

FailureKind = int | Literal["timeout", "connect"]
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


def parse_percent(value: object) -> object:
    """``50%`` -> 50.0; plain numbers pass through (``50`` means 50%)."""
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            text = text[:-1].strip()
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a percentage such as 50%, got {value!r}") from None
    return value


Percent = Annotated[float, BeforeValidator(parse_percent)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FallbackResponse(_Model):
    """The static answer an open breaker gives instead of a 503."""

    status: int = Field(503, ge=100, le=599, description="HTTP status of the fallback answer (100-599).")
    body: str = Field("", description="Body, sent as UTF-8.")
    headers: dict[str, str] = Field(default_factory=dict, description="Response headers of the fallback answer.")


class RetrySettings(_Model):
    """Retries of idempotent requests in the gateway's proxy, within a budget."""

    attempts: int = Field(2, ge=1, le=10, description="Extra tries after the first (default 2).")
    backoff: Duration = Field(0.1, description="Base of the exponential backoff, with full jitter (default 100ms).")
    max_backoff: Duration = Field(2.0, description="Longest wait between two tries (default 2s).")
    budget: Percent = Field(
        20.0, gt=0, le=100, description="Retries add at most this share of requests over 10 s (default 20%)."
    )
    idempotency_header: str | None = Field(
        None, description="POST/PATCH are retried only when the request carries this header (Idempotency-Key).",
    )


class BreakerSettings(_Model):
    """A circuit breaker on one upstream; every field documents its default."""

    failures: int | None = Field(
        None, ge=1,
        description="Consecutive failures that open it. Default 3; with failure_rate set, off unless given.",
    )
    failure_rate: Percent | None = Field(
        None, description="Open when this share of the window's requests failed (1-100%), past min_requests."
    )
    window: Duration = Field(10.0, description="Rolling window of failure_rate (default 10s).")
    min_requests: int = Field(20, description="Requests the window needs before failure_rate counts (default 20).")
    open_for: Duration = Field(60.0, description="Open time before one probe (default 60s); x n when reopening.")
    max_open_for: Duration = Field(300.0, description="Longest open time (default 300s).")
    success_threshold: int = Field(1, ge=1, description="Probe successes that close it (default 1).")
    on: tuple[FailureKind, ...] = Field(
        (502, 503, 504, "timeout", "connect"),
        description="What counts as a failure: status codes (5xx), timeout (the gateway's 504), "
        "connect (the gateway's 502).",
    )
    slow_call: Duration | None = Field(None, description="Answers slower than this (to the first byte) fail too.")
    max_in_flight: int | None = Field(
        1024, ge=1, description="Requests in flight per instance; past it 503 upstream_overloaded (default 1024)."
    )
    retry: RetrySettings | None = Field(None, description="Retries of idempotent requests (gateway only).")
    fallback: FallbackResponse | None = Field(None, description="Static answer while open, instead of the 503.")

    @field_validator("failure_rate")
    @classmethod
    def _rate(cls, value: float | None) -> float | None:
        if value is not None and not 1 <= value <= 100:  # NaN fails the comparison too
            raise ValueError(f"must be between 1% and 100%, got {value:g}%")
        return value

    @field_validator("min_requests")
    @classmethod
    def _min_requests(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be at least 1, got {value}")
        return value

    @field_validator("on", mode="before")
    @classmethod
    def _on(cls, value: object) -> object:
        if not isinstance(value, list | tuple):
            raise ValueError("expected a list such as [502, 503, 504, timeout, connect]")
        kinds: list[int | str] = []
        for item in value:
            status = item if isinstance(item, int) and not isinstance(item, bool) else None
            if item in ("timeout", "connect") or (status is not None and 500 <= status <= 599):
                kinds.append(item)
            elif status is not None and 400 <= status <= 499:
                raise ValueError(f"{item} is a client error; 4xx answers never count as upstream failures")
            else:
                raise ValueError(f"unknown entry {item!r}; expected 5xx status codes, timeout or connect")
        return tuple(kinds)

    @model_validator(mode="after")
    def _times(self) -> BreakerSettings:
        if self.max_open_for < self.open_for:
            raise ValueError(f"max_open_for ({self.max_open_for:g}s) is shorter than open_for ({self.open_for:g}s)")
        for name in ("window", "open_for"):
            if getattr(self, name) < 0.001:
                raise ValueError(f"{name} must be at least 1ms")
        return self

    @property
    def consecutive(self) -> int:
        """The consecutive-failure threshold in force (0: off)."""
        if self.failures is not None:
            return self.failures
        return 0 if self.failure_rate is not None else 3

    @property
    def statuses(self) -> frozenset[int]:
        """Status codes that count as failures."""
        return frozenset(kind for kind in self.on if isinstance(kind, int))

    def rule(self, probe_timeout: float) -> BreakerRule:
        """The integers the store's breaker command carries."""
        return BreakerRule(
            failures=self.consecutive,
            rate_bp=round(self.failure_rate * 100) if self.failure_rate is not None else 0,
            window_ms=max(1, round(self.window * 1000)),
            min_requests=self.min_requests,
            open_ms=max(1, round(self.open_for * 1000)),
            max_open_ms=max(1, round(self.max_open_for * 1000)),
            success_threshold=self.success_threshold,
            probe_ms=max(1, round(probe_timeout * 1000)),
        )
