"""A clock the test sets by hand: ``clock.now += 61`` moves time without sleeping."""

from __future__ import annotations


class Clock:
    """Callable like ``time.time``; returns ``now``, which the test moves."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
