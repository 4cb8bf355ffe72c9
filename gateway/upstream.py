"""Edgeway's HTTP/1.1 client to its upstreams: one keep-alive pool per upstream, bytes in and bytes out.

Why not aiohttp: measured per proxied request, its client machinery (request
and response objects, header multidicts, URL objects, timers, auto headers)
cost more CPU than everything else the proxy does. A proxy needs none of it:
the request head is the client's header bytes joined once, the response is
parsed by ``httptools`` (llhttp, already installed with uvicorn) into raw
byte pairs, and nothing is decoded, decompressed or added on the way.

One exchange::

    response = await pool.request("GET", b"/path?q", [(b"accept", b"*/*")], body)
    try:
        ... response.status, response.headers (raw byte pairs) ...
        while chunk := await response.read(): ...
    finally:
        response.release()   # the connection goes back to the pool only after a clean, complete exchange

- Connections: HTTP/1.1 keep-alive, reused last-in first-out, closed after
  ``KEEPALIVE`` seconds idle; one the upstream closed while idle is dropped.
  The pool never waits for a connection: the proxy's slots (``max_connections``)
  bound how many exchanges run at once, so it opens one when none is idle.
- The keep-alive race: an upstream may close an idle connection just as a
  request goes out on it. A request with no body or a body held as bytes, and
  an idempotent method, that finds its reused connection closed before any
  response byte arrived is sent once more on a new connection (aiohttp, Go and
  nginx do the same).
- Request bodies: none, bytes (``Content-Length``), or an async iterator
  written by a task of its own while the response is read (its length as
  ``Content-Length`` when known, else chunked). Only ``Host`` (and
  ``Content-Length: 0`` for a body-less POST/PUT/PATCH/DELETE, as aiohttp
  sends) is added: no ``User-Agent``, ``Accept``, ``Accept-Encoding`` or ``Expect``.
- Responses stream: reading the socket pauses while more than ``HIGH_WATER``
  bytes wait for the consumer. Interim 1xx responses are skipped; HEAD, 204
  and 304 have no body; a body without length or chunking ends at the close.
- Timeouts: ``connect`` for TCP and TLS set-up; ``read`` for every wait for
  the response head (once the request is sent) and for each wait between body
  reads, and for each wait while the upstream does not accept request body bytes.

Errors (nothing else escapes an exchange but cancellation, which aborts the connection)::

    Exception
     +-- UpstreamError       no connection, DNS failure, reset, a malformed or cut-short response,
          |                  or the request body's own source failed (its exception is the __cause__)
          +-- UpstreamTimeout    connect or read timeout
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterable
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import httptools

__all__ = ["KEEPALIVE", "Pool", "Response", "UpstreamError", "UpstreamTimeout"]

KEEPALIVE = 60.0  # seconds an idle connection is kept (below nginx's 75 s, so the upstream rarely closes first)
DNS_TTL = 60.0  # seconds a host name's addresses are reused
HIGH_WATER = 256 * 1024  # buffered response bytes past which reading the upstream pauses
# RFC 9110 §9.2.2: the methods a keep-alive race may replay
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# aiohttp sends Content-Length: 0 for these without a body; some servers answer 411 without it
_BODILESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_HEADER = b": ".join


class UpstreamError(Exception):
    """An exchange with an upstream failed (see the module docstring)."""


class UpstreamTimeout(UpstreamError):
    """Connecting, or waiting for the upstream to send or take bytes, took longer than its timeout."""


class _Closed(UpstreamError):
    """The upstream closed or reset the connection."""


class _Connection(asyncio.Protocol):
    """One upstream connection and the state of its current exchange (one at a time).

    The protocol callbacks fill the state; :meth:`wait` is where the consumer
    sleeps until they change it.
    """

    __slots__ = ("_chunks", "_drain", "_paused", "_writing_paused", "body_error", "buffered", "closed", "complete",
                 "error", "head_done", "head_request", "headers", "idle_since", "interim", "keep_alive", "loop",
                 "parser", "received", "reused", "sent", "status", "timeout", "transport", "waiter", "writer")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.waiter: asyncio.Future[bool] | None = None  # its result: whether the wait timed out
        self._drain: asyncio.Future[bool] | None = None
        self._paused = False
        self._writing_paused = False
        self.writer: asyncio.Task[None] | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self._chunks: list[bytes] = []
        self.buffered = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.status = 0
        self.head_request = self.head_done = self.complete = self.interim = self.keep_alive = False
        self.received = self.sent = False
        self.error: UpstreamError | None = None
        self.body_error = False

    # ------------------------------------------------------------------ one exchange

    def begin(self, head_request: bool) -> None:
        """Reset the exchange state for a new request."""
        self.parser = httptools.HttpResponseParser(self)
        self.headers = []
        self.head_request = head_request
        self.head_done = self.complete = self.interim = self.keep_alive = self.received = self.sent = False
        self.error = None

    async def send(self, head: bytes, body: bytes | AsyncIterable[bytes] | None, chunked: bool) -> None:
        """Write the request and wait for the response head (``UpstreamError`` if it never comes)."""
        transport = self.transport
        assert transport is not None
        if self.closed:
            raise _Closed("the upstream closed the connection")
        if body is None:
            transport.write(head)
            self.sent = True
        elif isinstance(body, bytes):
            transport.write(head + body)
            self.sent = True
        else:
            transport.write(head)
            self.writer = self.loop.create_task(self._write_body(body, chunked))
        while not self.head_done:
            if self.error is not None:
                raise self.error
            await self.wait(timed=self.sent)  # a streamed upload is bounded by its own write timeout

    async def _write_body(self, body: AsyncIterable[bytes], chunked: bool) -> None:
        transport = self.transport
        assert transport is not None
        try:
            async for chunk in body:
                if self.closed:
                    return
                if chunk:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                    if self._writing_paused:
                        await self._drained()
            if chunked and not self.closed:
                transport.write(b"0\r\n\r\n")
            self.sent = True
        except UpstreamError as exc:
            self.fail(exc)
        except Exception as exc:  # the body's own source failed (the client left, stalled, sent too much)
            self.body_error = True
            error = UpstreamError(f"the request body failed: {type(exc).__name__}")
            error.__cause__ = exc
            self.fail(error)
        finally:
            self._wake()

    async def _drained(self) -> None:
        drain = self._drain = self.loop.create_future()
        handle = self.loop.call_later(self.timeout, _expire, drain)
        try:
            timed_out = await drain
        finally:
            handle.cancel()
            self._drain = None
        if timed_out:
            raise UpstreamTimeout(f"the upstream took no request body bytes for {self.timeout:g}s")

    async def wait(self, *, timed: bool = True) -> None:
        """Sleep until the exchange's state changes; ``UpstreamTimeout`` after ``timeout`` seconds."""
        waiter = self.waiter = self.loop.create_future()
        handle = self.loop.call_later(self.timeout, _expire, waiter) if timed else None
        try:
            timed_out = await waiter
        finally:
            if handle is not None:
                handle.cancel()
            self.waiter = None
        if timed_out:
            raise UpstreamTimeout(f"no response bytes for {self.timeout:g}s")

    async def read(self) -> bytes:
        """Every body byte received so far, waiting for some; b"" once the body is complete."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self.buffered = 0
                if self._paused and not self.closed:
                    self._paused = False
                    assert self.transport is not None
                    self.transport.resume_reading()
                return data
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            await self.wait()

    @property
    def reusable(self) -> bool:
        """Whether the exchange ended cleanly and the connection may carry another one."""
        return self.complete and self.keep_alive and self.sent and self.error is None and not self.closed

    def reset(self) -> None:
        """Forget the finished exchange before the connection goes back to the pool."""
        self.parser = None
        self.reused = True
        if self._chunks:
            self._chunks.clear()
            self.buffered = 0
        if self._paused:
            self._paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        self.writer = None

    def fail(self, error: UpstreamError) -> None:
        """End the exchange with ``error`` (unless the response was already complete) and drop the connection."""
        if self.error is None and not self.complete:
            self.error = error
        self.keep_alive = False
        self.abort()
        self._wake()

    def abort(self) -> None:
        """Close the socket now (unsent bytes are dropped) and stop a body still being written."""
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
        if self.writer is not None and not self.writer.done():
            self.writer.cancel()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:  # bytes while no response is due: the connection can't be trusted any more
            self.abort()
            return
        self.received = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(UpstreamError(f"malformed response: {exc}"))
        except httptools.HttpParserUpgrade:
            pass  # a 101: on_headers_complete set the error
        if self.error is not None:
            self.fail(self.error)
        elif self.complete:
            self.parser = None

    def eof_received(self) -> bool:
        return False  # close our side too: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.parser is not None and not self.complete:
            if self.head_done and self._until_close():
                self.complete = True
                self.keep_alive = False
            elif self.error is None:
                reason = f": {exc}" if exc is not None else ""
                self.error = _Closed(f"the upstream closed the connection{reason}")
        self._wake()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.cancel()
        if self.writer is not None and not self.writer.done():
            self.writer.cancel()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(False)

    def _until_close(self) -> bool:
        """Whether the response's body is delimited by the connection's close (no length, not chunked)."""
        if self.head_request or self.status in (204, 304):
            return False
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
                return False
        return True

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:  # a second response to one request
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value.rstrip(b" \t")))  # llhttp keeps trailing whitespace; h11 refuses it

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        status = self.parser.get_status_code()
        if status == 101:
            self.error = UpstreamError("the upstream switched protocols (101), which was never asked for")
            return
        if 100 <= status < 200:  # interim (100 Continue, 103 Early Hints): the final response follows
            self.interim = True
            self.headers = []
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self.head_done = True
        if self.head_request:  # llhttp can't be told the request was HEAD: the head is the whole response
            self.complete = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:  # body bytes after a HEAD response
            self.keep_alive = False
            return
        self._chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self._paused:
            self._paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.complete = True
        self._wake()


def _expire(future: asyncio.Future[bool]) -> None:
    # a result, not an exception: a waiter cancelled at the same moment must not leave an unretrieved exception
    if not future.done():
        future.set_result(True)


class Response:
    """One upstream response: ``status``, raw ``headers``, the body through :meth:`read`; :meth:`release` once."""

    __slots__ = ("_conn", "_pool", "headers", "status")

    def __init__(self, pool: Pool, conn: _Connection) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self.status = conn.status
        self.headers = conn.headers

    async def read(self) -> bytes:
        """The body bytes received since the last read (waiting for some); b"" at the end.

        Raises :class:`UpstreamError` when the upstream fails mid-body.
        """
        assert self._conn is not None, "read() after release()"
        return await self._conn.read()

    @property
    def done(self) -> bool:
        """The whole body has been read: the next :meth:`read` would return b""."""
        conn = self._conn
        return conn is None or (conn.complete and not conn._chunks)

    def release(self) -> None:
        """Give the connection back (only a cleanly completed exchange keeps it open); idempotent."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            self._pool.release(conn)


