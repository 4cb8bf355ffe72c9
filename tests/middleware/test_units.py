"""Durations, sizes and rates as the policy file writes them."""

from __future__ import annotations

import pytest

from edgeway.middleware.units import Rate, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "quota", "window"),
    [
        ("10/minute", 10, 60.0),
        ("10/minutes", 10, 60.0),
        ("5/second", 5, 1.0),
        ("1000/day", 1000, 86400.0),
        ("3/hour", 3, 3600.0),
        ("100/15m", 100, 900.0),
        ("5/s", 5, 1.0),
        ("1/250ms", 1, 0.25),
        ("10 per minute", 10, 60.0),  # the limits library's grammar (slowapi, Flask-Limiter)
        ("5/2 hours", 5, 7200.0),
        ("3 per 15 minutes", 3, 900.0),
    ],
)
def test_rates(text: str, quota: int, window: float) -> None:
    rate = Rate.parse(text)
    assert (rate.quota, rate.window, str(rate)) == (quota, window, text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10/fortnight", "unknown period 'fortnight'"),
        ("x/minute", "the count must be a whole number >= 1"),
        ("0/minute", "the count must be a whole number >= 1"),
        ("10", "expected a rate such as 10/minute"),
        ("10 per eon", "bad rate '10 per eon'"),
    ],
)
def test_bad_rates(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Rate.parse(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("7d", 604800.0), (0, 0.0), ("0", 0.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("value", "message"), [
    (50, "50 has no unit: add one, e.g. 50ms or 50s"),
    ("50", "50 has no unit: add one, e.g. 50ms or 50s"),
    (0.5, "0.5 has no unit: add one, e.g. 0.5ms or 0.5s"),
])
def test_a_duration_without_unit_is_refused_with_a_suggestion(value: object, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(value)
    assert str(caught.value) == message


@pytest.mark.parametrize("text", ["-1s", "soon", True, "5 fortnights"])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(("text", "size"), [("512", 512), ("64KB", 64_000), ("2MB", 2_000_000), ("1MiB", 1 << 20)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_durations_in_python_are_seconds_or_timedeltas_but_a_policy_file_needs_a_unit() -> None:
    from datetime import timedelta

    from pydantic import TypeAdapter, ValidationError

    from edgeway.middleware.units import POLICY_FILE, Duration

    python = TypeAdapter(Duration)
    assert python.validate_python(60) == 60.0
    assert python.validate_python(0.25) == 0.25
    assert python.validate_python(timedelta(minutes=2)) == 120.0
    assert python.validate_python("5m") == 300.0
    with pytest.raises(ValidationError, match="cannot be negative"):
        python.validate_python(-1)
    with pytest.raises(ValidationError, match=r"50 has no unit: add one, e\.g\. 50ms or 50s"):
        python.validate_python(50, context={POLICY_FILE: True})
    assert python.validate_python(timedelta(seconds=3), context={POLICY_FILE: True}) == 3.0
