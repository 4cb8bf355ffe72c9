"""`edgeway check` on breaker blocks: every bad value at its position, with a message that says what to do."""

from __future__ import annotations

import textwrap

import pytest

from edgeway.gateway.errors import PolicyError
from edgeway.gateway.loader import load_text

POLICY = """\
version: 1
upstreams:
  api:
    url: "http://127.0.0.1:9001"
    breaker:
      {breaker}
routes:
  - match: {{ path: /api/* }}
    upstream: api
"""


def problems(breaker: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_text(POLICY.format(breaker=breaker), "p.yaml", {})
    return str(caught.value).splitlines()


def test_every_key_of_the_spec_loads() -> None:
    breaker = textwrap.indent(textwrap.dedent("""\
        failures: 4
        open_for: 30s
        "on": [502, 503, timeout, connect]
        failure_rate: 50%
        window: 20s
        min_requests: 10
        max_open_for: 5m
        success_threshold: 2
        slow_call: 5s
        max_in_flight: 100
        retry: { attempts: 3, backoff: 50ms, max_backoff: 1s, budget: 10%, idempotency_header: Idempotency-Key }
        fallback: { status: 200, body: '{"message": "busy"}', headers: { content-type: application/json } }
    """), "      ").strip()
    settings = load_text(POLICY.format(breaker=breaker), "p.yaml", {}).policy.upstreams["api"].breaker
    assert settings is not None
    assert (settings.failures, settings.open_for, settings.on) == (4, 30.0, (502, 503, "timeout", "connect"))
    assert (settings.failure_rate, settings.window, settings.min_requests) == (50.0, 20.0, 10)
    assert (settings.max_open_for, settings.success_threshold, settings.slow_call) == (300.0, 2, 5.0)
    assert settings.retry is not None and (settings.retry.attempts, settings.retry.budget) == (3, 10.0)
    assert settings.fallback is not None and settings.fallback.status == 200


AT = "p.yaml:6:{col}: upstreams.api.breaker."


@pytest.mark.parametrize(("breaker", "expected"), [
    ("failure_rate: 150%", AT.format(col=21) + "failure_rate: must be between 1% and 100%, got 150%"),
    ("failure_rate: 0.5%", AT.format(col=21) + "failure_rate: must be between 1% and 100%, got 0.5%"),
    ("failure_rate: lots", AT.format(col=21) + "failure_rate: expected a percentage such as 50%, got 'lots'"),
    ("min_requests: 0", AT.format(col=21) + "min_requests: must be at least 1, got 0"),
    ('"on": [502, teapot]',
     AT.format(col=13) + "on: unknown entry 'teapot'; expected 5xx status codes, timeout or connect"),
    ('"on": [404]', AT.format(col=13) + "on: 404 is a client error; 4xx answers never count as upstream failures"),
    ("fallback: { status: 700 }", AT.format(col=27) + "fallback.status: Input should be less than or equal to 599"),
    ("fallback: { status: 99 }",
     AT.format(col=27) + "fallback.status: Input should be greater than or equal to 100"),
])
def test_bad_breaker_values_are_reported_at_their_position(breaker: str, expected: str) -> None:
    assert problems(breaker) == [expected]
