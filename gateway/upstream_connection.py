"""One HTTP/1.1 connection to an upstream, as an asyncio protocol: the wire half of :mod:`.upstream`.

A connection carries one exchange at a time. :meth:`Connection.send` writes
the request head (and a body held as bytes) in one write, or starts a task
that streams the body while the response is read, and returns once the
response head arrived. The ``httptools`` callbacks fill the exchange's state
(status, raw header pairs, body chunks, completion); the consumer sleeps in
:meth:`Connection.wait` until they change it.

- Framing: llhttp decodes chunked bodies and knows that 1xx, 204 and 304
  responses have none; it cannot be told that the request was HEAD, so the
  head of a HEAD response completes it here. A body with neither length nor
  chunking ends when the upstream closes. Interim 1xx responses are skipped;
  a 101 (never asked for: ``Upgrade`` is hop-by-hop) is an error.
- Flow control: reading the socket pauses while more than ``HIGH_WATER``
  bytes wait for the consumer, and writing a streamed body waits for the
  socket to drain.
- Timeouts: each wait for response bytes (once the request is sent) and each
  wait for the upstream to take request body bytes lasts at most ``timeout``
  (the upstream's ``timeout.read``).
- Keep-alive: only an exchange that ended cleanly (complete response, the
  upstream's keep-alive, the whole request sent, no stray bytes) leaves the
  connection :attr:`~Connection.reusable`; anything else aborts it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from typing import cast

import httptools

__all__ = ["HIGH_WATER", "Connection", "ConnectionClosed", "UpstreamError", "UpstreamTimeout"]

HIGH_WATER = 256 * 1024  # buffered response bytes past which reading the upstream pauses


class UpstreamError(Exception):
    """An exchange with an upstream failed (see the module docstring)."""


class UpstreamTimeout(UpstreamError):
    """Connecting, or waiting for the upstream to send or take bytes, took longer than its timeout."""


class ConnectionClosed(UpstreamError):
    """The upstream closed or reset the connection."""


class Connection(asyncio.Protocol):
    """One upstream connection and the state of its current exchange (one at a time).

    The protocol callbacks fill the state; :meth:`wait` is where the consumer
    sleeps until they change it.
    """

    __slots__ = ("_chunks", "_drain", "_paused", "_writing_paused", "buffered", "closed", "complete",
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
        if self.closed or transport.is_closing():  # uvloop refuses writes to a closing transport
            raise ConnectionClosed("the upstream closed the connection")
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
                if self.closed or transport.is_closing():
                    return
                if chunk:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                    if self._writing_paused:
                        await self._drained()
            if self.closed or transport.is_closing():
                return
            if chunked:
                transport.write(b"0\r\n\r\n")
            self.sent = True
        except UpstreamError as exc:
            self.fail(exc)
        except Exception as exc:  # the body's own source failed (the client left, stalled, sent too much)
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
    def at_end(self) -> bool:
        """The response is complete and every body byte has been read."""
        return self.complete and not self._chunks

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
                self.error = ConnectionClosed(f"the upstream closed the connection{reason}")
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
