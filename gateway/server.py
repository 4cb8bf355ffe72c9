"""The client-facing HTTP/1.1 server: uvicorn's protocols with the limits an edge needs.

uvicorn's own protocols have no timeout for a slowly sent request head, no
header size or count limit under httptools, pass chunked trailers on as
request headers, read an absolute-form target (``GET http://host/x``) as
``/x`` and drop a request pipelined after an ``Upgrade:`` one. These
subclasses add, per connection, from the policy's ``server:`` block
(:class:`~edgeway.gateway.config.ServerConfig`, read when the connection opens,
so a reload applies to new connections):

- ``header_timeout``: a request head must arrive whole within it (408, close);
- ``keepalive_timeout``: idle keep-alive connections close after it;
- ``max_connections``: past it a new connection gets 503 and is closed;
- ``max_header_bytes`` / ``max_headers``: 431 before anything is forwarded;
- trailer fields are dropped (nginx and Envoy do the same);
- only origin-form targets (``/path``) and HTTP/1.0 or 1.1 are served (400 / 505);
- a response's head goes out in one socket write with its first body chunk when that follows at
  once (:mod:`~edgeway.gateway.coalesce`; never later than the next event-loop turn).

Every refusal is a JSON body with ``error`` and ``Edgeway-Error``, then the
connection closes. ``edgeway serve`` uses these classes (``--http`` picks the
parser); :func:`uvicorn_options` is what it passes to uvicorn, and what the
tests serve with.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import h11
import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from edgeway.middleware.pipeline import Throttled
from edgeway.middleware.policy import Answer
from edgeway.middleware.responses import Response

from .coalesce import CoalescingWriter
from .config import ServerConfig

logger = logging.getLogger("edgeway.server")

PROTOCOLS = {
    "httptools": "edgeway.gateway.server:EdgeHttpToolsProtocol",
    "h11": "edgeway.gateway.server:EdgeH11Protocol",
}
_DEFAULT = ServerConfig()
_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large",
            503: b"Service Unavailable", 505: b"HTTP Version Not Supported"}
_CODES = {400: "bad_request", 408: "request_timeout", 431: "headers_too_large", 503: "server_overloaded",
          505: "http_version_not_supported"}
_full = Throttled()


def uvicorn_options(http: str = "httptools") -> dict[str, Any]:
    """The uvicorn settings of ``edgeway serve`` (besides app, host, port, workers and logging)."""
    return {
        "http": PROTOCOLS[http],
        "lifespan": "on",
        "proxy_headers": False,  # Edgeway's trusted_proxies decides who may set forwarding headers
        "server_header": False,
        "date_header": False,  # the upstream's Date passes through; no second one
    }


def error_bytes(status: int, message: str) -> bytes:
    """A complete JSON error response that closes the connection, written before any ASGI app runs."""
    code = _CODES[status]
    body = json.dumps({"error": code, "message": message}, separators=(",", ":")).encode()
    return b"".join([
        b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status]),
        b"content-type: application/json\r\ncache-control: no-store\r\nconnection: close\r\n",
        b"edgeway-error: %s\r\ncontent-length: %d\r\n\r\n" % (code.encode(), len(body)),
        body,
    ])


def settings_of(config: Config) -> ServerConfig:
    """The running policy's ``server:`` settings (the gateway may sit inside uvicorn's wrappers)."""
    app: Any = config.loaded_app
    for _ in range(8):
        settings = getattr(app, "server_settings", None)
        if isinstance(settings, ServerConfig):
            return settings
        app = getattr(app, "app", None)
        if app is None:
            break
    return _DEFAULT


class _Refusal(Exception):
    """Raised inside a parser callback to stop parsing; the protocol answers ``status`` and closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _EdgeLimits(asyncio.Protocol):
    """What both protocols add: the head timer, the connection cap and refusals."""

    settings: ServerConfig
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    connections: set[Any]
    cycle: Any
    _head_timer: asyncio.TimerHandle | None
    _writer: CoalescingWriter

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._writer = CoalescingWriter(self.transport, self.loop)
        self._admit()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._writer.discard()
        super().connection_lost(exc)

    # Request cycles write through self._writer; everything the protocol itself writes, closes or
    # decides from here on must come after what the writer holds
    def _adopt_cycle(self) -> None:
        """Hand the newest request cycle the coalescing writer instead of the raw transport."""
        cycle = self.cycle
        if cycle is not None and cycle.transport is self.transport:
            cycle.transport = self._writer

    def data_received(self, data: bytes) -> None:
        self._writer.flush()
        super().data_received(data)

    def eof_received(self) -> None:
        self._writer.flush()
        super().eof_received()

    def pause_writing(self) -> None:
        self._writer.flush()
        super().pause_writing()

    def timeout_keep_alive_handler(self) -> None:
        self._writer.flush()
        super().timeout_keep_alive_handler()  # type: ignore[misc]

    def shutdown(self) -> None:
        self._writer.flush()
        super().shutdown()  # type: ignore[misc]

    def _admit(self) -> bool:
        """Called once the connection is made: False (and a 503) when the process has too many."""
        if len(self.connections) > self.settings.max_connections:
            _full.warning("more than %d client connections: refusing new ones (server.max_connections)",
                          self.settings.max_connections)
            self._refuse(503, f"more than {self.settings.max_connections} connections: try again shortly")
            return False
        self._arm_head_timer()
        return True

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.settings.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self._refuse(408, f"the request head did not arrive within {self.settings.header_timeout:g}s")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` unless a response is already under way, then close the connection."""
        self._cancel_head_timer()
        self._writer.flush()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(error_bytes(status, message))
        self.transport.close()


def answer_bytes(answer: Answer, *, head: bool, keep_alive: bool) -> bytes:
    """``answer`` as one HTTP/1.1 response, framed as uvicorn frames it (lower-case names, ``connection:
    close`` when the connection ends), with a ``content-length`` when the answer has none (its body is
    whole: it never needs chunking). ``head``: the response to a HEAD request (no body)."""
    status = answer.status
    lines = [_status_line(status)]
    length = close = False
    for name, value in answer.headers:
        name = name.lower()
        if name == b"content-length":
            length = True
        elif name == b"connection" and b"close" in value.lower():
            close = True
        lines.append(b"%s: %s\r\n" % (name, value))
    bodiless = status in (204, 304) or status < 200
    chunks = answer.chunks
    if not length and not bodiless:
        lines.append(b"content-length: %d\r\n" % sum(len(chunk) for chunk in chunks))
    if not keep_alive and not close:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    if not head and not bodiless:
        lines.extend(chunks)
    return b"".join(lines)


_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    return line


class EdgeHttpToolsProtocol(_EdgeLimits, HttpToolsProtocol):
    """uvicorn's httptools protocol with the edge limits (see the module docstring), and the gateway's
    fast path: a bodiless request the gateway can answer from memory (a hot cache entry,
    :meth:`~edgeway.gateway.app.Gateway.answer_now`) is answered right here, with no ASGI task."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.settings = settings_of(config)
        self.timeout_keep_alive = self.settings.keepalive_timeout  # type: ignore[assignment]
        self._head_timer = None
        self._in_head = False
        self._head_bytes = 0  # bytes fed while the head is incomplete (bounds what httptools buffers)
        self._head_size = 0  # exact size of the request line and fields seen so far
        self._fields = 0
        self._refusal: _Refusal | None = None
        # the gateway itself, unwrapped (a wrapper would be skipped by the fast path): then its answer_now
        self._answer_now: Callable[[Any], Answer | None] | None = getattr(config.loaded_app, "answer_now", None)
        self._answered = False  # the current request was answered by the fast path

    def _new_parser(self) -> httptools.HttpRequestParser:
        parser = httptools.HttpRequestParser(self)
        parser.set_dangerous_leniencies(lenient_data_after_close=True)
        return parser

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, msg)

    def data_received(self, data: bytes) -> None:
        self._writer.flush()
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            refusal = self._refusal or _Refusal(400, "invalid HTTP request")
            self._refusal = None
            self._refuse(refusal.status, refusal.message)
            return
        except httptools.HttpParserError as exc:
            self._refuse(400, f"invalid HTTP request: {exc}")
            return
        except httptools.HttpParserUpgrade as exc:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
                return
            # any other Upgrade is refused by not answering 101 (Upgrade is hop-by-hop and never forwarded): the
            # request was an ordinary one, and whatever was pipelined after it is the next request
            offset = int(exc.args[0]) if exc.args else len(data)
            self.parser = self._new_parser()
            if offset < len(data):
                self.data_received(data[offset:])
            return
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.settings.max_header_bytes:
                self._refuse(431, f"the request head is over {self.settings.max_header_bytes} bytes")
            else:
                # armed only for a head left incomplete: a request arriving whole costs no timer
                self._arm_head_timer()

    def _stop(self, status: int, message: str) -> None:
        self._refusal = _Refusal(status, message)
        raise self._refusal

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = self._head_size = self._fields = 0

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        if self._head_size > self.settings.max_header_bytes:
            self._stop(431, f"the request head is over {self.settings.max_header_bytes} bytes")
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.settings.max_header_bytes:
            self._stop(431, f"the request head is over {self.settings.max_header_bytes} bytes")
        if not self._in_head:
            return  # a chunked trailer field: never a request header
        self._fields += 1
        if self._fields > self.settings.max_headers:
            self._stop(431, f"more than {self.settings.max_headers} header fields")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        version = self.parser.get_http_version()
        if version not in ("1.1", "1.0"):
            if version == "0.9":
                self._stop(400, "a request line needs an HTTP version (HTTP/1.1)")
            self._stop(505, f"HTTP/{version} is not supported: use HTTP/1.1")
        if self.url[:1] != b"/":
            self._stop(400, "absolute-form or malformed request target: send a path such as /api/x")
        self._head_size = 0  # from here it counts trailer bytes
        if self._answer_now is not None and self._answer_at_once():
            return
        super().on_headers_complete()
        self._adopt_cycle()

    def _answer_at_once(self) -> bool:
        """Answer from memory when the gateway can (see :func:`answer_bytes`); False: run the ASGI app."""
        cycle = self.cycle
        if (cycle is not None and not cycle.response_complete) or self.flow.write_paused or self.transport.is_closing():
            return False  # a pipelined request waits for the one before it; a slow reader gets flow control
        parser = self.parser
        method = parser.get_method()
        if method != b"GET" and method != b"HEAD":
            return False
        for name, value in self.headers:
            if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
                return False  # a body follows: the normal path reads (or refuses) it
        scope = self.scope
        version = parser.get_http_version()
        scope["method"] = method.decode("ascii")
        if version != "1.1":
            scope["http_version"] = version
        url = httptools.parse_url(self.url)
        path = url.path.decode("ascii")
        scope["path"] = urllib.parse.unquote(path) if "%" in path else path
        scope["raw_path"] = url.path
        scope["query_string"] = url.query or b""
        assert self._answer_now is not None
        answer = self._answer_now(scope)
        if answer is None:
            return False
        keep_alive = version != "1.0" and parser.should_keep_alive()
        # through the coalescing writer: sent at the end of this event-loop turn with whatever else this
        # connection writes in it (measured: about half the CPU per hit of a write here and now, as the
        # loop answers every connection that is ready before it writes and polls again)
        head = method == b"HEAD"
        if not head and keep_alive and type(answer) is Response:  # the common case, the same for many hits
            wire = answer.wire
            if wire is None:
                wire = answer.wire = answer_bytes(answer, head=False, keep_alive=True)
        else:
            wire = answer_bytes(answer, head=head, keep_alive=keep_alive)
        self._writer.write(wire)
        self._answered = True
        if not keep_alive:
            self._writer.close()  # what it holds first, then the close
        self.on_response_complete()
        return True

    def on_body(self, body: bytes) -> None:
        if not self._answered:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._answered:
            self._answered = False
            return
        super().on_message_complete()


class EdgeH11Protocol(_EdgeLimits, H11Protocol):
    """uvicorn's h11 protocol with the same limits (h11 already refuses absolute-form paths downstream,
    bounds the head's size and never passes trailers on)."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.settings = settings_of(config)
        self.timeout_keep_alive = self.settings.keepalive_timeout  # type: ignore[assignment]
        self._head_timer = None
        self._status = 400
        self._message = ""
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.settings.max_header_bytes)
        self._h11_next = self.conn.next_event
        self.conn.next_event = self._next_event  # type: ignore[method-assign]

    def _next_event(self) -> Any:
        try:
            event = self._h11_next()
        except h11.RemoteProtocolError as exc:
            self._status = 431 if exc.error_status_hint == 431 else 400
            raise
        if isinstance(event, h11.Request):
            self._cancel_head_timer()
            if len(event.headers) > self.settings.max_headers:
                self._status, self._message = 431, f"more than {self.settings.max_headers} header fields"
                raise h11.RemoteProtocolError(self._message)
            # h11 bounds only a head that is still incomplete: one that arrived whole in a read is measured here
            size = len(event.target) + sum(len(name) + len(value) + 4 for name, value in event.headers)
            if size > self.settings.max_header_bytes:
                self._status = 431
                raise h11.RemoteProtocolError("request head too large")
            if event.http_version not in (b"1.0", b"1.1"):
                self._status = 505
                self._message = f"HTTP/{event.http_version.decode()} is not supported: use HTTP/1.1"
                raise h11.RemoteProtocolError(self._message)
        return event

    def handle_events(self) -> None:
        super().handle_events()
        self._adopt_cycle()

    def send_400_response(self, msg: str) -> None:
        status, message, self._status, self._message = self._status, self._message, 400, ""
        if status == 431 and not message:
            message = f"the request head is over {self.settings.max_header_bytes} bytes"
        self._refuse(status, message or msg)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # bytes of a new request head are waiting: it must be complete within header_timeout
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm_head_timer()
