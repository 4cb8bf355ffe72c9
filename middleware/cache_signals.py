"""What cache instances tell each other through the store: "this key was filled" and "purge this".

- Fills: the request holding a key's fill lock publishes the key once its
  entry is written (``{prefix}cache:filled``); requests waiting for that fill
  in any instance wake at once instead of re-reading on a timer. One
  subscription per store and process serves every waiter.
- Purges: :func:`purge` deletes the entries in the shared store (every
  instance sees that at once) and broadcasts the index purges it ran
  (``{prefix}cache:purged``); every other instance runs them again on its own
  store, so copies kept in an instance's memory fallback while the primary was
  down are dropped too.

Stores without notifications (``store.notifies`` False) lose nothing but
speed: waiters re-read with a bounded backoff, and purges reach the shared store only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
import weakref
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING

from .store import Command, IndexPurge, Publish, Store, StoreError

if TYPE_CHECKING:
    from .cache import CachePolicy

logger = logging.getLogger("edgeway.cache")

class Fills:
    """Wakes this process's waiters when any instance announces a fill."""

    def __init__(self, store: Store, channel: str) -> None:
        self.store = store
        self.channel = channel
        self.waiters: dict[str, asyncio.Future[None]] = {}
        self.subscribed: asyncio.Task[bool] | None = None

    def _heard(self, key: str) -> None:
        future = self.waiters.pop(key, None)
        if future is not None and not future.done():
            future.set_result(None)

    async def _subscribe(self) -> bool:
        try:
            await self.store.subscribe(self.channel, self._heard)
        except StoreError:
            return False
        return True

    async def ready(self) -> bool:
        """Whether fills are announced (subscribing on first use); False: re-read with backoff only."""
        if not self.store.notifies:
            return False
        if self.subscribed is None:
            self.subscribed = asyncio.get_running_loop().create_task(self._subscribe())
        return await asyncio.shield(self.subscribed)

    def future(self, key: str) -> asyncio.Future[None]:
        """What a waiter for ``key`` awaits (shared by every waiter of this process)."""
        future = self.waiters.get(key)
        if future is None or future.done():
            future = self.waiters[key] = asyncio.get_running_loop().create_future()
        return future


class Purges:
    """Runs the purges other instances broadcast on this process's store."""

    def __init__(self, store: Store, channel: str) -> None:
        self.store = store
        self.channel = channel
        self.listening = False
        self.id = uuid.uuid4().hex  # this instance's broadcasts come back to it: it skips them
        self._tasks: set[asyncio.Task[None]] = set()
        self._forget: list[weakref.WeakMethod[Callable[[], None]]] = []

    def on_purge(self, forget: Callable[[], None]) -> None:
        """Call ``forget`` (a bound method, held weakly: a replaced policy's cache goes away) on every purge:
        what an instance keeps in memory must go with the store's entries."""
        self._forget = [ref for ref in self._forget if ref() is not None]
        self._forget.append(weakref.WeakMethod(forget))

    def purged(self) -> None:
        """A purge ran (here, or broadcast by another instance): memory copies go."""
        for ref in self._forget:
            forget = ref()
            if forget is not None:
                forget()

    def listen(self) -> None:
        """Subscribe (once, in the background) where the store carries notifications."""
        if self.listening or not self.store.notifies:
            return
        self.listening = True
        self._spawn(self._subscribe())

    async def _subscribe(self) -> None:
        try:
            await self.store.subscribe(self.channel, self._heard)
        except StoreError as error:
            self.listening = False
            logger.warning("cache purges from other instances will not reach this one's memory copies: %s", error)

    def _heard(self, message: str) -> None:
        try:
            data = json.loads(message)
            if data.get("from") == self.id:
                return
            commands: list[Command] = [IndexPurge(str(index), None if label is None else str(label))
                                       for index, label in data["purge"]]
        except (ValueError, TypeError, KeyError, AttributeError):
            logger.warning("ignored a malformed cache purge broadcast: %.200s", message)
            return
        self.purged()
        self._spawn(self._run(commands))

    async def _run(self, commands: list[Command]) -> None:
        try:
            await self.store.execute(commands)
        except StoreError as error:
            logger.warning("a purge broadcast by another instance failed here: %s", error)

    def _spawn(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


_FILLS: weakref.WeakKeyDictionary[Store, dict[str, Fills]] = weakref.WeakKeyDictionary()
_PURGES: weakref.WeakKeyDictionary[Store, dict[str, Purges]] = weakref.WeakKeyDictionary()


def fills(store: Store, channel: str) -> Fills:
    """The fill notifications of ``store`` on ``channel`` (one per store and process)."""
    per_store = _FILLS.setdefault(store, {})
    if channel not in per_store:
        per_store[channel] = Fills(store, channel)
    return per_store[channel]


def purges(store: Store, channel: str) -> Purges:
    """The purge broadcasts of ``store`` on ``channel`` (one per store and process)."""
    per_store = _PURGES.setdefault(store, {})
    if channel not in per_store:
        per_store[channel] = Purges(store, channel)
    return per_store[channel]


def purge_commands(policies: Sequence[CachePolicy], body: object) -> list[IndexPurge]:
    """The index purges a purge request names; ValueError for a body that names nothing."""
    commands: list[IndexPurge] = []
    if not isinstance(body, dict):
        raise ValueError('expected a JSON object: {"all": true}, {"route": ...}, {"tag": ...} or {"url": ...}')
    if body.get("all") is True or isinstance(body.get("route"), str):
        for policy in policies:
            commands.extend(policy.purge_commands(everything=True))
    elif isinstance(body.get("tag"), str) and body["tag"]:
        commands.extend(policies[0].purge_commands(tag=body["tag"]) if policies else ())
    elif isinstance(body.get("url"), str) and body["url"].startswith("/"):
        method = body.get("method", "GET")
        if not isinstance(method, str):
            raise ValueError("method must be a string such as GET")
        path, _, query = body["url"].partition("?")
        for policy in policies:
            commands.extend(policy.purge_commands(url=(method.upper(), path, query.encode())))
    else:
        raise ValueError('expected {"all": true}, {"route": "/api/*"}, {"tag": "ai"} or '
                         '{"url": "/path?query", "method": "GET"}')
    return commands


async def purge(store: Store, policies: Sequence[CachePolicy], body: object) -> dict[str, object]:
    """Run ``POST /_edgeway/cache/purge``: ``{"all": true}``, ``{"route": PATH}``, ``{"tag": T}`` or
    ``{"url": "/path?query", "method": "GET"}`` against the route policies given (those the body names:
    every cached route for ``all``/``tag``, the matching ones for ``route``/``url``).

    Answers ``{"purged": N}`` (entries deleted from the store). Raises ValueError (a 400 for the admin
    API) for a body that names nothing to purge, StoreError when the store cannot be reached.
    """
    commands = purge_commands(policies, body)
    if not commands:
        return {"purged": 0}
    channel = policies[0].purge_channel
    broadcast = json.dumps({"from": purges(store, channel).id, "purge": [[c.index, c.label] for c in commands]})
    batch: list[Command] = [*commands, Publish(channel, broadcast)]
    purges(store, channel).purged()
    results = await store.execute(batch)
    return {"purged": sum(r for r in results[: len(commands)] if isinstance(r, int))}
