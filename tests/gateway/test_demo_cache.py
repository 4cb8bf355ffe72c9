"""`edgeway demo` shows the cache: a repeated AI question answered by the upstream once."""

from __future__ import annotations

import io

from edgeway.gateway.demo import run_demo


def test_demo_answers_a_repeated_question_from_the_cache() -> None:
    out = io.StringIO()
    assert run_demo(requests=8, out=out) == 0
    text = out.getvalue()
    assert "ask 1: 200  Cache-Status: edgeway; fwd=miss; stored" in text
    assert "ask 5: 200  Cache-Status: edgeway; hit; ttl=" in text
    assert "the upstream answered 1 of 5 asks" in text
