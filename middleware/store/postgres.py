"""PostgreSQL and Supabase stores: a whole batch is ONE call of ``edgeway.batch``.

The commands run inside the database, in a SQL function shipped as a migration
(``supabase/migrations/20261122000000_edgeway.sql``): one round trip and one
transaction per request, with the rate-limit algorithms of the Lua script
re-expressed in PL/pgSQL and per-key advisory locks, so concurrent callers are
exact. Both stores speak the same JSON (``encode_commands`` /
``decode_results``); they differ only in the transport:

- :class:`PostgresStore` (``postgres://``): a direct connection, an asyncpg pool
  created lazily, ``select edgeway.batch($1::jsonb, $2)``;
- :class:`SupabaseStore`: PostgREST's RPC endpoint
  ``POST {url}/rest/v1/rpc/edgeway_batch`` with the service role key, over one
  pooled ``httpx.AsyncClient`` that never stores cookies.

Bytes travel as base64 in the JSON (``{"b64": ...}`` in answers) and are kept
in a ``bytea`` column. ``Publish`` is ``pg_notify`` inside the batch;
:meth:`PostgresStore.subscribe` LISTENs on a dedicated connection (reconnected
with backoff). PostgREST cannot LISTEN, so ``Publish`` also records the message
in ``edgeway.events`` (kept a minute) and :class:`SupabaseStore` polls
``edgeway_events`` every 0.5 s while something is subscribed: one background
task per store, never a call per request.

Every call is bounded by the store timeout: the work runs in its own task and
the caller stops waiting at the deadline (the task is cancelled and left to
unwind in the background), so a slow or dead database never holds a request.
Connecting happens in a shielded task with its own deadline, so a first call
that times out still leaves the pool being built for the next one.

A batch the function refuses on its merits (SQLSTATE class 22, data exception:
a bad limit, a number out of range; HTTP 400 from PostgREST) rolls back as a
whole, so every command of it gets a :class:`CommandError` result: the
request's error, not a store outage.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from http.cookiejar import CookieJar, DefaultCookiePolicy
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import httpx

from .base import (
    BreakerResult,
    BreakerUpdate,
    Clock,
    Command,
    CommandError,
    Delete,
    Get,
    Handler,
    Heartbeat,
    Incr,
    LimitState,
    Publish,
    RateLimit,
    RateLimitResult,
    Revoke,
    Revoked,
    Set,
    Store,
    StoreConfigurationError,
    StoreError,
    StoreTimeout,
    Subscription,
)
from .notify import Backoff, Fanout, stop
from .opening import SharedOpen

if TYPE_CHECKING:
    import asyncpg

__all__ = ["MIGRATION", "PostgresStore", "SupabaseStore", "decode_results", "encode_commands"]

MIGRATION = "supabase/migrations/20261122000000_edgeway.sql"
_MISSING = f"the edgeway migration is not applied: run {MIGRATION} (psql -f, or supabase db push)"
_CONNECT_TIMEOUT = 5.0  # seconds; connecting continues in the background past a caller's deadline
_BACKSTOP = 10.0  # seconds; the bound when a store is built with timeout=None
POLL_EVERY = 0.5  # seconds between SupabaseStore's reads of edgeway_events while subscribed
_SEEN_FOR = 15.0  # seconds an event id is remembered: longer than the 5 s window edgeway_events returns

T = TypeVar("T")

logger = logging.getLogger("edgeway.store")


# -- the JSON both transports carry ------------------------------------------------


def encode_commands(commands: Sequence[Command]) -> list[dict[str, object]]:
    """Commands as ``edgeway.batch`` takes them (one JSON object each)."""
    encoded: list[dict[str, object]] = []
    for command in commands:
        if isinstance(command, Get):
            encoded.append({"op": "get", "key": command.key})
        elif isinstance(command, Set):
            value = command.value
            entry: dict[str, object] = {"op": "set", "key": command.key, "ttl_ms": command.ttl_ms}
            if isinstance(value, bytes):
                entry.update(value=base64.b64encode(value).decode(), b64=True)
            else:
                entry["value"] = value
            if command.only_if_absent:
                entry["nx"] = True
            encoded.append(entry)
        elif isinstance(command, Delete):
            if command.if_value is None:
                encoded.append({"op": "del", "key": command.key})
            else:
                expected = command.if_value
                raw = expected.encode() if isinstance(expected, str) else expected
                encoded.append({"op": "cad", "key": command.key, "value": base64.b64encode(raw).decode()})
        elif isinstance(command, Incr):
            encoded.append({"op": "incr", "key": command.key, "amount": command.amount, "ttl_ms": command.ttl_ms})
        elif isinstance(command, Publish):
            encoded.append({"op": "publish", "channel": command.channel, "message": command.message})
        elif isinstance(command, RateLimit):
            checks = [
                {
                    "key": c.key, "algorithm": c.algorithm.value, "quota": c.quota, "window_ms": c.window_ms,
                    "cost": c.cost, "burst": c.burst, "enforced": c.enforced,
                }
                for c in command.checks
            ]
            rate_limit: dict[str, object] = {"op": "ratelimit", "checks": checks}
            if command.guard is not None:
                rate_limit["guard"] = {"keys": list(command.guard.keys), "issued_at_ms": command.guard.issued_at_ms}
            encoded.append(rate_limit)
        elif isinstance(command, Revoked):
            encoded.append({"op": "revoked", "keys": list(command.keys), "issued_at_ms": command.issued_at_ms})
        elif isinstance(command, Revoke):
            encoded.append({"op": "revoke", "key": command.key, "at_ms": str(command.at_ms),
                            "ttl_ms": command.ttl_ms})
        elif isinstance(command, Heartbeat):
            encoded.append({"op": "heartbeat", "key": command.key, "instance": command.instance,
                            "ttl_ms": command.ttl_ms})
        elif isinstance(command, BreakerUpdate):
            event = command.event
            encoded.append({"op": "breaker", "key": command.key, "rule": list(command.rule),
                            "event": [event.successes, event.failures, int(event.probe), int(event.acquire),
                                      int(event.reset), event.seed_phase, event.seed_remaining_ms,
                                      event.seed_streak, event.jitter]})
        else:
            raise TypeError(f"unknown store command {command!r}")
    return encoded


def decode_results(commands: Sequence[Command], results: object) -> list[object]:
    """``edgeway.batch``'s JSON array back into one result per command; StoreError if malformed."""
    if not isinstance(results, list) or len(results) != len(commands):
        raise StoreError(f"unexpected edgeway.batch answer for {len(commands)} commands: {str(results)[:200]}")
    return [_decode(command, result) for command, result in zip(commands, results, strict=True)]


