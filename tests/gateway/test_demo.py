"""`edgeway demo` runs with nothing but the package and shows every policy at work."""

from __future__ import annotations

import io

from edgeway.gateway.demo import run_demo


def test_demo_shows_limits_and_a_protected_route() -> None:
    out = io.StringIO()
    assert run_demo(requests=16, out=out) == 0
    text = out.getvalue()
    assert "rate limited (429)" in text
    assert "without a token: 401 unauthorized" in text
    assert "with a token: 4 allowed of 4; the auth provider was called 1 time(s)" in text
