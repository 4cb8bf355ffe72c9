"""A response's head and first body chunk leave in one socket write, and a head is never held back.

The server is the one ``edgeway serve`` runs (its protocol classes and uvicorn
settings, both parsers, on asyncio and uvloop) in front of a small ASGI app
that sends its head and body as separate ASGI messages, the way Edgeway's
cache does on a hit. Raw sockets read exactly what arrives.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from edgeway.gateway.coalesce import HOLD_LIMIT, CoalescingWriter
from edgeway.gateway.server import uvicorn_options
from tests.servers import HOST, UvicornThread

SMALL = json.dumps({"items": ["x" * 40] * 22}).encode()[:1024]
LARGE = b"L" * (HOLD_LIMIT * 4)


class Responder:
    """Answers by path; ``/sse`` sends its head, then its first event only once the test opens ``gate``."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        path = scope["path"]
        if path == "/sse":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for _ in range(500):  # the test opens the gate once it has the head; bounded at 5 s
                if self.gate.is_set():
                    break
                await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": b"data: one\n\n", "more_body": False})
            return
        status, headers, body = {
            "/small": (200, [(b"content-type", b"application/json")], SMALL),
            "/large": (200, [], LARGE),
            "/empty": (204, [], b""),
            "/same": (304, [(b"etag", b'"v1"')], b""),
            "/bye": (200, [(b"connection", b"close")], SMALL),
        }[path]
        if status == 200:
            headers = [*headers, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def responder() -> Responder:
    return Responder()


@pytest.fixture(scope="module", params=[("httptools", "asyncio"), ("h11", "asyncio"), ("httptools", "uvloop"),
                                        ("h11", "uvloop")], ids=lambda p: "-".join(p))
def port(request: pytest.FixtureRequest, responder: Responder) -> Iterator[int]:
    http, loop = request.param
    with UvicornThread(responder, **{**uvicorn_options(http), "loop": loop}) as server:
        yield server.port


class Reader:
    """Reads whole responses off one client socket (Content-Length, chunked, or none for HEAD/204/304)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-response")
        self.buffer += chunk

    def head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        raw, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        fields = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        return int(lines[0].split(" ")[1]), fields

    def take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def response(self, *, bodiless: bool = False) -> tuple[int, dict[str, str], bytes]:
        status, fields = self.head()
        if bodiless or status in (204, 304):
            return status, fields, b""
        if fields.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buffer:
                    self._fill()
                size_line, _, self.buffer = self.buffer.partition(b"\r\n")
                size = int(size_line, 16)
                chunk = self.take(size + 2)[:size]
                if size == 0:
                    return status, fields, body
                body += chunk
        return status, fields, self.take(int(fields["content-length"]))

    def closed(self) -> bool:
        return not self.buffer and self.sock.recv(1) == b""


def connect(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def request(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


def test_small_response_arrives_whole_in_one_recv(port: int) -> None:
    with connect(port) as sock:
        for _ in range(3):  # and again on the kept-alive connection
            sock.sendall(request("/small"))
            data = sock.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), data
            assert b"content-length: %d" % len(SMALL) in head.lower()
            assert body == SMALL


def test_large_body_arrives_intact(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(request("/large") + request("/small"))
        reader = Reader(sock)
        status, fields, body = reader.response()
        assert (status, fields["content-length"], body == LARGE) == (200, str(len(LARGE)), True)
        status, _, body = reader.response()
        assert (status, body) == (200, SMALL)


def test_stream_head_is_not_held_for_a_slow_first_event(port: int, responder: Responder) -> None:
    responder.gate.clear()
    with connect(port) as sock:
        sock.sendall(request("/sse"))
        reader = Reader(sock)
        # the app sends its first event only after the gate opens, which happens only once the head is here:
        # a held head would block this read until the socket timeout
        status, fields = reader.head()
        assert status == 200
        assert fields["content-type"] == "text/event-stream"
        assert reader.buffer == b""
        responder.gate.set()
        assert reader.take(len(b"b\r\ndata: one\n\n\r\n")) == b"b\r\ndata: one\n\n\r\n"
        assert reader.take(5) == b"0\r\n\r\n"


@pytest.mark.parametrize(("method", "path", "status"), [("HEAD", "/small", 200), ("GET", "/empty", 204),
                                                        ("GET", "/same", 304)])
def test_bodiless_responses_are_complete_and_keep_the_connection(port: int, method: str, path: str,
                                                                 status: int) -> None:
    with connect(port) as sock:
        reader = Reader(sock)
        sock.sendall(request(path, method))
        got, fields, _ = reader.response(bodiless=True)
        assert got == status
        if method == "HEAD":
            assert fields["content-length"] == str(len(SMALL))
        if status == 304:
            assert fields["etag"] == '"v1"'
        # nothing else follows the head, and the connection serves the next request
        sock.sendall(request("/small"))
        status, _, body = reader.response()
        assert (status, body) == (200, SMALL)


def test_pipelined_requests_are_answered_in_order(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(request("/small") + request("/small", "HEAD") + request("/empty") + request("/large")
                     + request("/same") + request("/small", extra="Connection: close\r\n"))
        reader = Reader(sock)
        answers = [reader.response(bodiless=method == "HEAD")
                   for method in ("GET", "HEAD", "GET", "GET", "GET", "GET")]
        assert [(status, body) for status, _, body in answers] == [
            (200, SMALL), (200, b""), (204, b""), (200, LARGE), (304, b""), (200, SMALL)]
        assert answers[-1][1]["connection"] == "close"
        assert reader.closed()


@pytest.mark.parametrize(("path", "extra"), [("/small", "Connection: close\r\n"), ("/bye", "")])
def test_connection_close_responses_are_complete_then_closed(port: int, path: str, extra: str) -> None:
    with connect(port) as sock:
        sock.sendall(request(path, extra=extra))
        reader = Reader(sock)
        status, fields, body = reader.response()
        assert (status, fields["connection"], body) == (200, "close", SMALL)
        assert reader.closed()


def test_head_to_a_close_request_is_complete_then_closed(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(request("/small", "HEAD", "Connection: close\r\n"))
        reader = Reader(sock)
        status, fields, _ = reader.response(bodiless=True)
        assert (status, fields["content-length"]) == (200, str(len(SMALL)))
        assert reader.closed()


class Recorder:
    """Stands in for a socket transport: records each write and close, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", bytes(data)))

    def close(self) -> None:
        self.calls.append(("close", b""))
        self.closing = True

    def abort(self) -> None:
        self.calls.append(("abort", b""))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str) -> str:
        return name