def _decode(command: Command, result: object) -> object:
    if isinstance(command, Get):
        if result is None:
            return None
        if isinstance(result, str):
            return result.encode() if command.binary else result
        if isinstance(result, dict) and isinstance(result.get("b64"), str):
            try:
                raw = base64.b64decode(result["b64"])
            except (binascii.Error, ValueError):
                raise StoreError(f"edgeway.batch sent a value that is not base64: {str(result)[:80]}") from None
            return raw if command.binary else raw.decode(errors="replace")
    elif isinstance(command, Set):
        if not command.only_if_absent:
            return None
        if isinstance(result, bool):
            return result
    elif isinstance(command, Publish):
        return None
    elif isinstance(command, Delete | Heartbeat | Incr):
        if type(result) is int:
            return result
    elif isinstance(command, Revoke):
        return None
    elif isinstance(command, Revoked):
        if type(result) is bool:
            return result
    elif isinstance(command, BreakerUpdate):
        if isinstance(result, list) and len(result) == 6 and all(type(v) is int for v in result):
            return BreakerResult(result[0], result[1], result[2], result[3] == 1, result[4], result[5])
    elif isinstance(command, RateLimit):
        if command.guard is not None and result == [2]:
            return RateLimitResult(False, (), revoked=True)
        count = len(command.checks)
        if isinstance(result, list) and len(result) == 1 + 4 * count and all(type(v) is int for v in result):
            states = tuple(
                LimitState(result[i] == 1, result[i + 1], result[i + 2], result[i + 3])
                for i in range(1, len(result), 4)
            )
            return RateLimitResult(result[0] == 1, states)
    raise StoreError(f"unexpected edgeway.batch result for {type(command).__name__}: {result!r}")


