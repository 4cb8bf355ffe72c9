"""TCP Redis (``redis://``, ``rediss://``) over one auto-pipelined RESP connection.

Why not redis-py's asyncio client on the hot path: it costs ~200 us of CPU per
call, more than Redis itself spends. Here every batch submitted during one
event-loop turn goes out in a single write on one connection, and replies are
matched to batches in order (Redis answers a connection strictly in order), so
N concurrent requests cost one syscall each way instead of N. hiredis parses.

Notifications use Redis pub/sub on one more, dedicated connection per store
(a subscribed RESP2 connection can do nothing else), shared by every channel
subscribed through that store; it reconnects with backoff and resubscribes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import parse_qsl, unquote, urlsplit

import hiredis

from .base import Clock, Handler, StoreConfigurationError, StoreError, Subscription
from .notify import Backoff, Fanout, stop
from .opening import SharedOpen
from .redis_protocol import SCRIPTS, RedisCommand, RedisProtocolStore, ReplyError, Transport

_CONNECT_TIMEOUT = 5.0
_CONFIRM_WAIT = 1.0  # seconds subscribe() waits for Redis to confirm, while Redis answers at all

logger = logging.getLogger("edgeway.store")

# TCP keepalive: a peer that vanished without a FIN (host down, NAT dropped the flow) is noticed within
# about IDLE + INTERVAL * COUNT seconds even on an idle connection, instead of the kernel's two hours.
_KEEPALIVE_IDLE, _KEEPALIVE_INTERVAL, _KEEPALIVE_COUNT = 10, 5, 3


def _keepalive(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", _KEEPALIVE_IDLE), ("TCP_KEEPINTVL", _KEEPALIVE_INTERVAL),
                            ("TCP_KEEPCNT", _KEEPALIVE_COUNT)):
            if hasattr(socket, name):  # Linux names; macOS has TCP_KEEPALIVE for idle
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


@dataclass(slots=True)
class _Batch:
    count: int
    future: asyncio.Future[list[object]]
    replies: list[object] = field(default_factory=list)


class _RespProtocol(asyncio.Protocol):
    """One Redis connection: writes are coalesced per loop turn, replies matched FIFO."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader(encoding="utf-8", errors="surrogateescape", replyError=ReplyError)
        self._waiting: collections.deque[_Batch] = collections.deque()
        self._out: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._flush_scheduled = False
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio subclasses

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiting = self._waiting
        while (reply := self._reader.gets()) is not False:
            if not waiting:
                self._fail(StoreError("Redis sent a reply nobody asked for"))
                return
            batch = waiting[0]
            batch.replies.append(reply)
            if len(batch.replies) == batch.count:
                waiting.popleft()
                if not batch.future.done():  # it may have timed out meanwhile
                    batch.future.set_result(batch.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(StoreError(f"Redis connection lost: {exc or 'closed by server'}"))

    def _fail(self, error: StoreError) -> None:
        self.lost = error
        while self._waiting:
            batch = self._waiting.popleft()
            if not batch.future.done():
                batch.future.set_exception(error)
        if self._transport is not None:
            self._transport.close()

    def submit(self, commands: Sequence[RedisCommand], loop: asyncio.AbstractEventLoop) -> asyncio.Future[list[object]]:
        future: asyncio.Future[list[object]] = loop.create_future()
        if self.lost is not None:
            future.set_exception(self.lost)
            return future
        pack = hiredis.pack_command
        for command in commands:
            self._out.append(pack(command))  # type: ignore[arg-type]
        self._waiting.append(_Batch(len(commands), future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._transport is not None and self.lost is None and self._out:
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abandon(self, reason: str) -> None:
        """Fail every waiting batch and drop the connection without waiting for the peer (it may be gone)."""
        error = StoreError(f"Redis connection dropped: {reason}")
        self._fail(error)
        if self._transport is not None:
            self._transport.abort()


_URL_OPTIONS = ("db", "username", "password", "ssl_cert_reqs", "ssl_ca_certs")
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """A parsed ``redis://``, ``rediss://`` or ``unix://`` URL.

    Options in the query: ``db``, ``username``, ``password`` (also in the URL's user part),
    and for ``rediss://`` ``ssl_cert_reqs`` (``required``, the default; ``optional``;
    ``none`` turns verification off) and ``ssl_ca_certs`` (a CA bundle file). Any other
    option is refused rather than silently ignored.
    """

    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: bool
    socket: str | None = None
    cert_reqs: str = "required"
    ca_file: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise StoreConfigurationError(f"not a Redis URL: {url!r} (expected redis://, rediss:// or unix://)")
        shown = _without_password(url)
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(options) - set(_URL_OPTIONS))
        if unknown:
            raise StoreConfigurationError(
                f"unknown option(s) {', '.join(unknown)} in store URL {shown!r}: supported are "
                f"{', '.join(_URL_OPTIONS)}"
            )
        if parts.scheme != "rediss" and any(name.startswith("ssl_") for name in options):
            raise StoreConfigurationError(f"ssl_* options need a rediss:// URL, got {shown!r}")
        cert_reqs = options.get("ssl_cert_reqs", "required").lower()
        if cert_reqs not in _CERT_REQS:
            raise StoreConfigurationError(
                f"bad ssl_cert_reqs {cert_reqs!r} in {shown!r}: expected required, optional or none")
        socket = parts.path if parts.scheme == "unix" else None
        if parts.scheme == "unix" and not socket:
            raise StoreConfigurationError(f"a unix:// URL needs a socket path (unix:///run/redis.sock): {shown!r}")
        path = "" if socket else parts.path.lstrip("/")
        try:
            db = int(options.get("db") or path or 0)
            port = parts.port or 6379
        except ValueError as exc:
            raise StoreConfigurationError(f"bad Redis URL {shown!r}: {exc}") from None
        username = options.get("username") or (unquote(parts.username) if parts.username else None)
        password = options.get("password") or (unquote(parts.password) if parts.password else None)
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=port,
            db=db,
            username=username or None,
            password=password or None,
            tls=parts.scheme == "rediss",
            socket=socket,
            cert_reqs=cert_reqs,
            ca_file=options.get("ssl_ca_certs") or None,
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS settings the URL asks for (verification on unless ``ssl_cert_reqs=none``)."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_reqs != "required":
            context.check_hostname = False
            context.verify_mode = _CERT_REQS[self.cert_reqs]
        return context


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


class RespTransport(Transport):
    """Connects lazily, reconnects after a loss, authenticates and selects the database."""

    def __init__(self, address: RedisAddress, *, connect_timeout: float = _CONNECT_TIMEOUT) -> None:
        self._address = address
        self._connect_timeout = connect_timeout
        self._connection: SharedOpen[_RespProtocol] = SharedOpen(self._open)
        self._pending: set[asyncio.Task[None]] = set()
        self._abandoned: set[asyncio.Future[_RespProtocol]] = set()  # openings recycle() walked away from

    def describe(self) -> str:
        if self._address.socket is not None:
            return f"unix://{self._address.socket}?db={self._address.db}"
        scheme = "rediss" if self._address.tls else "redis"
        return f"{scheme}://{self._address.host}:{self._address.port}/{self._address.db}"

    def submit(self, commands: Sequence[RedisCommand]) -> asyncio.Future[list[object]]:
        loop = asyncio.get_running_loop()
        protocol = self._connection.value
        if protocol is not None and protocol.lost is None:
            return protocol.submit(commands, loop)
        result: asyncio.Future[list[object]] = loop.create_future()
        task = loop.create_task(self._submit_after_connect(commands, result))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return result

    async def _submit_after_connect(
        self, commands: Sequence[RedisCommand], result: asyncio.Future[list[object]]
    ) -> None:
        try:
            protocol = await self._connection.open()
            replies = await protocol.submit(commands, asyncio.get_running_loop())
        except asyncio.CancelledError:
            if not result.done():
                result.set_exception(StoreError("Redis connection closed while connecting"))
            raise
        except Exception as exc:  # every failure must resolve the caller's future, as a StoreError
            if not result.done():
                error = exc if isinstance(exc, StoreError) else StoreError(f"Redis call failed: {exc!r}")
                result.set_exception(error)
            return
        if not result.done():
            result.set_result(replies)

    async def _open(self) -> _RespProtocol:
        address = self._address
        loop = asyncio.get_running_loop()
        try:
            context = address.ssl_context()
            connecting = (loop.create_unix_connection(_RespProtocol, address.socket) if address.socket is not None
                          else loop.create_connection(_RespProtocol, address.host, address.port, ssl=context))
            async with asyncio.timeout(self._connect_timeout):  # not wait_for: see _PubSub._listen
                transport, protocol = await connecting
        except (TimeoutError, OSError) as exc:
            raise StoreError(f"cannot connect to Redis at {self.describe()}: {exc or 'timed out'}") from exc
        if address.socket is None:  # TCP only: a unix socket has no peer that can vanish silently
            _keepalive(transport.get_extra_info("socket"))
        setup: list[RedisCommand] = []
        if address.password is not None:
            auth: RedisCommand = ("AUTH", address.password)
            setup.append(("AUTH", address.username, address.password) if address.username else auth)
        if address.db:
            setup.append(("SELECT", address.db))
        # scripts loaded before any command: a NOSCRIPT retry would run after the batch's later commands
        setup.extend(("SCRIPT", "LOAD", script.source) for script in SCRIPTS)
        if setup:
            # every failure here closes the socket and becomes a StoreError for all who wait on this connect
            try:
                async with asyncio.timeout(self._connect_timeout):
                    replies = await protocol.submit(setup, loop)
            except (TimeoutError, StoreError, OSError) as exc:
                protocol.abandon("connection setup failed")
                raise StoreError(f"Redis at {self.describe()} did not complete AUTH/SELECT: {exc or 'timed out'}"
                                 ) from exc
            except BaseException:
                protocol.abandon("connection setup cancelled")
                raise
            errors = [r for r in replies if isinstance(r, ReplyError)]
            if errors:
                protocol.abandon("connection setup refused")
                raise StoreError(f"Redis refused the connection setup: {errors[0]}")
        return protocol

    def recycle(self) -> None:
        protocol, opening = self._connection.take()
        if protocol is not None:
            protocol.abandon("recycled after a timeout or a server that cannot serve")
        if opening is not None and not opening.done():  # it runs on for its callers; close() still ends it
            self._abandoned.add(opening)
            opening.add_done_callback(self._abandoned.discard)

    async def close(self) -> None:
        """Close the connection and end what is still connecting (callers waiting on it get a StoreError)."""
        protocol, opening = self._connection.take()
        if protocol is not None:
            protocol.close()
        openings = [*self._abandoned, *([opening] if opening is not None else [])]
        self._abandoned.clear()
        work = [task for task in (*openings, *self._pending) if isinstance(task, asyncio.Task)]
        what = f"a connect to Redis at {self.describe()}"
        await asyncio.gather(*(stop(task, what, failing_is_normal=True) for task in work))


class _PubSub:
    """The dedicated subscriber connection: one background task, started by the first subscribe."""

    def __init__(self, address: RedisAddress, where: str) -> None:
        self._address = address
        self._where = where
        self._fanout = Fanout(self._sync)
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._sent: set[str] = set()  # channels SUBSCRIBEd on the current connection
        self._confirmed: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._up = False

    async def subscribe(self, channel: str, handler: Handler) -> Subscription:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if channel not in self._confirmed:
            self._waiters.setdefault(channel, []).append(waiter)
        subscription = await self._fanout.add(channel, handler)
        if channel not in self._confirmed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), _CONFIRM_WAIT)
        return subscription

    async def _sync(self) -> None:
        """Bring the connection's subscriptions in line with the channels wanted."""
        wanted = set(self._fanout.channels)
        if self._writer is None:
            return  # the next connection subscribes to whatever is wanted then
        added, removed = wanted - self._sent, self._sent - wanted
        if added:
            self._writer.write(hiredis.pack_command(("SUBSCRIBE", *sorted(added))))  # type: ignore[arg-type]
        if removed:
            self._writer.write(hiredis.pack_command(("UNSUBSCRIBE", *sorted(removed))))  # type: ignore[arg-type]
            self._confirmed -= removed
        self._sent = wanted

    def _release(self, channel: str | None = None) -> None:
        channels = [channel] if channel is not None else list(self._waiters)
        for name in channels:
            for waiter in self._waiters.pop(name, []):
                if not waiter.done():
                    waiter.set_result(None)

    async def _run(self) -> None:
        backoff = Backoff()
        failing = False
        while True:
            try:
                await self._listen(backoff)
                error: BaseException = StoreError("closed by server")
            except (OSError, TimeoutError, StoreError) as exc:
                error = exc
            finally:
                if self._writer is not None:
                    self._writer.close()
                self._writer, self._sent = None, set()
                self._confirmed.clear()
            self._release()  # nobody waits for a confirmation that cannot come now
            if self._up or not failing:  # once per outage, not once per retry
                logger.warning("Redis subscriber connection to %s lost (%s); reconnecting", self._where, error)
            failing, self._up = True, False
            await backoff.wait()

    async def _listen(self, backoff: Backoff) -> None:
        address = self._address
        context = ssl.create_default_context() if address.tls else None
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation (close())
        # that lands as the connect completes, and the listener would live on
        async with asyncio.timeout(_CONNECT_TIMEOUT):
            reader, writer = await asyncio.open_connection(address.host, address.port, ssl=context)
        self._writer = writer
        _keepalive(writer.get_extra_info("socket"))
        if address.password is not None:
            auth = ("AUTH", address.username, address.password) if address.username else ("AUTH", address.password)
            writer.write(hiredis.pack_command(auth))  # type: ignore[arg-type]
        await self._sync()
        parser = hiredis.Reader(encoding="utf-8", errors="replace", replyError=ReplyError)
        while True:
            data = await reader.read(65536)
            if not data:
                return
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                if isinstance(reply, ReplyError):
                    raise StoreError(f"Redis refused the subscriber connection: {reply}")
                if not isinstance(reply, list) or len(reply) < 3:
                    continue  # +OK of AUTH
                kind, channel = reply[0], str(reply[1])
                if kind == "message":
                    self._fanout.dispatch(channel, str(reply[2]))
                elif kind == "subscribe":
                    self._confirmed.add(channel)
                    self._up = True
                    backoff.reset()
                    self._release(channel)

    async def close(self) -> None:
        """Stop the listener and end every subscription made through this store."""
        task, self._task = self._task, None
        self._fanout.close_all()
        await stop(task, f"the Redis subscriber of {self._where}")
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._sent, self._up = set(), False
        self._confirmed.clear()
        self._release()


class RedisStore(RedisProtocolStore):
    """TCP Redis; ``timeout`` (seconds) bounds each call, ``clock`` overrides the server clock in tests."""

    kind = "redis"
    notifies = True

    def __init__(self, url: str, *, timeout: float | None = 0.05, clock: Clock | None = None,
                 connect_timeout: float = _CONNECT_TIMEOUT) -> None:
        address = RedisAddress.parse(url)
        transport = RespTransport(address, connect_timeout=connect_timeout)
        super().__init__(transport, timeout=timeout, clock=clock)
        self._pubsub = _PubSub(address, transport.describe())

    async def subscribe(self, channel: str, handler: Handler) -> Subscription:
        """Redis pub/sub on this store's dedicated subscriber connection (see the module docstring)."""
        return await self._pubsub.subscribe(channel, handler)

    async def close(self) -> None:
        await self._pubsub.close()
        await super().close()
