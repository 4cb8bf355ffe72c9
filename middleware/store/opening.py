"""Open a connection (or pool) once, on first use, for every concurrent caller."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedOpen(Generic[T]):
    """Concurrent first users share one opening attempt; a failed attempt is retried by the next user.

    ``value`` is the open resource (None until opened, or after :meth:`take`).
    The attempt is shielded: a caller that times out does not cancel it for the others.
    """

    def __init__(self, open_: Callable[[], Awaitable[T]]) -> None:
        self._open = open_
        self.value: T | None = None
        self._opening: asyncio.Future[T] | None = None

    async def open(self) -> T:
        """Open (or join the opening under way) and return the resource."""
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        opening = self._opening
        try:
            return await asyncio.shield(opening)
        finally:
            if opening.done():
                self._opening = None
                if not opening.cancelled() and opening.exception() is None:
                    self.value = opening.result()

    def take(self) -> tuple[T | None, asyncio.Future[T] | None]:
        """Forget the resource, for closing it: (the open value, an opening still under way)."""
        value, opening = self.value, self._opening
        self.value, self._opening = None, None
        return value, opening