class _Refused(Exception):
    """The database refused the batch's data (it rolled back): each command gets a CommandError."""


# -- deadlines ---------------------------------------------------------------------


class _Bounded:
    """Runs calls as tasks and stops waiting at the deadline; late tasks are cancelled, not awaited."""

    def __init__(self) -> None:
        self._late: set[asyncio.Task[Any]] = set()

    async def run(self, work: Coroutine[Any, Any, T], deadline: float) -> T:
        task = asyncio.ensure_future(work)
        try:
            done, _ = await asyncio.wait((task,), timeout=deadline)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            task.cancel()
            self._late.add(task)
            task.add_done_callback(self._forget)
            raise StoreTimeout(f"store did not answer within {deadline * 1000:.0f} ms")
        return task.result()

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._late.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a late failure is no news

    async def drain(self) -> None:
        for task in self._late:
            task.cancel()
        if self._late:
            await asyncio.wait(self._late, timeout=1.0)


class _BatchStore(Store):
    """What both stores share: the clock, deadlines and the one-call-per-batch shape."""

    def __init__(self, *, timeout: float | None, clock: Clock | None) -> None:
        self._timeout = timeout
        self._clock = clock
        self._bounded = _Bounded()

    async def execute(self, commands: Sequence[Command], *, timeout: float | None = None) -> list[object]:
        deadline = timeout if timeout is not None else self._timeout
        now_ms = None if self._clock is None else math.floor(self._clock() * 1000)
        payload = json.dumps(encode_commands(commands), ensure_ascii=False, separators=(",", ":"))
        try:
            results = await self._bounded.run(self._call(payload, now_ms),
                                              _BACKSTOP if deadline is None else deadline)
        except _Refused as refused:
            return [CommandError(f"store refused the batch: {refused}") for _ in commands]
        return decode_results(commands, results)

    async def ping(self) -> None:
        """Answer an empty batch: proves the connection, the migration and the grants."""
        results = await self._bounded.run(self._call("[]", None), max(self._timeout or 0.0, 1.0))
        if results != []:
            raise StoreError(f"unexpected edgeway.batch answer to an empty batch: {str(results)[:200]}")

    @abc.abstractmethod
    async def _call(self, payload: str, now_ms: int | None) -> object:
        """Run ``edgeway.batch`` once; each transport implements it."""


# -- postgres:// -------------------------------------------------------------------

POSTGRES_EXTRA = "pip install 'edgeway[postgres]'"


def _asyncpg() -> ModuleType:
    # an extra: only the direct postgres:// store needs it (Supabase goes over HTTPS)
    try:
        import asyncpg as module
    except ImportError:
        raise StoreConfigurationError(
            f"the postgres store needs asyncpg, which is not installed: {POSTGRES_EXTRA}") from None
    found: ModuleType = module
    return found


async def _reset(connection: asyncpg.Connection) -> None:
    """Return a connection to the pool without asyncpg's default reset query.

    The default (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``)
    is a second transaction and round trip per request, which we never need:
    a batch is one autocommitted statement whose advisory locks are
    transaction-scoped. Only a transaction left open (a cancelled call) is
    rolled back.
    """
    if connection.is_in_transaction():
        await connection.execute("ROLLBACK")


