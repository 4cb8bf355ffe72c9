"""The two references of the benchmarks: bare reverse proxies on aiohttp, no policies.

Both do what any proxy must and nothing more: forward method, path, query
and headers (minus hop-by-hop fields and ``Host``) to ``$UPSTREAM_URL`` over
one shared :class:`aiohttp.ClientSession` (no cookie jar, no decompression,
no auto-added headers) and stream the response back with the upstream's
status and headers (minus hop-by-hop fields).

- :data:`raw_app`, target ``raw-aiohttp`` ("raw aiohttp forwarding"): a
  pure-ASGI callable, :func:`forward`, with no framework at all; the
  reference for the gateway's proxy hot path.
- :data:`starlette_app`, target ``baseline`` ("a bare Starlette proxy on raw
  aiohttp with no policies"): a :class:`~starlette.applications.Starlette`
  app with one catch-all route whose endpoint, :func:`forward_endpoint`,
  returns a :class:`~starlette.responses.StreamingResponse` over the aiohttp
  response. ``slowapi_proxy.py`` decorates this same endpoint, so
  ``slowapi`` and ``baseline`` differ only by slowapi.

``bench/run.py`` serves them with the same uvicorn settings as ``edgeway serve``::

    UPSTREAM_URL=http://127.0.0.1:9001 uvicorn --app-dir bench baseline_proxy:starlette_app \\
        --loop uvloop --http httptools --no-proxy-headers --no-access-log \\
        --no-server-header --no-date-header
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route
from yarl import URL

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

UPSTREAM = os.environ.get("UPSTREAM_URL", "http://127.0.0.1:9001").rstrip("/")
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
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


def _upstream_request(scope: Scope, body: bytes | None) -> Any:
    """The aiohttp request (an awaitable async context manager) forwarding ``scope`` upstream."""
    target = UPSTREAM + (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    if scope.get("query_string"):
        target += "?" + scope["query_string"].decode("latin-1")
    headers = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in scope["headers"]
        if name.lower() not in _HOP_BY_HOP and name.lower() != b"host"
    ]
    return session().request(scope["method"], URL(target, encoded=True), headers=headers, data=body,
                             allow_redirects=False)


def _has_body(scope: Scope) -> bool:
    return any(name.lower() in (b"content-length", b"transfer-encoding") for name, _ in scope["headers"])


def _response_headers(response: aiohttp.ClientResponse) -> list[tuple[bytes, bytes]]:
    return [(name.lower(), value) for name, value in response.raw_headers if name.lower() not in _HOP_BY_HOP]


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


# raw-aiohttp: pure ASGI.


async def forward(scope: Scope, receive: Receive, send: Send) -> None:
    """Forward one HTTP request to the upstream and stream its response back."""
    body = await _read_body(receive) if _has_body(scope) else None
    async with _upstream_request(scope, body) as response:
        await send({"type": "http.response.start", "status": response.status,
                    "headers": _response_headers(response)})
        async for chunk in response.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The pure-ASGI app: lifespan closes the session; every HTTP request is forwarded."""
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


# baseline: bare Starlette.


async def _stream(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The upstream body as it arrives; the connection goes back to the pool (or is closed) at the end."""
    try:
        async for chunk in response.content.iter_any():
            yield chunk
    finally:
        response.release()


async def forward_endpoint(request: Request) -> StreamingResponse:
    """Every path: forwarded upstream, the response streamed back with the upstream status and headers."""
    body = await request.body() if _has_body(request.scope) else None
    response = await _upstream_request(request.scope, body)
    streaming = StreamingResponse(_stream(response), status_code=response.status)
    streaming.raw_headers = _response_headers(response)  # as received: repeated fields kept
    return streaming


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Close the shared session on shutdown."""
    yield
    await close_session()


starlette_app = Starlette(routes=[Route("/{path:path}", forward_endpoint, methods=METHODS)], lifespan=lifespan)
