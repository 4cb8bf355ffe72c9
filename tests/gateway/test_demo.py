"""`edgeway demo` runs with nothing but the package and shows every policy at work."""

from __future__ import annotations

import io
import logging

from edgeway.gateway.demo import run_demo


def test_demo_shows_limits_and_a_protected_route() -> None:
    loggers = [logging.getLogger(name) for name in ("edgeway", "httpx", "uvicorn")]
    levels = [logger.level for logger in loggers]
    out = io.StringIO()
    try:
        assert run_demo(requests=16, out=out) == 0
    finally:  # the demo quiets these loggers for its output; later tests need them as they were
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    text = out.getvalue()
    assert "rate limited (429)" in text
    assert "without a token: 401 unauthorized" in text
    assert "with a token: 4 allowed of 4; the auth provider was called 1 time(s)" in text
