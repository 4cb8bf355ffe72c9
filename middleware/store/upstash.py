"""Upstash Redis over its REST API, auto-pipelined into ``POST {url}/pipeline``.

Our own thin client rather than the ``upstash-redis`` SDK: the SDK's async
client has no timeout (``httpx.AsyncClient(timeout=None)``) and sends one HTTP
request per pipeline object, while here every batch submitted during one
event-loop turn shares ONE HTTP request. Requests go through a pooled aiohttp
session (keep-alive), with a hard deadline so nothing can hang.

Bytes: every request asks for ``Upstash-Encoding: base64``, so values read come
back base64-encoded (binary-safe in JSON). JSON cannot carry bytes the other
way, so a command with a bytes argument (a binary ``Set``, a compare-and-delete
of bytes) goes in Upstash's raw-body form, the POST body being its last
argument, in order with the rest of its batch (which then costs one more round
trip per binary command; such batches are deferred cache fills). Notifications: ``PUBLISH`` rides in
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
from collections.abc import Mapping, Sequence
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aiohttp

from .base import Clock, Handler, StoreConfigurationError, StoreError, Subscription
from .notify import Backoff, Fanout, stop
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
        # JSON carries no bytes: a batch holding bytes goes alone, its binary commands in Upstash's
        # raw-body form (the POST body is the command's last argument), in order with the rest
        plain = [batch for batch in batches if not _has_bytes(batch[0])]
        sends = [self._send(plain)] if plain else []
        sends.extend(self._send_ordered(*batch) for batch in batches if _has_bytes(batch[0]))
        for send in sends:
            task = asyncio.get_running_loop().create_task(send)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batches: list[tuple[Sequence[RedisCommand], asyncio.Future[list[object]]]]) -> None:
        body: list[list[object]] = [list(command) for commands, _ in batches for command in commands]
        try:
            replies = await self._pipeline(body)
        except (StoreError, asyncio.CancelledError) as exc:
            _fail([future for _, future in batches], exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        offset = 0
        for commands, future in batches:
            part = replies[offset : offset + len(commands)]
            offset += len(commands)
            if not future.done():
                future.set_result(part)

    async def _send_ordered(self, commands: Sequence[RedisCommand], future: asyncio.Future[list[object]]) -> None:
        replies: list[object] = []
        try:
            run: list[list[object]] = []
            for command in commands:
                if not _has_bytes([command]):
                    run.append(list(command))
                    continue
                if run:
                    replies.extend(await self._pipeline(run))
                    run = []
                replies.append(await self._raw(command))
            if run:
                replies.extend(await self._pipeline(run))
        except (StoreError, asyncio.CancelledError) as exc:
            _fail([future], exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        if not future.done():
            future.set_result(replies)

    async def _pipeline(self, body: list[list[object]]) -> list[object]:
        # the first pipeline loads the scripts ahead of the commands, so a script missing on the server
        # is not retried after the batch's later commands (which would reorder a batch like Incr, Get)
        loads: list[list[object]] = []
        if not self._scripts_loaded:
            loads = [["SCRIPT", "LOAD", script.source] for script in SCRIPTS]
        replies = await self._post(loads + body)
        self._scripts_loaded = not any(isinstance(reply, ReplyError) for reply in replies[: len(loads)])
        replies = replies[len(loads):]
        if any(type(reply) is ReplyError and str(reply).startswith("NOSCRIPT") for reply in replies):
            self._scripts_loaded = False  # flushed or a new server: load them again with the next pipeline
        return replies

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=_HTTP_DEADLINE),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def _request(self, path: str, payload: bytes, headers: dict[str, str]) -> tuple[int, str]:
        try:
            async with self._http().post(f"{self._url}/{path}", data=payload, headers=headers) as response:
                return response.status, await response.text()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise StoreError(f"Upstash request failed: {type(exc).__name__}: {exc}") from exc

    async def _post(self, body: list[list[object]]) -> list[object]:
        payload = json.dumps(body, ensure_ascii=False).encode()
        status, text = await self._request("pipeline", payload, self._headers)
        _check_status(status, text)
        entries = _json(text)
        if not isinstance(entries, list) or len(entries) != len(body):
            raise StoreError(f"Upstash pipeline answer has {_length(entries)} entries for {len(body)} commands")
        return [_reply(entry) for entry in entries]

    async def _raw(self, command: RedisCommand) -> object:
        """One command whose last argument (and only that one) is bytes, sent as the request body."""
        *args, value = command
        assert isinstance(value, bytes) and not _has_bytes([tuple(args)]), "bytes go last, once"
        path = "/".join(quote(str(arg), safe="") for arg in args)
        headers = {**self._headers, "Content-Type": "application/octet-stream"}
        status, text = await self._request(path, value, headers)
        if status != 400:  # 400 is this command's own error, in its {"error": ...} entry
            _check_status(status, text)
        return _reply(_json(text))

    async def close(self) -> None:
        # like a closed TCP connection: requests still in flight fail now rather than hold
        # shutdown for up to _HTTP_DEADLINE (their callers' own timeouts have usually fired)
        tasks = list(self._tasks)
        await asyncio.gather(*(stop(task, "an Upstash request", failing_is_normal=True) for task in tasks))
        if self._session is not None:
            await self._session.close()
            self._session = None


def _has_bytes(commands: Sequence[RedisCommand]) -> bool:
    return any(type(arg) is bytes for command in commands for arg in command)


def _fail(futures: list[asyncio.Future[list[object]]], exc: BaseException) -> None:
    error = exc if isinstance(exc, StoreError) else StoreError("Upstash store closed before answering")
    for future in futures:
        if not future.done():
            future.set_exception(error)


def _check_status(status: int, text: str) -> None:
    if status == 401:
        raise StoreError("Upstash rejected the token (401): check UPSTASH_REDIS_REST_TOKEN")
    if status != 200:
        raise StoreError(f"Upstash answered HTTP {status}: {_error_text(text)}")


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        raise StoreError(f"Upstash answered with invalid JSON: {text[:200]!r}") from None


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
            # its response is closed before the subscription counts as closed
            await stop(self._tasks.pop(channel), f"the Upstash stream of {channel!r}")
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
        """Close every stream and end every subscription made through this store."""
        tasks = list(self._tasks.items())
        self._tasks.clear()
        self._fanout.close_all()
        await asyncio.gather(*(stop(task, f"the Upstash stream of {channel!r}") for channel, task in tasks))
        for confirmed in self._confirmed.values():
            confirmed.set()  # a subscribe() still waiting for its stream returns now
        self._confirmed.clear()
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

    async def memory_usage(self) -> tuple[int, int] | None:
        """Not sampled: Upstash bills every command (an INFO every minute is ~43,000 a month) and its console
        shows the database size."""
        return None

    async def subscribe(self, channel: str, handler: Handler) -> Subscription:
        """Upstash's streaming subscribe endpoint (see the module docstring)."""
        return await self._streams.subscribe(channel, handler)

    async def close(self) -> None:
        await self._streams.close()
        await super().close()