class _Listener:
    """LISTEN/NOTIFY on one dedicated connection per store, reopened with backoff when it is lost."""

    def __init__(self, dsn: str, where: str, pg: ModuleType) -> None:
        self._pg = pg  # asyncpg, imported by the store (an extra)
        self._dsn = dsn
        self._where = where
        self._fanout = Fanout(self._sync)
        self._task: asyncio.Task[None] | None = None
        self._connection: asyncpg.Connection | None = None
        self._listening: set[str] = set()
        self._ready = asyncio.Event()

    async def subscribe(self, channel: str, handler: Handler) -> Subscription:
        if self._task is None or self._task.done():
            self._ready = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())
        subscription = await self._fanout.add(channel, handler)
        with contextlib.suppress(TimeoutError):  # the first connection: LISTEN before returning
            await asyncio.wait_for(self._ready.wait(), _CONNECT_TIMEOUT)
        return subscription

    def _notified(self, connection: object, pid: int, channel: str, payload: object) -> None:
        self._fanout.dispatch(channel, str(payload))

    async def _sync(self) -> None:
        connection = self._connection
        if connection is None or connection.is_closed():
            return
        wanted = set(self._fanout.channels)
        try:
            for channel in sorted(wanted - self._listening):
                await connection.add_listener(channel, self._notified)
                self._listening.add(channel)
            for channel in sorted(self._listening - wanted):
                await connection.remove_listener(channel, self._notified)
                self._listening.discard(channel)
        except (self._pg.PostgresError, self._pg.InterfaceError, self._pg.InternalClientError, OSError) as exc:
            logger.warning("PostgreSQL LISTEN on %s failed (%s); reconnecting", self._where, exc)
            connection.terminate()

    async def _run(self) -> None:
        backoff = Backoff()
        failing = False
        while True:
            lost = asyncio.Event()
            try:
                self._connection = await self._pg.connect(
                    self._dsn, timeout=_CONNECT_TIMEOUT, server_settings={"application_name": "edgeway-listen"}
                )
                self._connection.add_termination_listener(lambda _connection, lost=lost: lost.set())
                self._listening = set()
                await self._sync()
                if not self._connection.is_closed():
                    failing = False
                    backoff.reset()
                    self._ready.set()
                    await lost.wait()
                error: object = "connection closed"
            except (self._pg.PostgresError, self._pg.InterfaceError, self._pg.InternalClientError, OSError,
                    TimeoutError) as exc:
                error = exc
            finally:
                if self._connection is not None and not self._connection.is_closed():
                    self._connection.terminate()
                self._connection = None
            self._ready.set()  # nobody waits for a LISTEN that cannot happen now
            if not failing:
                logger.warning("PostgreSQL listener connection to %s lost (%s); reconnecting", self._where, error)
                failing = True
            await backoff.wait()

    async def close(self) -> None:
        """Stop the listener (its connection is terminated) and end every subscription made through it."""
        task, self._task = self._task, None
        self._fanout.close_all()
        await stop(task, f"the PostgreSQL listener of {self._where}")
        self._ready.set()


