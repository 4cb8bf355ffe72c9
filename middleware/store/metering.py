"""What each store of a chain costs: commands sent, batch latency and errors, as metrics.

:class:`~edgeway.middleware.store.failover.FailoverStore` runs every batch of
every store of its chain through :meth:`StoreMeter.run`, so the counts match
what a hosted store bills (Upstash counts each command of a pipeline), or
exceed it by the session revocation checks that Redis answers from the rate
limit's script in the same batch (see ``RateLimit.guard``): an upper bound. Label
children are bound once per store and per command type: nothing is looked up
by label on the request path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ..metrics import STORE_CALL_SECONDS, STORE_COMMANDS, STORE_ERRORS, Increments, tally, timings
from .base import Command, Store, StoreTimeout


class StoreMeter:
    """Metrics of one store: ``run`` a batch through it to count and time it."""

    __slots__ = ("_commands", "_errors", "_seconds", "_timeouts", "kind", "store")

    def __init__(self, store: Store) -> None:
        self.store = store
        self.kind = store.kind
        self._seconds = timings(STORE_CALL_SECONDS.labels(self.kind))
        self._errors = STORE_ERRORS.labels(self.kind, "error")
        self._timeouts = STORE_ERRORS.labels(self.kind, "timeout")
        self._commands: dict[type, Increments] = {}

    def count(self, commands: Sequence[Command]) -> None:
        """Count ``commands`` as sent to this store."""
        children = self._commands
        for command in commands:
            kind = type(command)
            child = children.get(kind)
            if child is None:
                child = children[kind] = tally(STORE_COMMANDS.labels(self.kind, kind.__name__.lower()))
            child.inc()

    async def run(self, commands: Sequence[Command], timeout: float | None) -> list[object]:
        """``store.execute(commands)``, counted and timed; errors are counted and re-raised."""
        self.count(commands)
        started = time.perf_counter()
        try:
            results = await self.store.execute(commands, timeout=timeout)
        except StoreTimeout:
            self._timeouts.inc()
            raise
        except Exception:
            self._errors.inc()
            raise
        self._seconds.observe(time.perf_counter() - started)
        return results
