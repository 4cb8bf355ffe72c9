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
- Responses stream: reading the socket pauses while more than
  ``upstream_connection.HIGH_WATER`` bytes wait for the consumer. Interim 1xx responses are skipped; HEAD, 204
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
import contextlib
import ipaddress
import math
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterable
from typing import Any
from urllib.parse import unquote, urlsplit

from .upstream_connection import Connection, ConnectionClosed, UpstreamError, UpstreamTimeout

__all__ = ["KEEPALIVE", "Pool", "Response", "UpstreamError", "UpstreamTimeout"]

KEEPALIVE = 60.0  # seconds an idle connection is kept (below nginx's 75 s, so the upstream rarely closes first)
DNS_TTL = 60.0  # seconds a host name's addresses are reused
# RFC 9110 §9.2.2: the methods a keep-alive race may replay
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# aiohttp sends Content-Length: 0 for these without a body; some servers answer 411 without it
_BODILESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_HEADER = b": ".join


class Response:
    """One upstream response: ``status``, raw ``headers``, the body through :meth:`read`; :meth:`release` once."""

    __slots__ = ("_conn", "_pool", "headers", "status")

    def __init__(self, pool: Pool, conn: Connection) -> None:
        self._pool = pool
        self._conn: Connection | None = conn
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
        return conn is None or conn.at_end

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
        self._idle: deque[Connection] = deque()
        self._active: set[Connection] = set()
        self._addresses: list[tuple[int, tuple[Any, ...]]] = []
        self._resolved_until = 0.0
        with contextlib.suppress(ValueError):  # an IP literal is its own address, for good
            family = socket.AF_INET6 if ipaddress.ip_address(self._host).version == 6 else socket.AF_INET
            self._addresses, self._resolved_until = [(family, (self._host, port))], math.inf
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
            except ConnectionClosed:
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

    def release(self, conn: Connection) -> None:
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

    def _discard(self, conn: Connection) -> None:
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

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> Connection:
        try:
            async with asyncio.timeout(self._connect_timeout):
                return await self._open(loop)
        except TimeoutError:
            raise UpstreamTimeout(f"no connection to {self._host}:{self._port} within "
                                  f"{self._connect_timeout:g}s") from None
        except OSError as exc:  # refused, unreachable, DNS, TLS (ssl.SSLError is an OSError)
            raise UpstreamError(f"cannot connect to {self._host}:{self._port}: {exc}") from exc

    async def _open(self, loop: asyncio.AbstractEventLoop) -> Connection:
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

    async def _open_one(self, loop: asyncio.AbstractEventLoop, family: int, address: tuple[Any, ...]) -> Connection:
        conn = Connection(loop, self._read_timeout)
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

    async def _resolve(self, loop: asyncio.AbstractEventLoop) -> list[tuple[int, tuple[Any, ...]]]:
        """The upstream's addresses (a name's are kept ``DNS_TTL`` seconds, as aiohttp's ttl_dns_cache did)."""
        if loop.time() < self._resolved_until:
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
            conn.fail(ConnectionClosed("the gateway closed the upstream's pool"))
        self._active.clear()
