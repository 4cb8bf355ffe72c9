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
from typing import Any

from .base import Handler, Subscription

logger = logging.getLogger("edgeway.store")

RETRY_INITIAL = 0.1
RETRY_MAX = 5.0
STOP_WAIT = 2.0  # seconds close() waits for a cancelled listener before giving up on it (and saying so)


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

    def _end(self) -> None:
        self._closed = True  # the store closed: its listener is gone, closing later has nothing to do


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

    def close_all(self) -> None:
        """End every subscription, as closing the store does: no handler is called again, and a later
        ``close()`` of one of them does nothing (it must not restart a listener of a closed store)."""
        for subscriptions in self._handlers.values():
            for subscription in subscriptions:
                subscription._end()
        self._handlers.clear()

    def count(self, channel: str) -> int:
        return len(self._handlers.get(channel, ()))

    def dispatch(self, channel: str, message: str) -> int:
        """Deliver to every handler of ``channel`` now; returns how many there were."""
        handlers = list(self._handlers.get(channel, ()))
        for subscription in handlers:
            deliver(subscription.handler, channel, message)
        return len(handlers)


async def stop(task: asyncio.Task[Any] | None, what: str, *, wait: float = STOP_WAIT,
               failing_is_normal: bool = False) -> None:
    """Cancel a background task and wait, at most ``wait`` seconds, until it has ended.

    The cancellation is repeated while waiting: one can be swallowed (Python 3.11's
    ``asyncio.wait_for`` returns the result of a connect that completes as the cancellation
    lands), and a listener that lives on would hold its store's ``close()`` forever. The task's
    exception is retrieved (logged unless ``failing_is_normal``), so none is reported unretrieved.
    """
    if task is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    try:
        while not task.done():
            task.cancel()
            left = deadline - loop.time()
            if left <= 0:
                logger.error("%s did not stop within %gs of being cancelled; left behind", what, wait)
                return
            await asyncio.wait((task,), timeout=min(left, 0.05))
    except asyncio.CancelledError:
        task.cancel()  # the caller gave up waiting, not on stopping the task
        raise
    if not task.cancelled() and (error := task.exception()) is not None and not failing_is_normal:
        logger.error("%s failed before it was stopped", what, exc_info=error)


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
