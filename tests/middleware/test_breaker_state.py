"""The breaker's pure state machine, as tables: (state, event, now) -> (state, result)."""

from __future__ import annotations

import pytest

from edgeway.middleware.breaker_config import BreakerSettings
from edgeway.middleware.breaker_state import Phase, Reason, State, apply, open_duration
from edgeway.middleware.store import BreakerEvent, BreakerRule

RULE = BreakerRule(failures=3, rate_bp=0, window_ms=10_000, min_requests=20, open_ms=60_000, max_open_ms=300_000,
                   success_threshold=1, probe_ms=30_000)
NOW = 1_000_000_000

CLOSED = State(window=NOW // 10_000)
OPEN = State(Phase.OPEN, streak=1, until_ms=NOW + 1_000, window=NOW // 10_000)
OPEN_OVER = State(Phase.OPEN, streak=2, until_ms=NOW, window=NOW // 10_000)
PROBING = State(Phase.HALF_OPEN, streak=1, until_ms=NOW + 5_000, window=NOW // 10_000)

FAIL, OK, ACQUIRE = BreakerEvent(failures=1), BreakerEvent(successes=1), BreakerEvent(acquire=True)

# (name, state before, event, expected phase, granted, reason)
TRANSITIONS = [
    ("closed: a failure counts", CLOSED, FAIL, Phase.CLOSED, True,
     Reason.NONE),
    ("closed: the third failure in a row opens", State(failures=2, window=NOW // 10_000), FAIL, Phase.OPEN, False,
     Reason.FAILURES),
    ("closed: successes then a failure start over", State(failures=2, window=NOW // 10_000),
     BreakerEvent(successes=1, failures=1), Phase.CLOSED, True, Reason.NONE),
    ("open: a late failure changes nothing", OPEN, FAIL, Phase.OPEN, False, Reason.NONE),
    ("open: no token before the time is over", OPEN, ACQUIRE, Phase.OPEN, False, Reason.NONE),
    ("open: the token once it is over", OPEN_OVER, ACQUIRE, Phase.HALF_OPEN, True, Reason.HALF_OPEN),
    ("half-open: a second caller gets no token", PROBING, ACQUIRE, Phase.HALF_OPEN, False, Reason.NONE),
    ("half-open: a non-probe result is ignored", PROBING, OK, Phase.HALF_OPEN, False, Reason.NONE),
    ("half-open: the probe's success closes", PROBING, BreakerEvent(successes=1, probe=True), Phase.CLOSED, True,
     Reason.PROBE_SUCCEEDED),
    ("half-open: the probe's failure reopens", PROBING, BreakerEvent(failures=1, probe=True), Phase.OPEN, False,
     Reason.PROBE_FAILED),
    ("reset closes from any phase", OPEN, BreakerEvent(reset=True), Phase.CLOSED, True, Reason.RESET),
    ("no state + a seed: open as the caller saw it", None,
     BreakerEvent(seed_phase=1, seed_remaining_ms=4_000, seed_streak=2), Phase.OPEN, False, Reason.NONE),
    ("no state, no seed: closed", None, BreakerEvent(), Phase.CLOSED, True, Reason.NONE),
]


@pytest.mark.parametrize(("before", "event", "phase", "granted", "reason"),
                         [t[1:] for t in TRANSITIONS], ids=[t[0] for t in TRANSITIONS])
def test_transitions(before: State | None, event: BreakerEvent, phase: Phase, granted: bool, reason: Reason) -> None:
    after, result = apply(before, RULE, event, NOW)
    assert (after.phase, result.phase, result.granted, result.reason) == (phase, phase, granted, reason)


def test_a_seed_keeps_the_time_left_and_the_streak() -> None:
    after, result = apply(None, RULE, BreakerEvent(seed_phase=1, seed_remaining_ms=4_000, seed_streak=2), NOW)
    assert (after.until_ms, after.streak, result.remaining_ms) == (NOW + 4_000, 2, 4_000)


@pytest.mark.parametrize(("streak", "jitter", "expected"), [
    (1, 0, 60_000), (2, 0, 120_000), (5, 0, 300_000), (9, 0, 300_000), (1, 100, 54_000), (2, 50, 114_000),
])
def test_open_duration_grows_with_the_streak_capped_with_jitter_off_the_top(streak: int, jitter: int,
                                                                              expected: int) -> None:
    assert open_duration(RULE, streak, jitter) == expected


# (previous window total/failed, this window total/failed, ms into this window, trips)
RATES = [
    ((0, 0), (19, 19), 0, False),  # under min_requests
    ((0, 0), (20, 10), 0, True),  # 50% of 20
    ((0, 0), (20, 9), 0, False),
    ((20, 20), (1, 1), 9_999, False),  # the old window has all but faded: ~1 request
    ((20, 20), (10, 1), 5_000, True),  # half the old window + this one: 11 of 20 failed
    ((20, 20), (10, 1), 5_001, False),  # a little under 20 requests weighted
]


@pytest.mark.parametrize(("previous", "current", "into", "trips"), RATES)
def test_failure_rate_over_the_sliding_window(previous: tuple[int, int], current: tuple[int, int], into: int,
                                              trips: bool) -> None:
    rule = RULE._replace(failures=0, rate_bp=5_000)
    window = NOW // 10_000
    # the failure being recorded is part of "current"
    state = State(window=window, total=current[0] - 1, failed=current[1] - 1, previous_total=previous[0],
                  previous_failed=previous[1])
    now = window * 10_000 + into
    after, _ = apply(state, rule, FAIL, now)
    assert (after.phase == Phase.OPEN) is trips


def test_settings_become_the_rule() -> None:
    settings = BreakerSettings(failure_rate="12.5%", window="30s", min_requests=5, open_for="1m", max_open_for="5m",
                               success_threshold=2)
    assert settings.rule(probe_timeout=31.5) == BreakerRule(0, 1250, 30_000, 5, 60_000, 300_000, 2, 31_500)
    assert BreakerSettings().rule(1).failures == 3
    assert BreakerSettings(failures=4, failure_rate=50).rule(1).failures == 4
