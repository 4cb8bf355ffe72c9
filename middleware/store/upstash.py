"""Upstash Redis over its REST API, auto-pipelined into ``POST {url}/pipeline``.

Our own thin client rather than the ``upstash-redis`` SDK: the SDK's async
client has no timeout (``httpx.AsyncClient(timeout=None)``) and sends one HTTP
request per pipeline object, while here every batch submitted during one
event-loop turn shares ONE HTTP request. Requests go through a pooled aiohttp
session (keep-alive), with a hard deadline so nothing can hang.

Bytes: every request asks for ``Upstash-Encoding: base64``, so values read come
back base64-encoded (binary-safe in JSON); binary values are written through
``lua/setbin.lua`` (JSON carries text only). Notifications: ``PUBLISH`` rides in
the pipeline; a subscription is Upstash's streaming ``POST /subscribe/CHANNEL``
(server-sent events), one long-lived response per subscribed channel and store,
reopened with backoff when it breaks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
from collections.abc import Sequence
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aiohttp

from .base import Clock, Handler, StoreConfigurationError, StoreError, Subscription
from .notify import Backoff, Fanout
from .redis_protocol import SCRIPTS, RedisCommand, RedisProtocolStore, ReplyError, Transport

_HTTP_DEADLINE = 10.0  # seconds; the store timeout answers callers long before this
_CONFIRM_WAIT = 1.0  # seconds subscribe() waits for the stream to confirm, while Upstash answers at all

logger = logging.getLogger("edgeway.store")


class UpstashTransport(Transport):
    """Batches commands per event-loop turn into one ``/pipeline`` request."""

    binary_safe = False

    def __init__(self, url: str, token: str) -> None:
        self._url = url.rstrip("/")
        self._headers = {
            "Authorization": f"Bearer {token}", "Content-Type": "application/json", "Upstash-Encoding": "base64",
        }
        self._session: aiohttp.ClientSession | None = None
        self._pending: list[tuple[Sequence[RedisCommand], asyncio.Future[list[object]]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._scripts_loaded = False

    def describe(self) -> str:
        return f"upstash+{self._url}"

    def value_bytes(self, reply: str | bytes) -> bytes:
        # Upstash leaves the status reply "OK" as it is; base64 text never has length 2
        if reply == "OK" or isinstance(reply, bytes):
            return reply.encode() if isinstance(reply, str) else reply
        try:
            return base64.b64decode(reply, validate=True)
        except (binascii.Error, ValueError):
            raise StoreError(f"Upstash sent a value that is not base64: {reply[:40]!r}") from None

    def value_text(self, reply: str | bytes) -> str:
        return self.value_bytes(reply).decode(errors="replace")

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
        # the first pipeline loads the scripts ahead of the commands, so a script missing on the server
        # is not retried after the batch's later commands (which would reorder a batch like Incr, Get)
        loads = [] if self._scripts_loaded else [["SCRIPT", "LOAD", script.source] for script in SCRIPTS]
        try:
            replies = await self._post(loads + body)
        except (StoreError, asyncio.CancelledError) as exc:
            closed = StoreError("Upstash store closed before answering")
            error = exc if isinstance(exc, StoreError) else closed
            for _, future in batches:
                if not future.done():
                    future.set_exception(error)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self._scripts_loaded = not any(isinstance(reply, ReplyError) for reply in replies[: len(loads)])
        replies = replies[len(loads):]
        if any(type(reply) is ReplyError and str(reply).startswith("NOSCRIPT") for reply in replies):
            self._scripts_loaded = False  # flushed or a new server: load them again with the next pipeline
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
            payload = json.dumps(body, ensure_ascii=False).encode()
            async with self._session.post(f"{self._url}/pipeline", data=payload, headers=self._headers) as response:
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


def upstash_location(url: str | None) -> tuple[str, str]:
    """Split ``upstash+https://TOKEN@host`` (or the env pair) into the REST URL and token."""
    if url is None or url in ("upstash://", "upstash+https://"):
        rest = os.environ.get("UPSTASH_REDIS_REST_URL", "")
        token = os.environ.get("UPSTASH_REDIS_REST_TOKEN", "")
        if not rest or not token:
            raise StoreConfigurationError(
                "Upstash needs a URL and token: set UPSTASH_REDIS_REST_URL and UPSTASH_REDIS_REST_TOKEN, "
                "or use upstash+https://TOKEN@your-db.upstash.io"
            )
        return rest, token
    parts = urlsplit(url.removeprefix("upstash+"))
    token = unquote(parts.password or parts.username or "") or os.environ.get("UPSTASH_REDIS_REST_TOKEN", "")
    if not token:
        raise StoreConfigurationError(
            f"no Upstash token for {parts.hostname}: put it in the URL (upstash+https://TOKEN@host) "
            "or set UPSTASH_REDIS_REST_TOKEN"
        )
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")), token


