"""Edgeway's upstream client (gateway/upstream.py) against servers that misbehave on purpose.

Each test runs on asyncio's loop and on uvloop (conftest.py), starts its own server in that loop and scripts
its answers byte for byte: closing kept-alive connections, chunking, ending a
body by closing, stalling, sending interim responses. ``X-Peer`` in a
scripted response names the server-side connection that sent it.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeway.gateway.upstream import Pool, Response, UpstreamError, UpstreamTimeout
from edgeway.gateway.upstream_connection import HIGH_WATER

from .conftest import RawRequest, read_request


@dataclass
class Peer:
    """One connection the scripted server accepted."""

    number: int
    reader: asyncio.StreamReader
    requests: list[RawRequest] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    by_client: bool = False  # the client closed it (EOF where a request could start)


PeerScript = Callable[[RawRequest, asyncio.StreamWriter, Peer], Awaitable[bool]]


class Scripted:
    """An HTTP/1.1 server whose ``script(request, writer, peer)`` answers and says whether to keep the connection."""

    def __init__(self, script: PeerScript) -> None:
        self.script = script
        self.peers: list[Peer] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[object]] = set()

    async def start(self, host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None) -> Scripted:
        self._server = await asyncio.start_server(self._handle, host, 0, ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(len(self.peers) + 1, reader)
        self.peers.append(peer)
        try:
            while True:
                request = await read_request(reader)
                if request is None:
                    peer.by_client = True
                    break
                peer.requests.append(request)
                if not await self.script(request, writer, peer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            peer.by_client = True
        except asyncio.CancelledError:
            pass  # stop(): ended here, so the server's own callback finds a finished task, not a cancelled one
        finally:
            writer.close()
            peer.ended.set()


def ok(peer: Peer, body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nX-Peer: %d\r\nContent-Length: %d\r\n%b\r\n%b" % (peer.number, len(body), extra, body)


async def answer_ok(request: RawRequest, writer: asyncio.StreamWriter, peer: Peer) -> bool:
    writer.write(ok(peer))
    return True


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert condition()


async def fetch(pool: Pool, method: str = "GET", target: bytes = b"/", headers: list[tuple[bytes, bytes]] | None = None,
                body: bytes | AsyncIterator[bytes] | None = None, length: int | None = None) -> tuple[Response, bytes]:
    """One whole exchange: the response (released) and its body."""
    response = await pool.request(method, target, headers or [], body, length=length)
    try:
        parts = []
        while chunk := await response.read():
            parts.append(chunk)
        return response, b"".join(parts)
    finally:
        response.release()


def header(response: Response, name: bytes) -> bytes | None:
    return next((value for key, value in response.headers if key.lower() == name), None)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Scripted]]]:
    started: list[Scripted] = []

    async def start(script: PeerScript, **options: object) -> Scripted:
        server = await Scripted(script).start(**options)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def pools() -> AsyncIterator[Callable[..., Pool]]:
    made: list[Pool] = []

    def make(url: str, **options: object) -> Pool:
        settings: dict[str, object] = {"connect_timeout": 2.0, "read_timeout": 5.0, **options}
        pool = Pool(url, **settings)  # type: ignore[arg-type]
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.close()


def url(server: Scripted, path: str = "") -> str:
    return f"http://127.0.0.1:{server.port}{path}"


# --------------------------------------------------------------------------- keep-alive and the pool


async def test_a_connection_is_kept_alive_and_reused(serve, pools) -> None:  # type: ignore[no-untyped-def]
    server = await serve(answer_ok)
    pool = pools(url(server))
    first, _ = await fetch(pool)
    second, body = await fetch(pool)
    assert (header(first, b"x-peer"), header(second, b"x-peer"), body) == (b"1", b"1", b"ok")
    assert len(server.peers) == 1


async def test_idle_connections_are_reused_last_in_first_out(serve, pools) -> None:  # type: ignore[no-untyped-def]
    server = await serve(answer_ok)
    pool = pools(url(server))
    one = await pool.request("GET", b"/", [])
    two = await pool.request("GET", b"/", [])  # the first is still in use: a second connection
    for response in (one, two):
        while await response.read():
            pass
    one.release()
    two.release()
    third, _ = await fetch(pool)
    assert (header(one, b"x-peer"), header(two, b"x-peer"), header(third, b"x-peer")) == (b"1", b"2", b"2")


async def test_a_connection_the_upstream_closed_while_idle_is_not_used(serve, pools) -> None:  # type: ignore[no-untyped-def]
    async def once(request: RawRequest, writer: asyncio.StreamWriter, peer: Peer) -> bool:
        writer.write(ok(peer))  # promises keep-alive, then closes anyway
        await writer.drain()
        return False

    server = await serve(once)
    pool = pools(url(server))
    await fetch(pool)
    await server.peers[0].ended.wait()
    response, body = await fetch(pool)
    assert (header(response, b"x-peer"), body) == (b"2", b"ok")
    assert [len(peer.requests) for peer in server.peers] == [1, 1]


def hang_up_on_the_second_request() -> PeerScript:
    """Answers a connection's first request; reads its second and closes without a byte (the keep-alive race)."""

    async def script(request: RawRequest, writer: asyncio.StreamWriter, peer: Peer) -> bool:
        if len(peer.requests) == 2:
            return False
        writer.write(ok(peer, request.body or b"ok"))
        return True

    return script