class PostgresStore(_BatchStore):
    """A direct PostgreSQL connection (an asyncpg pool, created on first use)."""

    kind = "postgres"
    notifies = True

    def __init__(
        self, dsn: str, *, timeout: float | None = 0.05, clock: Clock | None = None, pool_size: int = 10
    ) -> None:
        self._pg = _asyncpg()
        super().__init__(timeout=timeout, clock=clock)
        self._dsn = dsn
        self._pool_size = pool_size
        self._pool: SharedOpen[asyncpg.Pool] = SharedOpen(self._open)
        self._listener = _Listener(dsn, self.describe(), self._pg)

    async def subscribe(self, channel: str, handler: Handler) -> Subscription:
        """LISTEN on a dedicated connection (see the module docstring)."""
        return await self._listener.subscribe(channel, handler)

    def describe(self) -> str:
        parts = urlsplit(self._dsn)
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme or 'postgres'}://{host}{port}{parts.path}"

    async def _call(self, payload: str, now_ms: int | None) -> object:
        pool = self._pool.value or await self._pool.open()
        pg = self._pg
        try:
            async with pool.acquire() as connection:
                text = await connection.fetchval("select edgeway.batch($1::jsonb, $2::bigint)::text", payload, now_ms)
        except (pg.UndefinedFunctionError, pg.InvalidSchemaNameError) as exc:
            raise StoreError(_MISSING) from exc
        except pg.DataError as exc:
            raise _Refused(f"{exc.sqlstate}: {exc}") from exc
        except pg.InsufficientPrivilegeError as exc:
            raise StoreError(f"PostgreSQL refused edgeway.batch: {exc}; connect as a role granted EXECUTE") from exc
        except (pg.PostgresError, pg.InterfaceError, pg.InternalClientError, OSError) as exc:
            # InternalClientError: a connection the server dropped mid-protocol ("cannot switch to state")
            raise StoreError(f"PostgreSQL call failed: {type(exc).__name__}: {exc}") from exc
        return _loads(text, "PostgreSQL")

    async def _open(self) -> asyncpg.Pool:
        pg = self._pg
        try:
            pool: asyncpg.Pool = await pg.create_pool(
                self._dsn, min_size=1, max_size=self._pool_size, timeout=_CONNECT_TIMEOUT,
                command_timeout=_BACKSTOP, server_settings={"application_name": "edgeway"},
                reset=_reset,
            )
        except (pg.PostgresError, pg.InterfaceError, OSError, TimeoutError) as exc:
            detail = str(exc) or "timed out"
            raise StoreError(f"cannot connect to PostgreSQL at {self.describe()}: {detail}") from exc
        return pool

    async def close(self) -> None:
        await self._listener.close()
        await self._bounded.drain()
        pool, connecting = self._pool.take()
        if connecting is not None:  # a pool still being built, or built for a caller that gave up
            if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
                pool = pool or connecting.result()
            connecting.cancel()
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 2.0)
            except (TimeoutError, self._pg.InterfaceError, OSError):
                pool.terminate()


# -- Supabase (PostgREST RPC) -----------------------------------------------------


class _Poller:
    """Subscriptions over PostgREST: one task reading ``edgeway_events`` every POLL_EVERY seconds."""

    def __init__(self, read: Callable[[list[str]], Awaitable[object]], where: str) -> None:
        self._read = read
        self._where = where
        self._fanout = Fanout()
        self._seen: dict[int, float] = {}  # event id -> when first read (monotonic)
        self._task: asyncio.Task[None] | None = None

    async def subscribe(self, channel: str, handler: Handler) -> Subscription:
        if channel not in self._fanout.channels:
            # what the window already holds is history, not news: mark it seen before delivering anything
            with contextlib.suppress(StoreError):
                self._events(await self._read([channel]))
        subscription = await self._fanout.add(channel, handler)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return subscription

    def _events(self, answer: object) -> list[tuple[str, str]]:
        """The events not seen before, marking them seen."""
        if not isinstance(answer, list):
            raise StoreError(f"unexpected edgeway_events answer: {str(answer)[:200]}")
        now = asyncio.get_running_loop().time()
        fresh = []
        for event in answer:
            if isinstance(event, list) and len(event) == 3 and type(event[0]) is int and event[0] not in self._seen:
                self._seen[event[0]] = now
                fresh.append((str(event[1]), str(event[2])))
        for old in [i for i, at in self._seen.items() if at < now - _SEEN_FOR]:
            del self._seen[old]
        return fresh

    async def _run(self) -> None:
        backoff = Backoff(POLL_EVERY)
        failing = False
        while self._fanout.channels:
            try:
                for channel, message in self._events(await self._read(self._fanout.channels)):
                    self._fanout.dispatch(channel, message)
            except StoreError as exc:
                if not failing:
                    logger.warning("reading notifications from %s failed (%s); retrying", self._where, exc)
                failing = True
                await backoff.wait()
                continue
            failing = False
            backoff.reset()
            await asyncio.sleep(POLL_EVERY)

    async def close(self) -> None:
        """Stop polling and end every subscription made through it."""
        task, self._task = self._task, None
        self._fanout.close_all()
        await stop(task, f"the notification poller of {self._where}")


