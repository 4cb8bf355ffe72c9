"""Real servers for the gateway tests: an echo upstream, a scripted raw-TCP upstream, the gateway under uvicorn.

Everything listens on 127.0.0.1 on free ports of its own. Tests talk to the
gateway with httpx, or with raw sockets where a client library would
normalise the request (absolute-form targets, dot segments, byte-exact query
strings, conflicting framing headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import random
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop

from edgeway import gateway
from edgeway.gateway.server import uvicorn_options
from tests.servers import HOST, UvicornThread, free_port, wait_for_port

STREAM_SIZE = 8 * 1024 * 1024
STREAM_CHUNK = 64 * 1024
STREAM_DATA = random.Random(20240607).randbytes(STREAM_SIZE)
GZIP_PLAIN = b"edgeway never decompresses: " * 200
GZIP_BODY = gzip.compress(GZIP_PLAIN, mtime=0)


def marker() -> str:
    """A unique token to find one test's requests in an upstream's log."""
    return uuid.uuid4().hex[:12]


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """The upstream client's tests run on asyncio's loop and on uvloop (``edgeway serve`` runs on uvloop)."""
    if item.path.name == "test_upstream_client.py":
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


# --------------------------------------------------------------------------- echo upstream (ASGI under uvicorn)


class EchoApp:
    """A raw ASGI upstream. The second path segment picks the behaviour (``/api/<kind>/...``).

    Every request it sees is appended to ``log`` (method, raw path, query, every
    header as received, body length and hash); ``outcomes`` records how slow and
    gated handlers ended; ``gates`` are threading events a test sets to let a
    gated response finish.
    """

    def __init__(self) -> None:
        self.log: list[dict[str, Any]] = []
        self.outcomes: dict[str, str] = {}
        self.gates: dict[str, threading.Event] = {}
        self.received: dict[str, int] = {}

    def find(self, token: str) -> list[dict[str, Any]]:
        return [r for r in self.log if token in r["raw_path"] or token in r["query_string"]]

    def gate(self, token: str) -> threading.Event:
        return self.gates.setdefault(token, threading.Event())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert scope["type"] == "http"
        segments = scope["path"].strip("/").split("/")
        kind = segments[1] if len(segments) > 1 else "echo"
        handler = getattr(self, "_" + kind.replace("-", "_"), None)
        if kind in ("slow", "gated", "progress"):
            await handler(scope, receive, send, segments[2])  # type: ignore[misc]
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        record = {
            "method": scope["method"],
            "path": scope["path"],
            "raw_path": scope["raw_path"].decode("latin-1"),
            "query_string": scope["query_string"].decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            "http_version": scope["http_version"],
            "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
        self.log.append(record)
        if handler is None:
            handler = self._echo
        await handler(scope, send, segments, record)

    async def _echo(self, scope: dict[str, Any], send: Any, segments: list[str], record: dict[str, Any]) -> None:
        payload = json.dumps(record).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else payload})

    async def _status(self, scope: dict[str, Any], send: Any, segments: list[str], record: dict[str, Any]) -> None:
        code = int(segments[2])
        headers = [(b"x-upstream-status", str(code).encode())]
        body = b"" if code in (204, 304) else f"status {code} from upstream".encode()
        if code in (301, 302, 303, 307, 308):
            headers.append((b"location", b"/elsewhere/target?x=1&y=%2F"))
        if code == 304:
            headers.append((b"etag", b'"v1"'))
        else:
            headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _cookies(self, scope: dict[str, Any], send: Any, segments: list[str], record: dict[str, Any]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"set-cookie", b"session=alice-secret; Path=/; HttpOnly"),
            (b"set-cookie", b"theme=dark; Path=/"),
            (b"set-cookie", b"tracking=1; Path=/api; Max-Age=60"),
            (b"x-multi", b"one"),
            (b"x-multi", b"two"),
            (b"content-length", b"2"),
        ]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def _gzip(self, scope: dict[str, Any], send: Any, segments: list[str], record: dict[str, Any]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/plain"),
            (b"content-encoding", b"gzip"),
            (b"content-length", str(len(GZIP_BODY)).encode()),
            (b"vary", b"Accept-Encoding"),
        ]})
        await send({"type": "http.response.body", "body": GZIP_BODY})

    async def _stream(self, scope: dict[str, Any], send: Any, segments: list[str], record: dict[str, Any]) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream")]})
        for offset in range(0, STREAM_SIZE, STREAM_CHUNK):
            await send({"type": "http.response.body", "body": STREAM_DATA[offset:offset + STREAM_CHUNK],
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _gated(self, scope: dict[str, Any], receive: Any, send: Any, token: str) -> None:
        """Sends a first chunk, then waits (at most 3 s) for the test to open the gate before the rest."""
        self.log.append({"method": scope["method"], "path": scope["path"],
                         "raw_path": scope["raw_path"].decode("latin-1"), "query_string": "", "headers": []})
        gate = self.gate(token)
        self.outcomes[token] = "first-sent"

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.outcomes[token + ":client"] = "disconnected"

        watcher = asyncio.ensure_future(watch_disconnect())
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream")]})
        await send({"type": "http.response.body", "body": b"first-chunk|", "more_body": True})
        deadline = time.monotonic() + 3.0
        while not gate.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        self.outcomes[token] = "finished"
        await send({"type": "http.response.body", "body": b"R" * 100_000, "more_body": True})
        await send({"type": "http.response.body", "body": b"|end", "more_body": False})
        await asyncio.sleep(0)
        watcher.cancel()

    async def _progress(self, scope: dict[str, Any], receive: Any, send: Any, token: str) -> None:
        """Reads the body chunk by chunk, publishing the running byte count in ``received[token]``."""
        self.received[token] = 0
        digest = hashlib.sha256()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.outcomes[token] = "disconnected"
                return
            chunk = message.get("body", b"")
            digest.update(chunk)
            self.received[token] += len(chunk)
            if not message.get("more_body", False):
                break
        payload = json.dumps({"body_len": self.received[token], "body_sha256": digest.hexdigest()}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})

    async def _slow(self, scope: dict[str, Any], receive: Any, send: Any, token: str) -> None:
        """Answers after ``?s=`` seconds (default 10) unless the connection goes away first."""
        self.log.append({"method": scope["method"], "path": scope["path"],
                         "raw_path": scope["raw_path"].decode("latin-1"),
                         "query_string": scope["query_string"].decode("latin-1"), "headers": []})
        query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if "=" in p)
        seconds = float(query.get("s", "10"))
        self.outcomes[token] = "waiting"

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        sleeper = asyncio.ensure_future(asyncio.sleep(seconds))
        watcher = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({sleeper, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self.outcomes[token] = "cancelled"
            raise
        finally:
            sleeper.cancel()
            watcher.cancel()
        if watcher in done:
            self.outcomes[token] = "disconnected"
            return
        self.outcomes[token] = "completed"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"slow"})


# --------------------------------------------------------------------------- raw TCP upstream


@dataclass
class RawRequest:
    head: bytes
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header_names(self) -> list[str]:
        return [name.lower() for name, _ in self.headers]


async def read_request(reader: asyncio.StreamReader) -> RawRequest | None:
    """One request off an HTTP/1.1 connection (head, and a Content-Length or chunked body); None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = [(n.strip(), v.strip()) for n, _, v in (line.partition(":") for line in lines[1:] if line)]
    lower = {n.lower(): v for n, v in headers}
    body = b""
    if lower.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    elif "content-length" in lower:
        body = await reader.readexactly(int(lower["content-length"]))
    return RawRequest(head, method, target, headers, body)