@pytest.mark.parametrize(("method", "body"), [("GET", None), ("PUT", b"replayed"), ("DELETE", None)])
async def test_the_keep_alive_race_is_retried_once_on_a_new_connection(serve, pools, method: str,  # type: ignore[no-untyped-def]
                                                                       body: bytes | None) -> None:
    server = await serve(hang_up_on_the_second_request())
    pool = pools(url(server))
    await fetch(pool)
    response, received = await fetch(pool, method, body=body)
    assert (response.status, header(response, b"x-peer"), received) == (200, b"2", body or b"ok")
    assert [[r.method for r in peer.requests] for peer in server.peers] == [["GET", method], [method]]


async def test_the_keep_alive_race_is_not_retried_for_post_or_a_streamed_body(serve, pools) -> None:  # type: ignore[no-untyped-def]
    async def stream() -> AsyncIterator[bytes]:
        yield b"streamed"

    for method, body in (("POST", b"not idempotent"), ("PUT", stream())):
        server = await serve(hang_up_on_the_second_request())
        pool = pools(url(server))
        await fetch(pool)
        with pytest.raises(UpstreamError) as caught:
            await fetch(pool, method, body=body)
        assert not isinstance(caught.value, UpstreamTimeout)
        assert [len(peer.requests) for peer in server.peers] == [2]  # sent once, never again


async def test_a_new_connection_closed_before_any_answer_is_not_retried(serve, pools) -> None:  # type: ignore[no-untyped-def]
    async def hang_up(request: RawRequest, writer: asyncio.StreamWriter, peer: Peer) -> bool:
        return False

    server = await serve(hang_up)
    with pytest.raises(UpstreamError):
        await fetch(pools(url(server)))
    assert len(server.peers) == 1


async def test_idle_connections_expire(serve, pools) -> None:  # type: ignore[no-untyped-def]
    server = await serve(answer_ok)
    pool = pools(url(server), keepalive=0.05)
    await fetch(pool)
    await asyncio.wait_for(server.peers[0].ended.wait(), 5)
    assert server.peers[0].by_client
    response, _ = await fetch(pool)
    assert header(response, b"x-peer") == b"2"


async def test_close_closes_idle_and_busy_connections(serve, pools) -> None:  # type: ignore[no-untyped-def]
    async def slow_second(request: RawRequest, writer: asyncio.StreamWriter, peer: Peer) -> bool:
        if request.target == "/busy":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")  # and the rest never
            return True
        writer.write(ok(peer))
        return True

    server = await serve(slow_second)
    pool = pools(url(server))
    await fetch(pool)  # peer 1, idle afterwards
    busy = await pool.request("GET", b"/busy", [])  # peer 2
    assert await busy.read() == b"12345"
    await pool.close()
    await asyncio.wait_for(asyncio.gather(*(peer.ended.wait() for peer in server.peers)), 5)
    assert all(peer.by_client for peer in server.peers)
    with pytest.raises(UpstreamError):
        await busy.read()
    busy.release()


# --------------------------------------------------------------------------- response framing


