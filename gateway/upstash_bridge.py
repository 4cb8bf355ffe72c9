"""An Upstash-REST-compatible HTTP server over a real Redis, for dev, CI and self-hosting.

Point ``UpstashStore`` (or any Upstash REST client) at it instead of an Upstash
database::

    python -m edgeway.gateway.upstash_bridge --redis redis://127.0.0.1:6379 --token T --port 8079
    curl -H "Authorization: Bearer T" http://127.0.0.1:8079/SET/greeting/hello

The API subset it speaks, as Upstash does:

- ``POST /`` with a command as a JSON array (``["SET","k","v"]``) -> ``{"result": "OK"}``,
  or HTTP 400 ``{"error": "ERR ..."}`` when Redis rejects it;
- ``POST /pipeline`` with an array of commands -> an array of ``{"result": ...}`` or
  ``{"error": ...}`` entries, sent to Redis as ONE pipeline (one round trip);
- ``POST /multi-exec``: the same inside MULTI/EXEC;
- ``GET /COMMAND/arg1/arg2`` (URL-decoded path segments), handy with curl;
- ``POST /COMMAND/arg1`` with a raw body: the body (bytes as they are) is the last argument;
- ``POST`` (or ``GET``) ``/subscribe/CHANNEL``: a server-sent-event stream, as
  Upstash's: ``data: subscribe,CHANNEL,1`` once subscribed, then
  ``data: message,CHANNEL,MESSAGE`` per message published to the channel.

Every request needs ``Authorization: Bearer <token>`` (or ``?_token=<token>``).
Replies are Redis's raw ones (RESP2 shapes, strings decoded as UTF-8), never
redis-py's conveniences: ``SET`` answers ``"OK"``, not ``True``. With the
request header ``Upstash-Encoding: base64`` every string of the answer except
the status ``"OK"`` is base64 of Redis's bytes instead (binary-safe), as Upstash does.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import json
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

__all__ = ["create_bridge_app", "main"]

Arg = str | bytes | int | float


class _BadRequest(Exception):
    """The request body is not a command (or list of commands) we can send."""


def _error_text(exc: RedisError) -> str:
    """The error as Redis sent it (redis-py moves a known prefix like ``NOSCRIPT`` to ``status_code``)."""
    code = getattr(exc, "status_code", None)
    message = str(exc.args[0]) if exc.args else type(exc).__name__
    return f"{code} {message}" if code else message


def _command(value: object) -> list[Arg]:
    if not isinstance(value, list) or not value:
        raise _BadRequest("ERR a command must be a non-empty JSON array, like [\"GET\", \"key\"]")
    for arg in value:
        if isinstance(arg, bool) or not isinstance(arg, str | bytes | int | float):
            raise _BadRequest(f"ERR command arguments must be strings or numbers, not {arg!r}")
    return value


class _Bridge:
    """Holds the token and the lazily created Redis client; one per app."""

    def __init__(self, redis_url: str, token: str) -> None:
        self._redis_url = redis_url
        self._token = token.encode()
        self._client: aioredis.Redis | None = None

    def client(self) -> aioredis.Redis:
        if self._client is None:
            # bytes, decoded per request: as UTF-8 text, or as base64 when the client asks for it
            client = aioredis.Redis.from_url(self._redis_url, protocol=2)
            client.response_callbacks.clear()  # raw replies, as Upstash returns them
            self._client = client
        return self._client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def authorized(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, supplied = header.partition(" ")
        if scheme.lower() != "bearer":
            supplied = request.query_params.get("_token", "")
        return hmac.compare_digest(supplied.strip().encode(), self._token)

    async def run(
        self, commands: Sequence[list[Arg]], *, transaction: bool, encode: Callable[[bytes], str]
    ) -> list[dict[str, Any]]:
        """Send ``commands`` in one pipeline; one ``{"result"}``/``{"error"}`` entry per command."""
        if not commands:
            return []
        pipe = self.client().pipeline(transaction=transaction)
        for command in commands:
            pipe.execute_command(*command)
        replies = await pipe.execute(raise_on_error=False)
        return [
            {"error": _error_text(reply)} if isinstance(reply, RedisError) else {"result": _strings(reply, encode)}
            for reply in replies
        ]

    async def events(self, channel: str) -> AsyncIterator[bytes]:
        """Server-sent events for one channel, on a pub/sub connection of its own."""
        pubsub = self.client().pubsub()
        try:
            await pubsub.subscribe(channel)
            yield _event(f"subscribe,{channel},1")
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None:
                    continue
                if message["type"] == "message":
                    yield _event(f"message,{channel},{_text(message['data'])}")
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]


def _text(value: bytes) -> str:
    return value.decode(errors="replace")


def _base64(value: bytes) -> str:
    return "OK" if value == b"OK" else base64.b64encode(value).decode()


def _strings(reply: object, encode: Callable[[bytes], str]) -> object:
    if isinstance(reply, bytes):
        return encode(reply)
    if isinstance(reply, list):
        return [_strings(item, encode) for item in reply]
    return reply


def _event(data: str) -> bytes:
    return "".join(f"data: {line}\n" for line in data.split("\n")).encode() + b"\n"


def _json(content: object, status: int = 200) -> JSONResponse:
    return JSONResponse(content, status_code=status)


async def _body(request: Request) -> object:
    try:
        return json.loads(await request.body())
    except ValueError as exc:
        raise _BadRequest(f"ERR invalid JSON body: {exc}") from None


def create_bridge_app(redis_url: str, token: str) -> ASGIApp:
    """Build the bridge app; it connects to ``redis_url`` on the first request, not before."""
    if not token:
        raise ValueError("the bridge needs a non-empty token")
    bridge = _Bridge(redis_url, token)

    async def handle(request: Request) -> JSONResponse:
        if not bridge.authorized(request):
            return _json({"error": "Unauthorized"}, 401)
        path = request.url.path.rstrip("/")
        try:
            if request.method == "GET" or path not in ("", "/pipeline", "/multi-exec"):
                raw = request.scope.get("raw_path") or path.encode()  # still percent-encoded: "/" may be data
                parts = raw.decode(errors="replace").split("?", 1)[0].rstrip("/").split("/")[1:]
                args: list[Arg] = [unquote(part) for part in parts] if parts != [""] else []
                if request.method == "POST":
                    args.append(await request.body())  # the raw body is the last argument, bytes as they are
                single, commands = True, [_command(args)]
            elif path in ("/pipeline", "/multi-exec"):
                body = await _body(request)
                if not isinstance(body, list):
                    raise _BadRequest("ERR the body must be a JSON array of commands")
                single, commands = False, [_command(item) for item in body]
            else:
                single, commands = True, [_command(await _body(request))]
            base64_wanted = request.headers.get("upstash-encoding", "").lower() == "base64"
            entries = await bridge.run(
                commands, transaction=path == "/multi-exec", encode=_base64 if base64_wanted else _text
            )
        except _BadRequest as exc:
            return _json({"error": str(exc)}, 400)
        except ResponseError as exc:  # a MULTI/EXEC aborted as a whole (EXECABORT)
            cause = exc.__cause__ if isinstance(exc.__cause__, ResponseError) else exc
            return _json({"error": _error_text(cause)}, 400)
        except (RedisError, OSError) as exc:  # Redis unreachable or timed out
            return _json({"error": f"Redis unavailable: {exc}"}, 503)
        if single:
            return _json(entries[0], 400 if "error" in entries[0] else 200)
        return _json(entries)

    async def subscribe(request: Request) -> Response:
        if not bridge.authorized(request):
            return _json({"error": "Unauthorized"}, 401)
        channel = request.path_params["channel"]  # already percent-decoded
        return StreamingResponse(
            bridge.events(channel), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await bridge.close()

    routes = [
        Route("/", handle, methods=["POST"]),
        Route("/pipeline", handle, methods=["POST"]),
        Route("/multi-exec", handle, methods=["POST"]),
        Route("/subscribe/{channel:path}", subscribe, methods=["GET", "POST"]),
        Route("/{command:path}", handle, methods=["GET", "POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the bridge with uvicorn: ``python -m edgeway.gateway.upstash_bridge --token T``."""
    parser = argparse.ArgumentParser(
        prog="python -m edgeway.gateway.upstash_bridge", description="Upstash-REST-compatible server over Redis"
    )
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    parser.add_argument("--token", default=os.environ.get("UPSTASH_REDIS_REST_TOKEN", ""))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8079)
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("--token (or UPSTASH_REDIS_REST_TOKEN) is required")
    import uvicorn

    uvicorn.run(create_bridge_app(args.redis, args.token), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