Script = Callable[[RawRequest, asyncio.StreamWriter], Awaitable[bool]]


@dataclass
class RawUpstream:
    """An HTTP/1.1 upstream written on asyncio streams: records the exact request bytes, answers by script.

    ``script(request, writer)`` writes the response and returns whether the
    connection stays open for another request.
    """

    script: Script
    port: int = field(default_factory=free_port)
    requests: list[RawRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name=f"raw-upstream-{self.port}", daemon=True)

    def find(self, token: str) -> list[RawRequest]:
        return [r for r in self.requests if token in r.target]

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(asyncio.start_server(self._handle, HOST, self.port))
        try:
            loop.run_forever()
        finally:
            server.close()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await read_request(reader)
                if request is None:
                    break
                self.requests.append(request)
                if not await self.script(request, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def start(self) -> RawUpstream:
        self._thread.start()
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)


async def raw_script(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
    """The raw upstream's behaviours, by the second path segment (``/raw/<kind>``)."""
    kind = request.target.split("?")[0].strip("/").split("/")[1]
    if kind == "reset":  # promises 100000 bytes, sends 1000, hangs up
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n"
                     + b"x" * 1000)
        await writer.drain()
        await asyncio.sleep(0.05)
        return False
    if kind == "chunk-die":  # two chunks, then hangs up without the terminating chunk
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"3e8\r\n" + b"y" * 1000 + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"3e8\r\n" + b"z" * 1000 + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        return False
    if kind == "once":  # answers as if keeping the connection alive, then closes it
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nonce")
        await writer.drain()
        return False
    if kind == "hop":  # hop-by-hop response fields, one named in Connection
        writer.write(
            b"HTTP/1.1 200 OK\r\n"
            b"Connection: X-Resp-Hop\r\n"
            b"Keep-Alive: timeout=5, max=100\r\n"
            b"X-Resp-Hop: upstream-private\r\n"
            b"Upgrade: example/1\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"TE: trailers\r\n"
            b"Trailer: X-Checksum\r\n"
            b"Proxy-Authenticate: Basic realm=up\r\n"
            b"X-Kept: yes\r\n"
            b"Content-Length: 2\r\n\r\nok"
        )
        await writer.drain()
        return True
    body = b"recorded"
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    return True


