"""Rate-limit response fields: draft-ietf-httpapi-ratelimit-headers-11 and the legacy trio.

``RateLimit-Policy: "minute";q=10;w=60, "day";q=100;w=86400`` describes the
quota policies (static per route, so built once); ``RateLimit: "minute";r=3;t=42``
reports the remaining quota and seconds to reset for each policy, per request.
Both are RFC 9651 structured-field Lists whose items are Strings with
Integer parameters. The legacy ``X-RateLimit-Limit/-Remaining/-Reset`` fields
report the most constrained limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .store import LimitState

_WINDOW_NAMES = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}


def policy_name(window_seconds: float) -> str:
    """A readable policy name for a window: ``minute``, ``day``, else ``15m``, ``90s``, ``250ms``."""
    if window_seconds in _WINDOW_NAMES:
        return _WINDOW_NAMES[int(window_seconds)]
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m"), (1, "s")):
        if window_seconds >= size and window_seconds % size == 0:
            return f"{int(window_seconds // size)}{unit}"
    return f"{round(window_seconds * 1000)}ms"


def sf_string(value: str) -> str:
    """Serialize an RFC 9651 String (printable ASCII; quote and backslash escaped)."""
    if any(not 0x20 <= ord(ch) < 0x7F for ch in value):
        raise ValueError(f"a policy name must be printable ASCII: {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True, slots=True)
class HeaderLimit:
    """What the fields need to know about one limit."""

    name: str
    quota: int
    window_seconds: float
    ietf: bool
    legacy: bool


def seconds_ceil(ms: int) -> int:
    """Milliseconds to whole seconds, rounding up (a client that waits this long is never early)."""
    return max(0, math.ceil(ms / 1000))


def seconds_to_wait(state: LimitState) -> int:
    """``t``: for a limit that refused the request, the wait until the same request passes (what
    ``Retry-After`` says, so a client waiting ``t`` is not refused again); otherwise until the reset."""
    if not state.allowed:
        return max(1, seconds_ceil(state.retry_after_ms))
    return seconds_ceil(state.reset_ms)


class RateLimitFields:
    """Builds the response fields for one route's limits; everything static is built once."""

    __slots__ = ("_ietf", "_legacy", "_limits", "policy_field")

    def __init__(self, limits: Sequence[HeaderLimit]) -> None:
        self._limits = tuple(limits)
        items = [
            f"{sf_string(limit.name)};q={limit.quota};w={max(1, math.ceil(limit.window_seconds))}"
            for limit in self._limits
            if limit.ietf
        ]
        self.policy_field: bytes | None = ", ".join(items).encode() if items else None
        # (index, '"minute";r=') for each limit reported in the IETF field
        self._ietf = tuple((i, sf_string(limit.name) + ";r=") for i, limit in enumerate(self._limits) if limit.ietf)
        self._legacy = tuple(i for i, limit in enumerate(self._limits) if limit.legacy)

    def headers(self, states: Sequence[LimitState | None]) -> list[tuple[bytes, bytes]]:
        """Fields for one response; ``states[i]`` is None for a limit skipped on this request."""
        out: list[tuple[bytes, bytes]] = []
        if self.policy_field is not None:
            items = []
            for i, prefix in self._ietf:
                state = states[i]
                if state is not None:
                    items.append(f"{prefix}{state.remaining};t={seconds_to_wait(state)}")
            if items:
                out.append((b"ratelimit-policy", self.policy_field))
                out.append((b"ratelimit", ", ".join(items).encode()))
        if self._legacy:
            legacy = [(self._limits[i], state) for i in self._legacy if (state := states[i]) is not None]
            if legacy:
                limit, state = min(legacy, key=lambda pair: (pair[1].remaining / pair[0].quota, -pair[1].reset_ms))
                out.append((b"x-ratelimit-limit", str(limit.quota).encode()))
                out.append((b"x-ratelimit-remaining", str(state.remaining).encode()))
                out.append((b"x-ratelimit-reset", str(seconds_to_wait(state)).encode()))
        return out
