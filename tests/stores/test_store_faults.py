"""Faults a real network and real redis-servers produce, and how the stores come back from them.

- a path that black-holes an established flow while new connections work (a TCP proxy this test controls);
- a server that cannot write: ``maxmemory`` with ``noeviction`` and full memory, and a read-only replica;
- a server that accepts connections but never answers the connection setup (AUTH);
- an instance that never served a limited route when the primary died (heartbeats from startup).

Every wait is bounded: short store timeouts, 50 ms probes, and a deadline on each wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis.asyncio as aioredis
import uvloop

from edgeway.middleware.store import (
    Algorithm,
    Get,
    LimitCheck,
    RateLimit,
    RateLimitResult,
    Store,
    StoreError,
    StoreTimeout,
)
from edgeway.middleware.store.failover import FailoverStore
from edgeway.middleware.store.memory import MemoryStore
from edgeway.middleware.store.redis import RedisStore
from tests.servers import HOST, RedisServer

TIMEOUT = 0.2  # seconds per store call
LIMIT = RateLimit((LimitCheck("edgeway-fault:k", Algorithm.FIXED_WINDOW, 1_000_000, 60_000),))


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not met within {timeout} s")
        await asyncio.sleep(0.02)


class BlackholeProxy:
    """Forwards TCP to a target; :meth:`blackhole` silently drops the flows open now, new ones still work."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._flows: list[dict[str, bool]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0

    async def start(self) -> BlackholeProxy:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def blackhole(self) -> None:
        for flow in self._flows:
            flow["dropped"] = True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)
        flow = {"dropped": False}
        self._flows.append(flow)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await source.read(65536):
                    if not flow["dropped"]:  # black-holed: the bytes vanish, the connection stays open
                        sink.write(data)
                        await sink.drain()

        tasks = [asyncio.ensure_future(pump(reader, up_writer)), asyncio.ensure_future(pump(up_reader, writer))]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in (writer, up_writer):
            w.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[BlackholeProxy]:
    made = await BlackholeProxy(redis_server.port).start()
    yield made
    await made.close()


async def test_a_timed_out_connection_is_dropped_and_the_next_call_reconnects(proxy: BlackholeProxy) -> None:
    store = RedisStore(proxy.url, timeout=TIMEOUT)
    try:
        assert await store.execute([Get("edgeway-fault:none")]) == [None]
        proxy.blackhole()
        with pytest.raises(StoreTimeout):
            await store.execute([Get("edgeway-fault:none")])
        assert await store.execute([Get("edgeway-fault:none")]) == [None]  # a new flow, which works
        assert proxy.accepted == 2
    finally:
        await store.close()


async def test_failover_comes_back_from_a_black_holed_flow(proxy: BlackholeProxy) -> None:
    store = FailoverStore(RedisStore(proxy.url, timeout=TIMEOUT), [MemoryStore()], failures=1,
                          probe_initial=0.05, probe_max=0.1)
    try:
        await store.execute([LIMIT])
        proxy.blackhole()
        await store.execute([LIMIT])  # times out on the dead flow, answered from memory
        assert store.kind == "memory"
        await wait_until(lambda: store.kind == "redis")  # the probe reconnected; no request needed
        (result,) = await store.execute([LIMIT])
        assert isinstance(result, RateLimitResult) and result.allowed
    finally:
        await store.close()


# -- event-loop lag is not the store being slow --------------------------------------------------------
# uvloop runs due timers before it polls for I/O: when the loop stalled in an I/O callback past the timeout,
# the deadline fires before the reply, already in the socket, is read. Each test runs on its own loop, both kinds.

LOOPS = [pytest.param(asyncio.new_event_loop, id="asyncio"), pytest.param(uvloop.new_event_loop, id="uvloop")]
LAG = 0.3  # seconds the loop stalls: six store timeouts


