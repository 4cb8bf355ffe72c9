"""`edgeway demo` shows the cache: a repeated AI question answered by the upstream once."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from edgeway.gateway.demo import run_demo


@pytest.fixture
def quiet_loggers_restored() -> Iterator[None]:
    """The demo quiets its loggers for the terminal; put them back for the tests that follow."""
    names = ("edgeway", "httpx", "uvicorn")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.usefixtures("quiet_loggers_restored")
def test_demo_answers_a_repeated_question_from_the_cache() -> None:
    out = io.StringIO()
    assert run_demo(requests=8, out=out) == 0
    text = out.getvalue()
    assert "ask 1: 200  Cache-Status: edgeway; fwd=miss; stored" in text
    assert "ask 5: 200  Cache-Status: edgeway; hit; ttl=" in text
    assert "the upstream answered 1 of 5 asks" in text
