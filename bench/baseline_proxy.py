"""Baseline for the benchmarks: a bare pure-ASGI reverse proxy on aiohttp, no policies.

It does what any proxy must and nothing more: forwards method, path, query
and headers (minus hop-by-hop fields and ``Host``) to ``$UPSTREAM_URL`` over
one shared :class:`aiohttp.ClientSession` (no cookie jar, no decompression,
no auto-added headers) and streams the response back. ``bench/run.py`` serves
it with the same uvicorn settings as ``edgeway serve``::

    UPSTREAM_URL=http://127.0.0.1:9001 uvicorn --app-dir bench baseline_proxy:app \
        --loop uvloop --http httptools --no-proxy-headers --no-access-log \
        --no-server-header --no-date-header

:func:`forward` is reused by ``slowapi_proxy.py``, so the two differ only by
slowapi's rate limiting.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
from yarl import URL

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

UPSTREAM = os.environ.get("UPSTREAM_URL", "http://127.0.0.1:9001").rstrip("/")
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade", b"trailer"}
)
_SKIP_AUTO = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})
_session: aiohttp.ClientSession | None = None


def session() -> aiohttp.ClientSession:
    """The one pooled session, created on first use inside the running loop."""
    global _session
    if _session is None:
        _session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=2, sock_read=30),
        )
    return _session


async def close_session() -> None:
    """Close the shared session (lifespan shutdown)."""
    global _session
    if _session is not None:
        await _session.close()
        _session = None


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def forward(scope: Scope, receive: Receive, send: Send) -> None:
    """Forward one HTTP request to the upstream and stream its response back."""
    target = UPSTREAM + (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    if scope.get("query_string"):
        target += "?" + scope["query_string"].decode("latin-1")
    headers = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in scope["headers"]
        if name.lower() not in _HOP_BY_HOP and name.lower() != b"host"
    ]
    has_body = any(name.lower() in (b"content-length", b"transfer-encoding") for name, _ in scope["headers"])
    body = await _read_body(receive) if has_body else None
    async with session().request(
        scope["method"], URL(target, encoded=True), headers=headers, data=body, allow_redirects=False
    ) as response:
        await send({
            "type": "http.response.start",
            "status": response.status,
            "headers": [(k.lower(), v) for k, v in response.raw_headers if k.lower() not in _HOP_BY_HOP],
        })
        async for chunk in response.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI app: lifespan closes the session; every HTTP request is forwarded."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await close_session()
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "http":
        await forward(scope, receive, send)