# --------------------------------------------------------------------------- raw HTTP client


@dataclass
class RawResponse:
    raw: bytes
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)


def raw_http(port: int, payload: bytes, *, timeout: float = 5.0, source: str | None = None) -> RawResponse:
    """Send ``payload`` as is and read until the server closes (send ``Connection: close``)."""
    with socket.create_connection((HOST, port), timeout=timeout,
                                  source_address=(source, 0) if source else None) as sock:
        sock.sendall(payload)
        return parse_response(read_until_closed(sock))


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or resets it, or the socket times out)."""
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def parse_response(data: bytes) -> RawResponse:
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1]) if lines and lines[0].startswith("HTTP/") else 0
    headers = [(n.strip(), v.strip()) for n, _, v in (line.partition(":") for line in lines[1:] if line)]
    lower = {n.lower(): v for n, v in headers}
    body = rest
    if lower.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2:]
    return RawResponse(data, status, headers, body)


# --------------------------------------------------------------------------- fixtures


@dataclass
class Served:
    """A gateway under uvicorn: the Gateway object, its base URL and port, and which HTTP parser serves it."""

    app: gateway.Gateway
    server: UvicornThread
    http: str

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port


@contextlib.contextmanager
def serve_gateway(policy_yaml: str, http: str = "h11") -> Iterator[Served]:
    """The gateway as ``edgeway serve --http HTTP`` runs it (its protocol classes and uvicorn settings)."""
    app = gateway.create_app(gateway.load_text(policy_yaml))
    server = UvicornThread(app, **uvicorn_options(http))
    with server:
        yield Served(app, server, http)


@pytest.fixture(scope="session")
def echo() -> Iterator[EchoApp]:
    app = EchoApp()
    with UvicornThread(app, http="h11", lifespan="on", timeout_graceful_shutdown=1) as server:
        app.port = server.port  # type: ignore[attr-defined]
        yield app


@pytest.fixture(scope="session")
def victim() -> Iterator[EchoApp]:
    """A server no policy names: nothing may ever reach it through the gateway."""
    app = EchoApp()
    with UvicornThread(app, http="h11", timeout_graceful_shutdown=1) as server:
        app.port = server.port  # type: ignore[attr-defined]
        yield app


@pytest.fixture(scope="session")
def raw_upstream() -> Iterator[RawUpstream]:
    upstream = RawUpstream(raw_script).start()
    yield upstream
    upstream.stop()


def main_policy(echo_port: int, raw_port: int, dead_port: int, *, admin_token: str = "") -> str:
    return f"""
version: 1
trusted_proxies: [127.0.0.1/32]
upstreams:
  echo: {{ url: "http://127.0.0.1:{echo_port}" }}
  raw: {{ url: "http://127.0.0.1:{raw_port}" }}
  dead: {{ url: "http://127.0.0.1:{dead_port}", timeout: {{ connect: 1s, read: 2s }} }}
  slow: {{ url: "http://127.0.0.1:{echo_port}", timeout: {{ connect: 1s, read: 300ms }} }}
routes:
  - match: {{ path: /only-get, methods: [GET] }}
    upstream: echo
  - match: {{ path: /limited }}
    upstream: echo
    limits: [{{ rate: 3/minute, key: ip }}]
  - match: {{ path: /dead/* }}
    upstream: dead
  - match: {{ path: /timeout/* }}
    upstream: slow
  - match: {{ path: /raw/*, allow_semicolons: true }}
    upstream: raw
  - match: {{ path: /api/* }}
    upstream: echo
admin:
  token: "{admin_token}"
"""


@pytest.fixture(scope="module", params=["h11", "httptools"])
def gw(request: pytest.FixtureRequest, echo: EchoApp, raw_upstream: RawUpstream) -> Iterator[Served]:
    """The gateway under uvicorn, once per HTTP parser."""
    policy = main_policy(echo.port, raw_upstream.port, free_port())  # type: ignore[attr-defined]
    with serve_gateway(policy, http=request.param) as served:
        yield served


@pytest.fixture(scope="module")
def gw_h11(echo: EchoApp, raw_upstream: RawUpstream) -> Iterator[Served]:
    policy = main_policy(echo.port, raw_upstream.port, free_port())  # type: ignore[attr-defined]
    with serve_gateway(policy, http="h11") as served:
        yield served
