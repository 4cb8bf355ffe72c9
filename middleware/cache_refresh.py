"""A request replayed to the app with no client behind it: the background refresh of a stale entry.

``stale_while_revalidate`` answers the client with the stale entry at once; the request that won the
refresh lock then asks the app again here and the cache stores what comes back. The app sees an
ordinary request (the client's method, target, fields and body, plus the entry's validators), never
a disconnect; the response is collected up to ``limit`` bytes within ``timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from .context import SCOPE_KEY, Scope
from .policy import Completed
from .responses import Message

logger = logging.getLogger("edgeway.cache")

ASGIApp = Any


async def collect(app: ASGIApp, scope: Scope, body: bytes, extra_headers: Sequence[tuple[bytes, bytes]], *,
                  limit: int, timeout: float) -> Completed:
    """Call ``app`` with a copy of ``scope`` and ``body``; the response as :class:`Completed`."""
    replay = {key: value for key, value in scope.items() if key != SCOPE_KEY}
    dropped = {b"if-none-match", b"if-modified-since", b"content-length", b"transfer-encoding"}
    fields = [(name, value) for name, value in scope["headers"] if name not in dropped]
    if body:
        fields.append((b"content-length", str(len(body)).encode()))
    replay["headers"] = [*fields, *extra_headers]
    if replay["method"] == "HEAD":
        replay["method"] = "GET"
    sent = False
    status = 0
    headers: Sequence[tuple[bytes, bytes]] = ()
    chunks: list[bytes] | None = []
    size = 0
    complete = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no client to lose: wait until the call ends
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status, headers, chunks, size, complete
        if message["type"] == "http.response.start":
            status, headers = message["status"], message.get("headers", ())
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            size += len(chunk)
            if chunks is not None:
                if size > limit:
                    chunks = None
                elif chunk:
                    chunks.append(chunk)
            complete = not message.get("more_body", False)

    try:
        async with asyncio.timeout(timeout):
            await app(replay, receive, send)
    except TimeoutError:
        logger.warning("cache refresh of %s timed out after %gs", scope["path"], timeout)
        complete = False
    except Exception:  # the app's own failure: log it, keep the stale entry
        logger.exception("cache refresh of %s failed", scope["path"])
        complete = False
    return Completed(status, headers, chunks if complete else None, complete=complete)
