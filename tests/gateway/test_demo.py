"""`edgeway demo` runs end to end and reports what each policy did."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from edgeway.gateway.demo import run_demo


@pytest.fixture
def quiet_loggers_restored() -> Iterator[None]:
    """run_demo quiets these loggers for its own output; later tests must see them as they were."""
    loggers = [logging.getLogger(name) for name in ("edgeway", "httpx", "uvicorn")]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


@pytest.mark.usefixtures("quiet_loggers_restored")
def test_demo_shows_the_breaker_opening_short_circuiting_probing_and_closing() -> None:
    out = io.StringIO()
    assert run_demo(requests=8, out=out) == 0
    text = out.getvalue()
    assert "3 reached the upstream (503), then the breaker opened: 3 answered by Edgeway without calling it" in text
    assert "one probe went through (200) and closed the breaker: the next 3 requests got 200, 200, 200" in text


@pytest.mark.usefixtures("quiet_loggers_restored")
def test_demo_shows_a_protected_route() -> None:
    out = io.StringIO()
    assert run_demo(requests=16, out=out) == 0
    text = out.getvalue()
    assert "without a token: 401 unauthorized" in text
    assert "with a token: 4 allowed of 4; the auth provider was called 1 time(s)" in text
