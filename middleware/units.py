"""Durations (``250ms``, ``30s``, ``5m``, ``1h``, ``7d``), sizes (``2MB``) and rates (``10/minute``, ``100/15m``).

Parsed once when a policy or middleware is built; the request path only sees numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, ValidationInfo, WithJsonSchema

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}

DURATION_HINT = "a duration such as 250ms, 30s, 5m, 1h or 7d"
RATE_HINT = "a rate such as 10/minute, 5/second, 1000/day or 100/15m"


POLICY_FILE = "policy_file"
"""Validation context flag (``Model.model_validate(data, context={POLICY_FILE: True})``): the values come from a
policy file, where a duration needs a unit."""


def parse_duration(value: object, *, bare_seconds: bool = False) -> float:
    """Seconds from ``250ms``/``30s``/``5m``/``1h``/``7d`` or a ``timedelta``; ``0`` alone needs no unit.

    In a policy file a bare number is refused: ``timeout: 50`` meant 50 ms as often
    as 50 s. In Python (``bare_seconds``) an int or float is seconds, as in httpx
    and asyncio.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected {DURATION_HINT}, got {value!r}")
    if isinstance(value, timedelta):
        value = value.total_seconds()
        bare_seconds = True
    if bare_seconds and isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value!r}")
        return float(value)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if isinstance(value, int | float) or (match and match.group(2) is None):
        number = float(match.group(1)) if match else float(value)  # type: ignore[arg-type]
        if number == 0:
            return 0.0
        shown = match.group(1) if match else f"{value:g}"
        raise ValueError(f"{shown} has no unit: add one, e.g. {shown}ms or {shown}s")
    if match is None:
        raise ValueError(f"expected {DURATION_HINT}, got {value!r}")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from ``512``, ``64KB``, ``2MB`` or ``1MiB``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (match := _SIZE.match(value)):
        return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])
    raise ValueError(f"expected a size such as 512KB or 2MB, got {value!r}")


@dataclass(frozen=True, slots=True)
class Rate:
    """``quota`` units per ``window`` seconds."""

    quota: int
    window: float
    text: str

    @property
    def window_ms(self) -> int:
        return int(self.window * 1000)

    def __str__(self) -> str:
        return self.text

    @classmethod
    def parse(cls, value: object) -> Rate:
        """Parse ``N/second|minute|hour|day`` or ``N/<duration>``, or the ``limits`` library's grammar
        (``10 per minute``, ``5/2 hours``), which users of slowapi and Flask-Limiter already write."""
        if isinstance(value, Rate):
            return value
        if isinstance(value, str) and "/" not in value and " per " in value:
            return cls._from_limits(value)
        if not isinstance(value, str) or "/" not in value:
            raise ValueError(f"expected {RATE_HINT}, got {value!r}")
        count, _, per = (part.strip() for part in value.partition("/"))
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"bad rate {value!r}: the count must be a whole number >= 1 (expected {RATE_HINT})")
        unit = per.lower().removesuffix("s") if per.lower() in {u + "s" for u in _RATE_UNITS} else per.lower()
        if unit in _RATE_UNITS:
            window = float(_RATE_UNITS[unit])
        else:
            try:
                window = parse_duration("1" + per if per in _DURATION_UNITS else per)
            except ValueError:
                return cls._from_limits(value, f"bad rate {value!r}: unknown period {per!r} (expected {RATE_HINT})")
        return cls._checked(int(count), window, value)

    @classmethod
    def _checked(cls, count: int, window: float, value: str) -> Rate:
        if window < 0.001:
            raise ValueError(f"bad rate {value!r}: the period must be at least 1ms")
        return cls(count, window, value.strip())

    @classmethod
    def _from_limits(cls, value: str, message: str | None = None) -> Rate:
        import limits  # only for the forms our own grammar does not take

        try:
            item = limits.parse(value)
        except ValueError:
            raise ValueError(message or f"bad rate {value!r} (expected {RATE_HINT})") from None
        if item.amount < 1:
            raise ValueError(f"bad rate {value!r}: the count must be a whole number >= 1")
        return cls._checked(item.amount, float(item.get_expiry()), value)


def _rate(value: Any) -> Rate:
    return Rate.parse(value)


def validate_duration(value: object, info: ValidationInfo) -> float:
    """A duration field's validator: bare numbers are seconds in Python, refused in a policy file."""
    return parse_duration(value, bare_seconds=not (info.context or {}).get(POLICY_FILE, False))


Duration = Annotated[
    float,
    BeforeValidator(validate_duration),
    WithJsonSchema({"anyOf": [{"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m|h|d)$"}, {"const": 0}],
                    "description": DURATION_HINT + " (a unit is required)"}),
]
"""A duration in seconds, written as ``250ms``, ``30s``, ``5m``, ``1h`` or ``7d``."""

Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema({"type": ["string", "integer"], "description": "a size such as 512KB or 2MB"}),
]

RateField = Annotated[
    Rate,
    BeforeValidator(_rate),
    PlainSerializer(str),
    WithJsonSchema({"type": "string", "pattern": r"^\d+\s*/\s*\S+$", "description": RATE_HINT}),
]