class _Streams:
    """Subscriptions as server-sent-event streams: one reconnecting task per channel of this store."""

    def __init__(self, url: str, token: str) -> None:
        self._url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
        self._fanout = Fanout(self._sync)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._confirmed: dict[str, asyncio.Event] = {}
        self._session: aiohttp.ClientSession | None = None

    async def subscribe(self, channel: str, handler: Handler) -> Subscription:
        subscription = await self._fanout.add(channel, handler)
        confirmed = self._confirmed.get(channel)
        if confirmed is not None and not confirmed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(confirmed.wait(), _CONFIRM_WAIT)
        return subscription

    async def _sync(self) -> None:
        wanted = set(self._fanout.channels)
        for channel in wanted - set(self._tasks):
            self._confirmed[channel] = asyncio.Event()
            self._tasks[channel] = asyncio.get_running_loop().create_task(self._run(channel))
        for channel in set(self._tasks) - wanted:
            self._tasks.pop(channel).cancel()
            self._confirmed.pop(channel, None)

    async def _run(self, channel: str) -> None:
        backoff = Backoff()
        up, failing = False, False
        while True:
            confirmed = self._confirmed[channel]
            try:
                await self._listen(channel, confirmed, backoff)
                error: BaseException = StoreError("stream ended")
            except (TimeoutError, aiohttp.ClientError, StoreError) as exc:
                error = exc
            up = up or confirmed.is_set()
            confirmed.set()  # release waiters: no confirmation can come now
            if up or not failing:
                logger.warning("Upstash subscription to %r lost (%s); reconnecting", channel, error)
            failing, up = True, False
            await backoff.wait()
            self._confirmed[channel] = asyncio.Event()

    async def _listen(self, channel: str, confirmed: asyncio.Event, backoff: Backoff) -> None:
        if self._session is None or self._session.closed:
            # no total deadline: the stream is meant to stay open; connect and reads are bounded
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=_HTTP_DEADLINE),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        url = f"{self._url}/subscribe/{quote(channel, safe='')}"
        async with self._session.post(url, headers=self._headers) as response:
            if response.status != 200:
                raise StoreError(f"Upstash refused the subscription (HTTP {response.status})")
            data: list[str] = []
            message_prefix, subscribe_prefix = f"message,{channel},", f"subscribe,{channel},"
            async for raw in response.content:
                line = raw.decode(errors="replace").rstrip("\r\n")
                if line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                elif not line and data:
                    event, data = "\n".join(data), []
                    # the stream is for one channel, which may itself hold commas: match it whole
                    if event.startswith(message_prefix):
                        self._fanout.dispatch(channel, event[len(message_prefix):])
                    elif event.startswith(subscribe_prefix):
                        confirmed.set()
                        backoff.reset()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None


class UpstashStore(RedisProtocolStore):
    """Upstash REST; same commands and scripts as :class:`~edgeway.middleware.store.redis.RedisStore`."""

    kind = "upstash"
    notifies = True

    def __init__(
        self, url: str | None = None, *, token: str | None = None, timeout: float | None = 0.05,
        clock: Clock | None = None,
    ) -> None:
        if token is not None and url is not None:
            rest = url.removeprefix("upstash+")
        else:
            rest, token = upstash_location(url)
        super().__init__(UpstashTransport(rest, token), timeout=timeout, clock=clock)
        self._streams = _Streams(rest, token)

    async def subscribe(self, channel: str, handler: Handler) -> Subscription:
        """Upstash's streaming subscribe endpoint (see the module docstring)."""
        return await self._streams.subscribe(channel, handler)

    async def close(self) -> None:
        await self._streams.close()
        await super().close()
