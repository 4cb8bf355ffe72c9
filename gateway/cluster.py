"""Instances that share a store talk through its notifications: broadcast reloads and a roll call.

One channel, ``{key_prefix}control``, carries small JSON messages:

- ``{"op": "reload", "from": ID, "req": R}``: every instance re-reads its own
  policy file, then answers ``here``;
- ``{"op": "roll-call", "from": ID, "req": R}``: every instance answers ``here``;
- ``{"op": "here", "req": R, "id": ID, "version": V, "pid": P, "reloaded": bool|null, "problems": [...]}``.

The instance that asked collects the answers to its request for a short while
(until as many instances as heartbeat through the store answered, or
``WAIT`` seconds). Nothing is published while nobody asks: an idle gateway
costs its store no commands for this. Delivery is at most once (see
:class:`~edgeway.middleware.store.base.Publish`), so an answer that never
comes shows as a missing instance, never as a hang.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from typing import TYPE_CHECKING, Any

from edgeway.middleware.store import Publish, StoreError, Subscription
from edgeway.middleware.store.failover import FailoverStore

if TYPE_CHECKING:
    from .app import Gateway

logger = logging.getLogger("edgeway")

WAIT = 1.5
"""Seconds to collect answers to a broadcast or roll call."""


class Cluster:
    """This instance's end of the control channel: answers others, and asks them (see the module docstring)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._subscription: Subscription | None = None
        self._channel = ""
        self._waiting: dict[str, list[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def available(self) -> bool:
        """Whether other instances can be reached (the store carries notifications and we subscribed)."""
        return self._subscription is not None

    async def start(self) -> None:
        store = self.gateway.store
        if not store.notifies:
            return
        self._channel = f"{self.gateway.loaded.policy.store.key_prefix}control"
        try:
            self._subscription = await store.subscribe(self._channel, self._on_message)
        except StoreError as error:
            logger.warning("no control channel (broadcast reload, instance list): %s", error)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._unsubscribe()

    async def _unsubscribe(self) -> None:
        if self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            await subscription.close()

    async def store_changed(self) -> None:
        """A reload brought a different store: listen on the new one (answers in progress carry on)."""
        await self._unsubscribe()
        await self.start()

    # -- answering ------------------------------------------------------------------------------------

    def _on_message(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        op = message.get("op")
        if op == "here":
            answers = self._waiting.get(str(message.get("req")))
            if answers is not None:
                answers.append(message)
        elif op in ("reload", "roll-call") and message.get("from") != self.gateway.instance_id:
            self._spawn(self._answer(str(message.get("req")), reload=op == "reload"))

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, request: str, *, reload: bool) -> None:
        problems = None
        if reload:
            problems = await self.gateway.reload_file() if self.gateway.policy_path else "no policy file to re-read"
        await self._publish(self.here(request, reloaded=None if not reload else problems is None,
                                      problems=problems))

    def here(self, request: str = "", *, reloaded: bool | None = None, problems: str | None = None) -> dict[str, Any]:
        """What this instance says about itself."""
        return {"op": "here", "req": request, "id": self.gateway.instance_id, "version": self.gateway.loaded.version,
                "pid": os.getpid(), "reloaded": reloaded, "problems": problems.splitlines() if problems else []}

    async def _publish(self, message: dict[str, Any]) -> bool:
        try:
            await self.gateway.store.execute([Publish(self._channel, json.dumps(message, separators=(",", ":")))])
        except StoreError as error:
            logger.warning("control channel: could not publish %s: %s", message.get("op"), error)
            return False
        return True

    # -- asking ---------------------------------------------------------------------------------------

    async def ask(self, op: str, *, wait: float = WAIT) -> list[dict[str, Any]]:
        """Send ``op`` (``reload`` or ``roll-call``) to the other instances and return their answers."""
        if self._subscription is None or not isinstance(self.gateway.store, FailoverStore):
            return []  # a lone memory store is never shared: there is nobody else to ask
        request = uuid.uuid4().hex[:12]
        answers: list[dict[str, Any]] = []
        self._waiting[request] = answers
        try:
            if not await self._publish({"op": op, "from": self.gateway.instance_id, "req": request}):
                return []
            store = self.gateway.store
            expected = (store.live_instances - 1) if isinstance(store, FailoverStore) else 0
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and (expected <= 0 or len(answers) < expected):
                await asyncio.sleep(0.02)
        finally:
            del self._waiting[request]
        return sorted(answers, key=lambda answer: str(answer.get("id")))