async def _stalled_call(store: Store, during_stall: Callable[[], None]) -> list[object]:
    """A batch is written, then the loop's next I/O poll stalls past the timeout (a blocking callback, or the
    process descheduled at full CPU); ``during_stall`` runs at the start of the stall."""
    loop = asyncio.get_running_loop()
    stall, trigger = socket.socketpair()

    def stalled() -> None:
        stall.recv(1)
        during_stall()
        time.sleep(LAG)

    loop.add_reader(stall.fileno(), stalled)
    try:
        call = asyncio.ensure_future(store.execute([LIMIT]))
        await asyncio.sleep(0)  # the call submits its batch
        await asyncio.sleep(0)  # the batch is written
        trigger.send(b"x")
        return await call
    finally:
        loop.remove_reader(stall.fileno())
        stall.close()
        trigger.close()


@pytest.mark.parametrize("new_loop", LOOPS)
def test_a_stalled_loop_with_the_reply_buffered_is_not_a_store_failure(
        new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def scenario(server: RedisServer) -> None:
        store = FailoverStore(RedisStore(server.url, timeout=0.05), [MemoryStore()], failures=1, probe_initial=60)
        try:
            await store.execute([LIMIT])  # connected, scripts loaded
            server.pause()  # the batch cannot be answered before the stall starts ...
            (result,) = await _stalled_call(store, server.resume)  # ... and is, during it: the reply waits unread
            assert isinstance(result, RateLimitResult) and result.allowed
            assert store.status()[0]["healthy"]  # one failure (failures=1) would have marked it down
        finally:
            server.resume()
            await store.close()

    with RedisServer() as server, asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(scenario(server))


@pytest.mark.parametrize("new_loop", LOOPS)
def test_a_stalled_loop_does_not_hide_a_silent_store(
        redis_server: RedisServer, new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def scenario() -> None:
        proxy = await BlackholeProxy(redis_server.port).start()
        store = RedisStore(proxy.url, timeout=0.05)
        try:
            await store.execute([LIMIT])
            proxy.blackhole()
            with pytest.raises(StoreTimeout):  # after one more turn for the reader, as long as the lag at most
                await _stalled_call(store, lambda: None)
        finally:
            await store.close()
            await proxy.close()

    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(scenario())


async def test_redis_connections_use_tcp_keepalive(redis_url: str) -> None:
    store = RedisStore(redis_url, timeout=TIMEOUT)
    try:
        await store.ping()
        protocol = store._transport._connection.value  # type: ignore[attr-defined]
        sock = protocol._transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    finally:
        await store.close()


# -- a Redis that cannot write ------------------------------------------------------------


@pytest.fixture
def full_redis() -> Iterator[RedisServer]:
    with RedisServer(args=("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")) as server:
        yield server


async def fill(url: str) -> aioredis.Redis:
    client = aioredis.Redis.from_url(url)
    for batch in range(200):
        pipe = client.pipeline(transaction=False)
        for i in range(200):
            pipe.set(f"fill:{batch}:{i}", "x" * 200)
        results = await pipe.execute(raise_on_error=False)
        if any(isinstance(r, Exception) and "maxmemory" in str(r) for r in results):
            return client
    raise AssertionError("the server never ran out of memory")


async def test_a_full_redis_is_marked_down_while_reads_work_and_comes_back(full_redis: RedisServer) -> None:
    memory = MemoryStore()
    store = FailoverStore(RedisStore(full_redis.url, timeout=TIMEOUT), [memory], failures=2,
                          probe_initial=0.05, probe_max=0.1)
    client = await fill(full_redis.url)
    try:
        for _ in range(2):
            assert await store.execute([Get("edgeway-fault:cached")]) == [None]  # reads still work ...
            (result,) = await store.execute([LIMIT])  # ... writes do not: answered from memory
            assert isinstance(result, RateLimitResult)
        assert store.kind == "memory"
        assert store.status()[0]["failing"] == ["write"]
        await asyncio.sleep(0.3)  # several probes: each a real write, each refused (a PING would pass)
        assert store.kind == "memory"
        await client.flushall()
        await wait_until(lambda: store.kind == "redis")
    finally:
        await client.aclose()
        await store.close()


@pytest.fixture
def replica(redis_server: RedisServer) -> Iterator[RedisServer]:
    with RedisServer(args=("--replicaof", HOST, str(redis_server.port))) as server:
        yield server


async def test_a_replica_is_marked_down_and_used_again_once_promoted(replica: RedisServer) -> None:
    store = FailoverStore(RedisStore(replica.url, timeout=TIMEOUT), [MemoryStore()], failures=2,
                          probe_initial=0.05, probe_max=0.1)
    client = aioredis.Redis.from_url(replica.url)
    try:
        for _ in range(2):
            (result,) = await store.execute([LIMIT])
            assert isinstance(result, RateLimitResult) and result.allowed  # from memory, never an error
        assert store.kind == "memory" and store.status()[0]["failing"] == ["write"]
        await asyncio.sleep(0.3)  # probes write, and a replica refuses (its PING would pass)
        assert store.kind == "memory"
        await client.replicaof("NO", "ONE")  # promoted, as after a failover
        await wait_until(lambda: store.kind == "redis")
        (result,) = await store.execute([LIMIT])
        assert isinstance(result, RateLimitResult) and result.allowed
    finally:
        await client.aclose()
        await store.close()


# -- connect-time failures ----------------------------------------------------------------


class Silent:
    """Accepts TCP connections, reads, never answers; counts connections still open."""

    def __init__(self) -> None:
        self.open = 0
        self.made = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Silent:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.made += 1
        self.open += 1
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass
        self.open -= 1
        writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.fixture
async def silent() -> AsyncIterator[Silent]:
    server = await Silent().start()
    yield server
    await server.close()


@pytest.mark.parametrize("timeout", [None, TIMEOUT], ids=["no-store-timeout", "store-timeout"])
async def test_auth_that_never_answers_is_a_store_error_and_closes_the_socket(
    silent: Silent, timeout: float | None
) -> None:
    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    store: Store = RedisStore(f"redis://:secret@{HOST}:{silent.port}/2", timeout=timeout, connect_timeout=0.3)
    try:
        for _ in range(4):
            with pytest.raises(StoreError):
                await asyncio.wait_for(store.execute([Get("k")]), 5.0)  # the bound is the test's, not the store's
        await wait_until(lambda: silent.open == 0, timeout=5.0)
        assert silent.made >= 1
    finally:
        await store.close()
        loop.set_exception_handler(None)
    import gc

    gc.collect()
    await asyncio.sleep(0)
    assert unretrieved == []


# -- heartbeats from startup ------------------------------------------------------------------


async def test_an_instance_that_served_nothing_still_counts_in_degraded_limits() -> None:
    """Two instances, 10 per minute, Redis killed before one of them served a limited request: 10 in total."""
    with RedisServer() as server:
        instances = [FailoverStore(RedisStore(server.url, timeout=TIMEOUT), [MemoryStore()], failures=1,
                                   probe_initial=60, heartbeat_every=0.1) for _ in range(2)]
        try:
            for instance in instances:
                await instance.start()  # the app's startup; neither serves anything before the outage
            await wait_until(lambda: all(i.live_instances == 2 for i in instances))
            server.kill()
            check = RateLimit((LimitCheck("edgeway-fault:pair", Algorithm.FIXED_WINDOW, 10, 60_000),))
            admitted = 0
            for instance in instances:
                for _ in range(10):
                    (result,) = await instance.execute([check])
                    assert isinstance(result, RateLimitResult)
                    admitted += result.allowed
            assert admitted == 10
        finally:
            for instance in instances:
                await instance.close()


async def test_readonly_drops_the_connection_so_the_next_call_reconnects(replica: RedisServer) -> None:
    """After a failover the same address may lead to the new primary: a READONLY answer is never asked again."""
    store = RedisStore(replica.url, timeout=TIMEOUT)
    client = aioredis.Redis.from_url(replica.url)
    try:
        await store.ping()
        before = (await client.info("stats"))["total_connections_received"]
        for _ in range(2):
            with pytest.raises(StoreError, match="READONLY"):
                await store.execute([LIMIT])
        after = (await client.info("stats"))["total_connections_received"]
        assert after - before == 1  # the second call came on a new connection
    finally:
        await client.aclose()
        await store.close()