class SupabaseStore(_BatchStore):
    """Supabase over HTTPS: ``POST {url}/rest/v1/rpc/edgeway_batch`` with the service role key."""

    kind = "supabase"
    notifies = True

    def __init__(self, url: str, key: str, *, timeout: float | None = 0.05, clock: Clock | None = None) -> None:
        super().__init__(timeout=timeout, clock=clock)
        self._url = url.rstrip("/")
        self._endpoint = f"{self._url}/rest/v1/rpc/edgeway_batch"
        self._events_endpoint = f"{self._url}/rest/v1/rpc/edgeway_events"
        self._headers = {"apikey": key, "Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self._client: httpx.AsyncClient | None = None
        self._poller = _Poller(self._read_events, self.describe())

    async def subscribe(self, channel: str, handler: Handler) -> Subscription:
        """Polls ``edgeway_events`` every 0.5 s while subscribed (see the module docstring)."""
        return await self._poller.subscribe(channel, handler)

    async def _read_events(self, channels: list[str]) -> object:
        body = json.dumps({"channels": channels}).encode()
        return await self._bounded.run(self._post(self._events_endpoint, body), max(self._timeout or 0.0, 2.0))

    def describe(self) -> str:
        parts = urlsplit(self._url)
        port = f":{parts.port}" if parts.port else ""
        return f"supabase+{parts.scheme}://{parts.hostname}{port}{parts.path}"

    def _http(self) -> httpx.AsyncClient:
        if self._client is None or self._client.is_closed:
            never = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))  # stores no cookie, ever
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(_BACKSTOP, connect=_CONNECT_TIMEOUT), cookies=never,
                limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
            )
        return self._client

    async def _call(self, payload: str, now_ms: int | None) -> object:
        body = f'{{"commands":{payload},"now_ms":{"null" if now_ms is None else now_ms}}}'
        return await self._post(self._endpoint, body.encode())

    async def _post(self, endpoint: str, body: bytes) -> object:
        try:
            response = await self._http().post(endpoint, content=body, headers=self._headers)
        except httpx.TimeoutException as exc:
            raise StoreTimeout(f"Supabase did not answer: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            raise StoreError(f"Supabase request failed: {type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if status == 200:
            return _loads(response.text, "Supabase")
        detail = _error_text(response.text)
        if status in (401, 403):
            raise StoreError(f"Supabase refused the key (HTTP {status}: {detail}): check the service role key")
        if status == 404:
            raise StoreError(f"{_MISSING} (HTTP 404: {detail})")
        if status == 400:  # PostgREST's answer to a data exception (SQLSTATE 22): the batch, not the store
            raise _Refused(f"HTTP 400: {detail}")
        raise StoreError(f"Supabase answered HTTP {status}: {detail}")

    async def close(self) -> None:
        await self._poller.close()
        await self._bounded.drain()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(TimeoutError, httpx.HTTPError, OSError):
                await asyncio.wait_for(client.aclose(), 2.0)


def _loads(text: str | None, where: str) -> object:
    if text is None:
        raise StoreError(f"{where} returned no edgeway.batch result")
    try:
        return json.loads(text)
    except ValueError:
        raise StoreError(f"{where} answered with invalid JSON: {text[:200]!r}") from None


def _error_text(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        return text[:200] or "no body"
    if isinstance(data, dict):
        return str(data.get("message") or data.get("error") or data)[:200]
    return text[:200]