@pytest.mark.parametrize(("steps", "expected"), [
    # a head and its body written in one turn: one write
    (["head", "body"], [("write", b"HB")]),
    # a head alone goes out on the next loop turn
    (["head", "turn"], [("write", b"H")]),
    (["head", "turn", "body"], [("write", b"H"), ("write", b"B")]),
    # close, a flush, or any other transport call sends the held head first; abort drops it
    (["head", "close"], [("write", b"H"), ("close", b"")]),
    (["head", "flush", "body"], [("write", b"H"), ("write", b"B")]),
    (["head", "extra", "body"], [("write", b"H"), ("write", b"B")]),
    (["head", "abort", "turn"], [("abort", b"")]),
    (["head", "discard", "turn"], []),
    # a large write is never held nor copied into one
    (["large"], [("write", b"L" * (HOLD_LIMIT + 1))]),
    (["head", "large"], [("write", b"H"), ("write", b"L" * (HOLD_LIMIT + 1))]),
])
def test_coalescing_writer(steps: list[str], expected: list[tuple[str, bytes]]) -> None:
    async def run() -> list[tuple[str, bytes]]:
        recorder = Recorder()
        writer = CoalescingWriter(recorder, asyncio.get_running_loop())  # type: ignore[arg-type]
        for step in steps:
            if step == "head":
                writer.write(b"H")
            elif step == "body":
                writer.write(b"B")
            elif step == "large":
                writer.write(b"L" * (HOLD_LIMIT + 1))
            elif step == "turn":
                await asyncio.sleep(0)
                await asyncio.sleep(0)
            elif step == "extra":
                assert writer.get_extra_info("peername") == "peername"
            else:
                getattr(writer, step)()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return recorder.calls

    assert asyncio.run(run()) == expected
