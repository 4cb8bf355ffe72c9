"""How many request contexts a run of requests leaves for the cyclic garbage collector."""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable

from edgeway.middleware.context import RequestContext


async def contexts_left(request: Callable[[], Awaitable[object]], times: int = 10) -> int:
    """Run ``request`` ``times`` times with the cyclic collector off; the request contexts still alive then
    (beyond those alive before): each one is a request whose objects only the collector could free."""
    gc.collect()
    before = sum(1 for obj in gc.get_objects() if type(obj) is RequestContext)
    gc.disable()
    try:
        for _ in range(times):
            await request()
        return sum(1 for obj in gc.get_objects() if type(obj) is RequestContext) - before
    finally:
        gc.enable()
