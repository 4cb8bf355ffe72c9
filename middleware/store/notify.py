"""What every backend's notifications share: safe handler calls, subscription bookkeeping, backoff.

A backend keeps one listener (a connection, a stream) per store object, however
many channels are subscribed; :class:`Fanout` maps channels to the handlers of
this process, and :func:`deliver` calls each handler so that a failing one is
logged and never reaches the listener.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from .base import Handler, Subscription

logger = logging.getLogger("edgeway.store")

RETRY_INITIAL = 0.1
RETRY_MAX = 5.0


def deliver(handler: Handler, channel: str, message: str) -> None:
    """Call one handler; its exceptions are logged, never propagated."""
    try:
        handler(message)
    except Exception:
        logger.exception("notification handler for channel %r failed", channel)


class FanoutSubscription(Subscription):
    """One handler on one channel of a :class:`Fanout`."""

    def __init__(self, fanout: Fanout, channel: str, handler: Handler) -> None:
        self.channel = channel
        self.handler = handler
        self._fanout = fanout
        self._closed = False

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._fanout.remove(self)


class Fanout:
    """Channel -> handlers of this process; ``on_change`` runs when the set of channels changes."""

    def __init__(self, on_change: Callable[[], Awaitable[None]] | None = None) -> None:
        self._handlers: dict[str, list[FanoutSubscription]] = {}
        self._on_change = on_change

    @property
    def channels(self) -> list[str]:
        return list(self._handlers)

    async def add(self, channel: str, handler: Handler) -> FanoutSubscription:
        subscription = FanoutSubscription(self, channel, handler)
        new = channel not in self._handlers
        self._handlers.setdefault(channel, []).append(subscription)
        if new and self._on_change is not None:
            await self._on_change()
        return subscription

    async def remove(self, subscription: FanoutSubscription) -> None:
        handlers = self._handlers.get(subscription.channel, [])
        if subscription in handlers:
            handlers.remove(subscription)
        if not handlers and self._handlers.pop(subscription.channel, None) is not None and self._on_change:
            await self._on_change()

    def count(self, channel: str) -> int:
        return len(self._handlers.get(channel, ()))

    def dispatch(self, channel: str, message: str) -> int:
        """Deliver to every handler of ``channel`` now; returns how many there were."""
        handlers = list(self._handlers.get(channel, ()))
        for subscription in handlers:
            deliver(subscription.handler, channel, message)
        return len(handlers)


class Backoff:
    """Exponential backoff with jitter for reconnecting listeners."""

    def __init__(self, initial: float = RETRY_INITIAL, maximum: float = RETRY_MAX) -> None:
        self._initial = initial
        self._maximum = maximum
        self._delay = initial

    def reset(self) -> None:
        self._delay = self._initial

    async def wait(self) -> None:
        await asyncio.sleep(self._delay * random.uniform(0.8, 1.2))
        self._delay = min(self._delay * 2, self._maximum)