async def test_a_chunked_response_is_decoded_and_the_connection_kept(serve, pools) -> None:  # type: ignore[no-untyped-def]
    async def chunked(request: RawRequest, writer: asyncio.StreamWriter, peer: Peer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Peer: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % peer.number)
        for piece in (b"hello ", b"chunked ", b"world"):
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        return True

    server = await serve(chunked)
    pool = pools(url(server))
    response, body = await fetch(pool)
    assert body == b"hello chunked world"
    assert header(response, b"transfer-encoding") == b"chunked"  # the proxy drops it; the client reports it
    again, _ = await fetch(pool)
    assert header(again, b"x-peer") == b"1"


async def test_a_body_delimited_by_close_is_read_to_the_end(serve, pools) -> None:  # type: ignore[no-untyped-def]
    async def until_close(request: RawRequest, writer: asyncio.StreamWriter, peer: Peer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Peer: %d\r\n\r\nno length, " % peer.number)
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"ends at the close")
        await writer.drain()
        return False

    server = await serve(until_close)
    pool = pools(url(server))
    _, body = await fetch(pool)
    assert body == b"no length, ends at the close"
    response, _ = await fetch(pool)
    assert header(response, b"x-peer") == b"2"


@pytest.mark.parametrize("head", [b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
                                  b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"])
async def test_a_response_without_keep_alive_is_not_reused(serve, pools, head: bytes) -> None:  # type: ignore[no-untyped-def]
    async def no_keep_alive(request: RawRequest, writer: asyncio.StreamWriter, peer: Peer) -> bool:
        writer.write(head)
        return True  # the server would take another request: the client must not send one

    server = await serve(no_keep_alive)
    pool = pools(url(server))
    _, body = await fetch(pool)
    assert body == b"ok"
    await asyncio.wait_for(server.peers[0].ended.wait(), 5)
    assert server.peers[0].by_client
    await fetch(pool)
    assert [len(peer.requests) for peer in server.peers] == [1, 1]


async def test_interim_responses_are_skipped(serve, pools) -> None:  # type: ignore[no-untyped-def]
    async def interim(request: RawRequest, writer: asyncio.StreamWriter, peer: Peer) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        await writer.drain()
        writer.write(ok(peer, b"final"))
        return True

    server = await serve(interim)
    pool = pools(url(server))
    response, body = await fetch(pool)
    assert (response.status, body, header(response, b"link")) == (200, b"final", None)
    again, _ = await fetch(pool)
    assert header(again, b"x-peer") == b"1"


@pytest.mark.parametrize(("method", "head"), [
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
    ("GET", b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 1000\r\n\r\n"),
    ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
])
async def test_head_304_and_204_have_no_body_and_keep_the_connection(serve, pools, method: str,  # type: ignore[no-untyped-def]
                                                                      head: bytes) -> None:
    async def bodiless(request: RawRequest, writer: asyncio.StreamWriter, peer: Peer) -> bool:
        writer.write(head if request.target == "/first" else ok(peer))
        return True

    server = await serve(bodiless)
    pool = pools(url(server))
    first, body = await fetch(pool, method, b"/first")
    assert body == b""
    assert first.status == int(head.split(b" ")[1])
    second, body = await fetch(pool)
    assert (header(second, b"x-peer"), body) == (b"1", b"ok")


async def test_response_headers_are_the_upstream_bytes(serve, pools) -> None:  # type: ignore[no-untyped-def]
    async def raw(request: RawRequest, writer: asyncio.StreamWriter, peer: Peer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\nX-Bytes: caf\xe9\xff  \r\n"
                     b"Content-Length: 0\r\n\r\n")
        return True

    server = await serve(raw)
    response, _ = await fetch(pools(url(server)))
    assert response.headers == [(b"Set-Cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"X-Bytes", b"caf\xe9\xff"),
                                (b"Content-Length", b"0")]


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"HTTP/1.1 2000 What\r\n\r\n",
    b"NOT HTTP AT ALL\r\n\r\n",
])
async def test_a_malformed_or_unasked_for_response_is_an_error(serve, pools, answer: bytes) -> None:  # type: ignore[no-untyped-def]
    async def bad(request: RawRequest, writer: asyncio.StreamWriter, peer: Peer) -> bool:
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(1)
        return False

    server = await serve(bad)
    with pytest.raises(UpstreamError):
        await fetch(pools(url(server)))


# --------------------------------------------------------------------------- failures and timeouts


async def test_no_response_head_is_a_read_timeout(serve, pools) -> None:  # type: ignore[no-untyped-def]
    async def silent(request: RawRequest, writer: asyncio.StreamWriter, peer: Peer) -> bool:
        await asyncio.sleep(10)
        return False

    server = await serve(silent)
    with pytest.raises(UpstreamTimeout):
        await fetch(pools(url(server), read_timeout=0.1))


async def test_a_stall_mid_body_is_a_read_timeout(serve, pools) -> None:  # type: ignore[no-untyped-def]
    async def stall(request: RawRequest, writer: asyncio.StreamWriter, peer: Peer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
        peer.by_client = await peer.reader.read() == b""  # stalls until the client closes
        return False

    server = await serve(stall)
    response = await pools(url(server), read_timeout=0.1).request("GET", b"/", [])
    assert await response.read() == b"x" * 10
    with pytest.raises(UpstreamTimeout):
        await response.read()
    response.release()
    await asyncio.wait_for(server.peers[0].ended.wait(), 5)
    assert server.peers[0].by_client  # the stalled connection was closed, not pooled


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n" + b"x" * 10 + b"\r\n",
])
async def test_a_body_cut_short_is_an_error(serve, pools, answer: bytes) -> None:  # type: ignore[no-untyped-def]
    async def cut(request: RawRequest, writer: asyncio.StreamWriter, peer: Peer) -> bool:
        writer.write(answer)
        await writer.drain()
        return False

    server = await serve(cut)
    response = await pools(url(server)).request("GET", b"/", [])
    with pytest.raises(UpstreamError) as caught:
        while await response.read():
            pass
    assert not isinstance(caught.value, UpstreamTimeout)
    response.release()


async def test_connection_refused_is_an_error_not_a_timeout(pools) -> None:  # type: ignore[no-untyped-def]
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(UpstreamError) as caught:
        await fetch(pools(f"http://127.0.0.1:{port}"))
    assert not isinstance(caught.value, UpstreamTimeout)


async def test_cancelling_an_exchange_closes_its_connection(serve, pools) -> None:  # type: ignore[no-untyped-def]
    async def partial(request: RawRequest, writer: asyncio.StreamWriter, peer: Peer) -> bool:
        if request.target == "/partial":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
            await writer.drain()
            peer.by_client = await peer.reader.read() == b""  # the rest never comes
            return False
        writer.write(ok(peer))
        return True

    server = await serve(partial)
    pool = pools(url(server))
    started = asyncio.Event()

    async def proxying() -> None:
        response = await pool.request("GET", b"/partial", [])
        try:
            await response.read()
            started.set()
            await response.read()
        finally:
            response.release()

    task = asyncio.create_task(proxying())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(server.peers[0].ended.wait(), 5)
    assert server.peers[0].by_client
    response, _ = await fetch(pool)
    assert header(response, b"x-peer") == b"2"


async def test_reading_pauses_while_the_consumer_does_not_read(serve, pools) -> None:  # type: ignore[no-untyped-def]
    total = 32 * 1024 * 1024
    data = random.Random(3).randbytes(total)
    sent = 0

    async def large(request: RawRequest, writer: asyncio.StreamWriter, peer: Peer) -> bool:
        nonlocal sent
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        for offset in range(0, total, 65536):
            writer.write(data[offset:offset + 65536])
            await writer.drain()
            sent = offset + 65536
        return True

    server = await serve(large)
    response = await pools(url(server)).request("GET", b"/", [])
    conn = response._conn
    assert conn is not None
    await until(lambda: conn._paused)
    assert conn.buffered <= HIGH_WATER + 256 * 1024  # at most one more socket read past the mark
    assert sent < total  # the upstream is held back by TCP, not buffered whole by the gateway
    digest = hashlib.sha256()
    size = 0
    while chunk := await response.read():
        digest.update(chunk)
        size += len(chunk)
    response.release()
    assert (size, digest.digest()) == (total, hashlib.sha256(data).digest())


# --------------------------------------------------------------------------- request heads and bodies


def recorded(server: Scripted) -> RawRequest:
    return server.peers[-1].requests[-1]


async def test_the_request_head_is_the_given_bytes_and_nothing_else(serve, pools) -> None:  # type: ignore[no-untyped-def]
    server = await serve(answer_ok)
    pool = pools(url(server, "/base"))
    await fetch(pool, "GET", b"/x%20y?q=1&r=%C3%A9", [(b"x-bytes", b"caf\xe9\xff"), (b"accept", b"*/*"),
                                                      (b"x-bytes", b"second")])
    request = recorded(server)
    assert request.head == (b"GET /base/x%20y?q=1&r=%C3%A9 HTTP/1.1\r\nHost: 127.0.0.1:" + str(server.port).encode()
                            + b"\r\nx-bytes: caf\xe9\xff\r\naccept: */*\r\nx-bytes: second\r\n\r\n")


async def pieces(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


@pytest.mark.parametrize(("method", "body", "length", "framing", "expected"), [
    ("GET", None, None, None, b""),
    ("OPTIONS", None, None, None, b""),
    ("POST", None, None, ("Content-Length", "0"), b""),
    ("DELETE", None, None, ("Content-Length", "0"), b""),
    ("POST", b"held whole", None, ("Content-Length", "10"), b"held whole"),
    ("PUT", "stream", None, ("Transfer-Encoding", "chunked"), b"one two three"),
    ("PUT", "stream", 13, ("Content-Length", "13"), b"one two three"),
])
async def test_request_bodies_are_framed_by_their_kind(serve, pools, method: str, body: object,  # type: ignore[no-untyped-def]
                                                       length: int | None, framing: tuple[str, str] | None,
                                                       expected: bytes) -> None:
    server = await serve(answer_ok)
    content = pieces(b"one ", b"two ", b"three") if body == "stream" else body
    await fetch(pools(url(server)), method, b"/", body=content, length=length)  # type: ignore[arg-type]
    request = recorded(server)
    framing_headers = [(n, v) for n, v in request.headers if n.lower() in ("content-length", "transfer-encoding")]
    assert framing_headers == ([framing] if framing else [])
    assert request.body == expected
    assert [n for n, _ in request.headers] == ["Host", *([framing[0]] if framing else [])]


async def test_a_failing_request_body_fails_the_exchange(serve, pools) -> None:  # type: ignore[no-untyped-def]
    async def broken() -> AsyncIterator[bytes]:
        yield b"first"
        raise ValueError("the client went away")

    server = await serve(answer_ok)
    with pytest.raises(UpstreamError) as caught:
        await fetch(pools(url(server)), "PUT", body=broken())
    assert isinstance(caught.value.__cause__, ValueError)
    await asyncio.wait_for(server.peers[0].ended.wait(), 5)


async def test_url_credentials_become_basic_authorization(serve, pools) -> None:  # type: ignore[no-untyped-def]
    server = await serve(answer_ok)
    await fetch(pools(f"http://user:s%40cret@127.0.0.1:{server.port}"), headers=[(b"authorization", b"Bearer x")])
    request = recorded(server)
    assert [(n, v) for n, v in request.headers if n.lower() == "authorization"] == [
        ("Authorization", "Basic dXNlcjpzQGNyZXQ=")]  # user:s@cret


async def test_an_ipv6_literal_upstream(serve, pools) -> None:  # type: ignore[no-untyped-def]
    server = await serve(answer_ok, host="::1")
    response, _ = await fetch(pools(f"http://[::1]:{server.port}"))
    assert response.status == 200
    assert dict((recorded(server)).headers)["Host"] == f"[::1]:{server.port}"


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_an_https_upstream_is_verified_by_its_name(serve, pools, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cert, key = self_signed(tmp_path)
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    server = await serve(answer_ok, ssl_context=server_side)
    trusting = ssl.create_default_context(cafile=str(cert))
    pool = pools(f"https://localhost:{server.port}", ssl_context=trusting)
    first, _ = await fetch(pool)
    second, body = await fetch(pool)
    assert (header(first, b"x-peer"), header(second, b"x-peer"), body) == (b"1", b"1", b"ok")
    assert dict((recorded(server)).headers)["Host"] == f"localhost:{server.port}"
    with pytest.raises(UpstreamError):  # the system's trust store does not know this certificate
        await fetch(pools(f"https://localhost:{server.port}"))
