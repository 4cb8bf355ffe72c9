"""Upstash Redis over its REST API, auto-pipelined into ``POST {url}/pipeline``.

Our own thin client rather than the ``upstash-redis`` SDK: the SDK's async
client has no timeout (``httpx.AsyncClient(timeout=None)``) and sends one HTTP
request per pipeline object, while here every batch submitted during one
event-loop turn shares ONE HTTP request. Requests go through a pooled aiohttp
session (keep-alive), with a hard deadline so nothing can hang.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping, Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp

from .base import Clock, StoreConfigurationError, StoreError
from .redis_protocol import RedisCommand, RedisProtocolStore, ReplyError, Transport

_HTTP_DEADLINE = 10.0  # seconds; the store timeout answers callers long before this


class UpstashTransport(Transport):
    """Batches commands per event-loop turn into one ``/pipeline`` request."""

    def __init__(self, url: str, token: str) -> None:
        self._url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._session: aiohttp.ClientSession | None = None
        self._pending: list[tuple[Sequence[RedisCommand], asyncio.Future[list[object]]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def describe(self) -> str:
        return f"upstash+{self._url}"

    def submit(self, commands: Sequence[RedisCommand]) -> asyncio.Future[list[object]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[object]] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((commands, future))
        return future

    def _flush(self) -> None:
        batches, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batches))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batches: list[tuple[Sequence[RedisCommand], asyncio.Future[list[object]]]]) -> None:
        body: list[list[object]] = [list(command) for commands, _ in batches for command in commands]
        try:
            replies = await self._post(body)
        except (StoreError, asyncio.CancelledError) as exc:
            closed = StoreError("Upstash store closed before answering")
            error = exc if isinstance(exc, StoreError) else closed
            for _, future in batches:
                if not future.done():
                    future.set_exception(error)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        offset = 0
        for commands, future in batches:
            part = replies[offset : offset + len(commands)]
            offset += len(commands)
            if not future.done():
                future.set_result(part)

    async def _post(self, body: list[list[object]]) -> list[object]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=_HTTP_DEADLINE),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        try:
            async with self._session.post(
                f"{self._url}/pipeline", data=json.dumps(body), headers=self._headers
            ) as response:
                text = await response.text()
                status = response.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise StoreError(f"Upstash request failed: {type(exc).__name__}: {exc}") from exc
        if status == 401:
            raise StoreError("Upstash rejected the token (401): check UPSTASH_REDIS_REST_TOKEN")
        if status != 200:
            raise StoreError(f"Upstash answered HTTP {status}: {_error_text(text)}")
        try:
            entries = json.loads(text)
        except ValueError:
            raise StoreError(f"Upstash answered with invalid JSON: {text[:200]!r}") from None
        if not isinstance(entries, list) or len(entries) != len(body):
            raise StoreError(f"Upstash pipeline answer has {_length(entries)} entries for {len(body)} commands")
        return [_reply(entry) for entry in entries]

    async def close(self) -> None:
        # like a closed TCP connection: requests still in flight fail now rather than hold
        # shutdown for up to _HTTP_DEADLINE (their callers' own timeouts have usually fired)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None


def _reply(entry: object) -> object:
    if isinstance(entry, dict):
        if "error" in entry:
            return ReplyError(str(entry["error"]))
        if "result" in entry:
            return entry["result"]
    raise StoreError(f"unexpected Upstash pipeline entry {entry!r}")


def _error_text(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        return text[:200]
    return str(data.get("error", data)) if isinstance(data, dict) else text[:200]


def _length(value: object) -> str:
    return str(len(value)) if isinstance(value, list) else "no"


def upstash_location(url: str | None, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Split ``upstash+https://TOKEN@host`` (or the env pair) into the REST URL and token."""
    env = os.environ if environ is None else environ
    if url is None or url in ("upstash://", "upstash+https://"):
        rest = env.get("UPSTASH_REDIS_REST_URL", "")
        token = env.get("UPSTASH_REDIS_REST_TOKEN", "")
        if not rest or not token:
            raise StoreConfigurationError(
                "Upstash needs a URL and token: set UPSTASH_REDIS_REST_URL and UPSTASH_REDIS_REST_TOKEN, "
                "or use upstash+https://TOKEN@your-db.upstash.io"
            )
        return rest, token
    parts = urlsplit(url.removeprefix("upstash+"))
    token = unquote(parts.password or parts.username or "") or env.get("UPSTASH_REDIS_REST_TOKEN", "")
    if not token:
        raise StoreConfigurationError(
            f"no Upstash token for {parts.hostname}: put it in the URL (upstash+https://TOKEN@host) "
            "or set UPSTASH_REDIS_REST_TOKEN"
        )
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")), token


class UpstashStore(RedisProtocolStore):
    """Upstash REST; same commands and scripts as :class:`~edgeway.middleware.store.redis.RedisStore`."""

    kind = "upstash"

    def __init__(
        self, url: str | None = None, *, token: str | None = None, timeout: float | None = 0.05,
        clock: Clock | None = None,
    ) -> None:
        if token is not None and url is not None:
            rest = url.removeprefix("upstash+")
        else:
            rest, token = upstash_location(url)
        super().__init__(UpstashTransport(rest, token), timeout=timeout, clock=clock)