class Pool:
    """Keep-alive connections to one upstream (``url``: ``http(s)://host[:port][/base-path]``)."""

    def __init__(self, url: str, *, connect_timeout: float, read_timeout: float,
                 ssl_context: ssl.SSLContext | None = None, keepalive: float = KEEPALIVE) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"an upstream URL must be http(s)://host[:port][/path], got {url!r}")
        https = parts.scheme == "https"
        port = parts.port or (443 if https else 80)
        host = parts.hostname  # lower case, without an IPv6 literal's brackets
        self._host = host if host.isascii() else host.encode("idna").decode("ascii")
        self._port = port
        self._https = https
        self._ssl = ssl_context
        literal = f"[{self._host}]" if ":" in self._host else self._host
        default = 443 if https else 80
        self._host_line = b"Host: " + (literal if port == default else f"{literal}:{port}").encode("ascii")
        # everything after the authority, as written (like joining strings onto the URL did)
        self._prefix = url[len(f"{parts.scheme}://{parts.netloc}"):].encode("latin-1")
        self._auth: bytes | None = None
        if parts.username is not None:  # credentials in the URL: Basic auth for every request, as aiohttp did
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode("latin-1")
            self._auth = b"Basic " + base64.b64encode(pair)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._keepalive = keepalive
        self._idle: deque[_Connection] = deque()
        self._active: set[_Connection] = set()
        self._addresses: list[tuple[Any, ...]] = []
        self._resolved_until = 0.0
        self._prune_handle: asyncio.TimerHandle | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def request(self, method: str, target: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes | AsyncIterable[bytes] | None = None, *, length: int | None = None) -> Response:
        """Send one request (``target``: path and query, after the URL's base path) and return the response
        once its head arrived. ``length``: a streamed body's length, when known."""
        loop = self._loop or self._bind()
        chunked = False
        if body is None:
            framing = b"" if method in _BODILESS else b"Content-Length: 0\r\n"
        elif isinstance(body, bytes):
            framing = b"Content-Length: %d\r\n" % len(body)
        elif length is not None:
            framing = b"Content-Length: %d\r\n" % length
        else:
            framing, chunked = b"Transfer-Encoding: chunked\r\n", True
        if self._auth is not None:
            headers = [pair for pair in headers if pair[0].lower() != b"authorization"]
            headers.append((b"Authorization", self._auth))
        lines = [b"%b %b%b HTTP/1.1" % (method.encode("latin-1"), self._prefix, target), self._host_line]
        lines.extend(map(_HEADER, headers))
        head = b"\r\n".join(lines) + b"\r\n" + framing + b"\r\n"
        replayable = (body is None or isinstance(body, bytes)) and method in _IDEMPOTENT
        idle = self._idle
        conn = None
        while idle:
            candidate = idle.pop()
            if not candidate.closed:
                conn = candidate
                break
        if conn is None:
            conn = await self._connect(loop)
        while True:
            self._active.add(conn)
            conn.begin(method == "HEAD")
            try:
                await conn.send(head, body, chunked)
            except _Closed:
                self._discard(conn)
                if not (conn.reused and not conn.received and replayable):
                    raise
                conn = await self._connect(loop)  # the keep-alive race: once, on a new connection
                replayable = False
                continue
            except BaseException:
                self._discard(conn)
                raise
            return Response(self, conn)

    def release(self, conn: _Connection) -> None:
        """Take a connection back after an exchange: pooled when reusable, else closed."""
        self._active.discard(conn)
        if conn.reusable and not self._closed:
            conn.reset()
            conn.idle_since = conn.loop.time()
            self._idle.append(conn)
            if self._prune_handle is None:
                self._prune_handle = conn.loop.call_later(self._keepalive, self._prune)
        else:
            conn.abort()

    def _discard(self, conn: _Connection) -> None:
        self._active.discard(conn)
        conn.abort()

    def _bind(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    def _prune(self) -> None:
        """Close connections idle for ``keepalive`` seconds (the oldest are on the left)."""
        self._prune_handle = None
        assert self._loop is not None
        now = self._loop.time()
        idle = self._idle
        while idle and (idle[0].closed or now - idle[0].idle_since >= self._keepalive):
            idle.popleft().abort()
        if idle:
            self._prune_handle = self._loop.call_at(idle[0].idle_since + self._keepalive, self._prune)

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        try:
            async with asyncio.timeout(self._connect_timeout):
                return await self._open(loop)
        except TimeoutError:
            raise UpstreamTimeout(f"no connection to {self._host}:{self._port} within "
                                  f"{self._connect_timeout:g}s") from None
        except OSError as exc:  # refused, unreachable, DNS, TLS (ssl.SSLError is an OSError)
            raise UpstreamError(f"cannot connect to {self._host}:{self._port}: {exc}") from exc

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        """A new connection: each of the upstream's addresses in turn."""
        error: OSError | None = None
        for family, address in await self._resolve(loop):
            try:
                conn = await self._open_one(loop, family, address)
            except OSError as exc:
                error = exc
                continue
            if self._closed:
                conn.abort()
                raise UpstreamError("the upstream's pool is closed")
            return conn
        assert error is not None
        raise error

    async def _open_one(self, loop: asyncio.AbstractEventLoop, family: int, address: tuple[Any, ...]) -> _Connection:
        conn = _Connection(loop, self._read_timeout)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
            if self._https:
                context = self._ssl = self._ssl or ssl.create_default_context()
                await loop.create_connection(lambda: conn, sock=sock, ssl=context, server_hostname=self._host)
            else:
                await loop.create_connection(lambda: conn, sock=sock)
        except BaseException:
            sock.close()
            raise
        return conn

    async def _resolve(self, loop: asyncio.AbstractEventLoop) -> list[tuple[Any, ...]]:
        """The upstream's addresses (cached ``DNS_TTL`` seconds; an IP literal is its own)."""
        if self._addresses and loop.time() < self._resolved_until:
            return self._addresses
        try:
            infos = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_ADDRCONFIG)
        except socket.gaierror as exc:
            raise OSError(f"cannot resolve {self._host}: {exc}") from exc
        self._addresses = [(family, address) for family, _, _, _, address in infos]
        self._resolved_until = loop.time() + DNS_TTL
        if not self._addresses:
            raise OSError(f"{self._host} has no address")
        return self._addresses

    async def close(self) -> None:
        """Close every connection, idle or in use; later releases close theirs."""
        self._closed = True
        if self._prune_handle is not None:
            self._prune_handle.cancel()
            self._prune_handle = None
        while self._idle:
            self._idle.pop().abort()
        for conn in list(self._active):
            conn.fail(_Closed("the gateway closed the upstream's pool"))
        self._active.clear()
