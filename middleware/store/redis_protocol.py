"""Commands as Redis sees them, shared by every Redis-speaking backend.

:class:`RedisProtocolStore` turns a request's commands into Redis commands
(``GET``, ``SET .. PX [NX]``, ``DEL``, ``PUBLISH``, ``EVALSHA``), hands them to a
transport as ONE batch, and decodes the replies. TCP Redis and Upstash REST
differ only in the transport: both implement :class:`Transport`, which also
says how bytes travel (RESP carries them anywhere; Upstash's raw-body form only as
the last argument, see ``lua/setbin.lua``).

Error replies come in two kinds (see :mod:`.base`): a server that cannot do the
work (``READONLY`` replica, ``OOM`` under ``noeviction``, ``LOADING``,
``MASTERDOWN`` ...) fails the whole batch with :class:`StoreError`, so failover
counts it; any other error reply (``WRONGTYPE``, a script error) is that
command's :class:`CommandError` result. After a timeout, or a reply saying the
server is not (or no longer) a usable primary, the connection is dropped so the
next call reconnects: a half-open connection or a demoted server is never
asked again.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import math
from collections.abc import Sequence
from importlib import resources

from .base import (
    BreakerResult,
    BreakerUpdate,
    Clock,
    Command,
    CommandError,
    Delete,
    Get,
    Heartbeat,
    Incr,
    IndexAdd,
    IndexPurge,
    LimitState,
    Publish,
    RateLimit,
    RateLimitResult,
    Revoke,
    Revoked,
    Set,
    Store,
    StoreError,
    StoreTimeout,
)

RedisArg = str | bytes | int | float
RedisCommand = tuple[RedisArg, ...]


class ReplyError(Exception):
    """An error reply for one command (``-ERR ...``, ``{"error": ...}``)."""


# Error codes of a server that cannot serve the work right now (Redis error replies start with a code, also
# when raised from inside a script): a store failure for failover, not the command's fault.
UNAVAILABLE = ("READONLY", "OOM", "LOADING", "MASTERDOWN", "NOREPLICAS", "BUSY", "MISCONF", "CLUSTERDOWN",
               "TRYAGAIN", "NOAUTH", "NOPERM")
# ... and of those, the ones that mean this connection points at the wrong server: reconnect.
RECONNECT = ("READONLY", "LOADING", "MASTERDOWN")


def _code(reply: ReplyError) -> str:
    text = str(reply)
    if text.startswith("ERR ") and "-" in text[:200]:  # older Redis wraps a script's error: "ERR ... -OOM ..."
        for code in UNAVAILABLE:
            if f"-{code} " in text or f": {code} " in text:
                return code
    return text.split(" ", 1)[0]


class Script:
    """A Lua script shipped as package data, called by SHA1 and re-sent on NOSCRIPT."""

    def __init__(self, name: str) -> None:
        self.source = resources.files("edgeway.middleware.store").joinpath("lua", name).read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


RATE_LIMIT_SCRIPT = Script("ratelimit.lua")
HEARTBEAT_SCRIPT = Script("heartbeat.lua")
INCR_SCRIPT = Script("incr.lua")
CAD_SCRIPT = Script("cad.lua")
SETBIN_SCRIPT = Script("setbin.lua")
INDEX_ADD_SCRIPT = Script("index_add.lua")
INDEX_PURGE_SCRIPT = Script("index_purge.lua")
BREAKER_SCRIPT = Script("breaker.lua")
SCRIPTS = (RATE_LIMIT_SCRIPT, HEARTBEAT_SCRIPT, INCR_SCRIPT, CAD_SCRIPT, SETBIN_SCRIPT, INDEX_ADD_SCRIPT,
           INDEX_PURGE_SCRIPT, BREAKER_SCRIPT)
"""Loaded by each new connection (TCP) or the first pipeline (REST) ahead of any command."""
_SOURCES = {script.sha: script.source for script in SCRIPTS}


class Transport(abc.ABC):
    """Carries one batch of Redis commands in one round trip.

    ``submit`` returns at once with a future for the batch's replies (one per
    command, a :class:`ReplyError` in place of each failed command), so
    concurrent requests' batches can share a network write or HTTP request
    (auto-pipelining). The future fails with :class:`StoreError` when the
    whole batch is lost.
    """

    binary_safe: bool = True
    """Whether any argument may be ``bytes``; False: only the last one (see ``lua/setbin.lua``)."""

    def value_bytes(self, reply: str | bytes) -> bytes:
        """A bulk-string reply (a value read by ``GET``) as the bytes Redis holds."""
        return reply if isinstance(reply, bytes) else reply.encode("utf-8", "surrogateescape")

    def value_text(self, reply: str | bytes) -> str:
        """A bulk-string reply as text; bytes that are not UTF-8 become U+FFFD."""
        if isinstance(reply, str) and reply.isascii():
            return reply  # the common case, without a round trip through bytes
        return self.value_bytes(reply).decode(errors="replace")

    @abc.abstractmethod
    def submit(self, commands: Sequence[RedisCommand]) -> asyncio.Future[list[object]]:
        """Queue ``commands`` for the next flush of this event-loop turn."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close connections; a later ``submit`` reconnects."""

    def recycle(self) -> None:  # noqa: B027  (a no-op is right for transports without a long-lived connection)
        """Drop the current connection (after a timeout or a demoted server): the next ``submit`` reconnects."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Location without credentials."""


def _expire(future: asyncio.Future[list[object]], timeout: float, due: float | None,
            loop: asyncio.AbstractEventLoop) -> None:
    if future.done():
        return
    if due is not None:
        # The reply may be in the socket, unread: the loop stalled (busy, or the process descheduled at full
        # CPU) since it last polled for I/O, and uvloop runs due timers before it polls again. Loop lag is not
        # the store being slow: the reader gets one more turn — a timer armed now fires only after the next
        # poll, as long as this one fired late, at least a millisecond, at most the timeout — then it fails.
        extra = min(max(loop.time() - due, 0.001), timeout)
        loop.call_later(extra, _expire, future, timeout, None, loop)
        return
    future.set_exception(StoreTimeout(f"store did not answer within {timeout * 1000:.0f} ms"))


async def wait_for_batch(future: asyncio.Future[list[object]], timeout: float | None) -> list[object]:
    """Await a batch with a deadline, using a timer rather than a task (cheap on the hot path).

    Only the store's time counts: when the timer fires, the reader gets one more turn (see ``_expire``), so
    event-loop lag is not taken for a slow store, and a store that is really silent still fails about when
    the timeout says.
    """
    if timeout is None:
        return await future
    loop = asyncio.get_running_loop()
    handle = loop.call_later(timeout, _expire, future, timeout, loop.time() + timeout, loop)
    try:
        return await future
    finally:
        handle.cancel()


class RedisProtocolStore(Store):
    """A :class:`Store` over any :class:`Transport`; see the module docstring."""

    def __init__(self, transport: Transport, *, timeout: float | None = 0.05, clock: Clock | None = None):
        self._transport = transport
        self._timeout = timeout
        self._clock = clock

    def describe(self) -> str:
        return self._transport.describe()

    async def close(self) -> None:
        await self._transport.close()

    async def ping(self) -> None:
        replies = await self._send([("PING",)], self._timeout_or(1.0))
        if isinstance(replies[0], ReplyError):
            raise StoreError(f"PING failed: {replies[0]}")

    async def memory_usage(self) -> tuple[int, int] | None:
        replies = await wait_for_batch(self._transport.submit([("INFO", "memory")]), self._timeout_or(1.0) * 20)
        info = replies[0]
        if isinstance(info, ReplyError) or not isinstance(info, bytes | str):
            return None  # e.g. a hosted Redis that does not offer INFO
        fields = dict(line.split(":", 1) for line in _text(info).splitlines() if ":" in line)
        try:
            return int(fields["used_memory"]), int(fields.get("maxmemory", "0"))
        except (KeyError, ValueError):
            return None

    async def _send(self, encoded: Sequence[RedisCommand], deadline: float | None) -> list[object]:
        try:
            replies = await wait_for_batch(self._transport.submit(encoded), deadline)
        except StoreTimeout:
            self._transport.recycle()  # the connection may be half-open: never wait on it again
            raise
        for reply in replies:
            if type(reply) is ReplyError and (code := _code(reply)) in UNAVAILABLE:
                if code in RECONNECT:
                    self._transport.recycle()
                raise StoreError(f"Redis cannot serve this now: {reply}")
        return replies

    def _timeout_or(self, default: float) -> float:
        return self._timeout if self._timeout is not None else default

    async def execute(self, commands: Sequence[Command], *, timeout: float | None = None) -> list[object]:
        riding = _riding(commands) if len(commands) > 1 else None
        sent = commands if riding is None else [c for i, c in enumerate(commands) if i not in riding]
        encoded = [self._encode(command) for command in sent]
        deadline = timeout if timeout is not None else self._timeout
        replies = await self._send(encoded, deadline)
        if any(type(reply) is ReplyError for reply in replies) and (
            missing := [i for i, reply in enumerate(replies) if _is_noscript(reply)]
        ):
            # the server lost its script cache (restart, failover, FLUSH): send the source once
            retry = [self._with_source(encoded[i]) for i in missing]
            again = await self._send(retry, deadline)
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        results = [self._decode(command, reply) for command, reply in zip(sent, replies, strict=True)]
        if riding is None:
            return results
        results, unanswered = _answer_riding(len(commands), riding, results)
        if unanswered:  # the store refused the carrier: the check is read on its own after all
            try:
                again = await self.execute([commands[i] for i in unanswered], timeout=timeout)
            except StoreError as error:  # the batch itself went through (and charged): not a failed batch
                again = [CommandError(f"store refused Revoked: {error}")] * len(unanswered)
            for i, result in zip(unanswered, again, strict=True):
                results[i] = result
        return results

    def _decode(self, command: Command, reply: object) -> object:
        if isinstance(command, Revoked) and isinstance(reply, list):
            value_bytes = self._transport.value_bytes
            return any(isinstance(value, str | bytes) and _revoked_after(value_bytes(value), command.issued_at_ms)
                       for value in reply)
        if isinstance(command, Get) and isinstance(reply, str | bytes):
            return self._transport.value_bytes(reply) if command.binary else self._transport.value_text(reply)
        return _decode(command, reply)

    def _encode(self, command: Command) -> RedisCommand:
        if isinstance(command, Get):
            return ("GET", command.key)
        if isinstance(command, Set):
            ttl = max(1, command.ttl_ms)
            if isinstance(command.value, bytes) and not self._transport.binary_safe:
                nx = 1 if command.only_if_absent else 0
                return ("EVALSHA", SETBIN_SCRIPT.sha, 1, command.key, ttl, nx, command.value)
            if command.only_if_absent:
                return ("SET", command.key, command.value, "PX", ttl, "NX")
            return ("SET", command.key, command.value, "PX", ttl)
        if isinstance(command, Delete):
            if command.if_value is None:
                return ("DEL", command.key)
            return ("EVALSHA", CAD_SCRIPT.sha, 1, command.key, command.if_value)
        if isinstance(command, Incr):
            return ("EVALSHA", INCR_SCRIPT.sha, 1, command.key, command.amount, max(1, command.ttl_ms))
        if isinstance(command, Publish):
            return ("PUBLISH", command.channel, command.message)
        if isinstance(command, IndexAdd):
            # the server's clock, as for the member keys' own TTLs
            return ("EVALSHA", INDEX_ADD_SCRIPT.sha, 1, command.index, f"{command.label}|{command.member}",
                    max(1, command.ttl_ms))
        if isinstance(command, IndexPurge):
            if command.label is None:
                return ("EVALSHA", INDEX_PURGE_SCRIPT.sha, 1, command.index, "")
            return ("EVALSHA", INDEX_PURGE_SCRIPT.sha, 1, command.index, "1", command.label)
        if isinstance(command, RateLimit):
            guard = command.guard
            args: list[RedisArg] = ["EVALSHA", RATE_LIMIT_SCRIPT.sha,
                                    len(command.checks) + (len(guard.keys) if guard else 0)]
            args.extend(check.key for check in command.checks)
            if guard is not None:
                args.extend(guard.keys)
            args.append("" if self._clock is None else math.floor(self._clock() * 1000))
            for check in command.checks:
                args.extend(
                    (
                        check.algorithm,  # a StrEnum: the value itself (.value costs ~0.2 us a lookup)
                        check.quota,
                        check.window_ms,
                        check.cost,
                        check.burst,
                        1 if check.enforced else 0,
                    )
                )
            if guard is not None:
                args.extend((guard.issued_at_ms, len(guard.keys)))
            return tuple(args)
        if isinstance(command, Revoked):
            return ("MGET", *command.keys)
        if isinstance(command, Revoke):
            return ("SET", command.key, command.at_ms, "PX", max(1, command.ttl_ms))
        if isinstance(command, Heartbeat):
            now: RedisArg = "" if self._clock is None else math.floor(self._clock() * 1000)
            return ("EVALSHA", HEARTBEAT_SCRIPT.sha, 1, command.key, command.instance, command.ttl_ms, now)
        if isinstance(command, BreakerUpdate):
            at: RedisArg = "" if self._clock is None else math.floor(self._clock() * 1000)
            event = command.event
            return ("EVALSHA", BREAKER_SCRIPT.sha, 1, command.key, at, *command.rule, event.successes,
                    event.failures, int(event.probe), int(event.acquire), int(event.reset), event.seed_phase,
                    event.seed_remaining_ms, event.seed_streak, event.jitter)
        raise TypeError(f"unknown store command {command!r}")

    @staticmethod
    def _with_source(command: RedisCommand) -> RedisCommand:
        return ("EVAL", _SOURCES[str(command[1])], *command[2:])


def _riding(commands: Sequence[Command]) -> dict[int, int] | None:
    """Revocation checks that a rate limit of the same batch carries as its guard: position -> the carrier's.

    The script reads the same keys first (``lua/ratelimit.lua``), so a separate MGET would only repeat it.
    """
    riding: dict[int, int] | None = None
    for i, command in enumerate(commands):
        if type(command) is RateLimit and command.guard is not None:
            guard = command.guard
            for j, other in enumerate(commands):  # the same check, sent alongside (the session's own)
                if other is guard:
                    riding = riding or {}
                    riding[j] = i
    return riding


def _answer_riding(count: int, riding: dict[int, int], sent: list[object]) -> tuple[list[object], list[int]]:
    """All ``count`` results in command order, each riding check answered by its carrier's ``revoked``; and
    the checks whose carrier the store refused (they have no answer yet)."""
    answers = iter(sent)
    results = [None if i in riding else next(answers) for i in range(count)]
    unanswered = []
    for i, carrier in riding.items():
        result = results[carrier]
        if isinstance(result, RateLimitResult):
            results[i] = result.revoked
        else:
            unanswered.append(i)
    return results, unanswered


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _is_noscript(reply: object) -> bool:
    return isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT")


def _decode(command: Command, reply: object) -> object:
    if isinstance(reply, ReplyError):
        return CommandError(f"store refused {type(command).__name__}: {reply}")
    if isinstance(command, Get):
        if reply is None or isinstance(reply, str):
            return reply
        if isinstance(reply, bytes):
            return reply.decode()
        raise StoreError(f"unexpected GET reply {reply!r}")
    if isinstance(command, Set):
        return reply is not None if command.only_if_absent else None
    if isinstance(command, IndexAdd):
        return None
    if isinstance(command, Delete | Incr | Publish | IndexPurge):
        return int(reply)  # type: ignore[call-overload]
    if isinstance(command, RateLimit):
        if command.guard is not None and reply == [2]:
            return RateLimitResult(False, (), revoked=True)
        return _decode_rate_limit(reply, len(command.checks))
    if isinstance(command, Revoke):
        return None
    if isinstance(command, Revoked):
        raise StoreError(f"unexpected MGET reply {reply!r}")
    if isinstance(command, Heartbeat):
        return int(reply)  # type: ignore[call-overload]
    if isinstance(command, BreakerUpdate):
        return decode_breaker(reply)
    raise TypeError(f"unknown store command {command!r}")


def _revoked_after(value: bytes, issued_at_ms: int) -> bool:
    return value.lstrip(b"-").isdigit() and int(value) > issued_at_ms


def decode_breaker(reply: object) -> BreakerResult:
    """A breaker update's six integers; StoreError when the reply is anything else."""
    if not isinstance(reply, list) or len(reply) != 6:
        raise StoreError(f"unexpected breaker reply {reply!r}")
    try:
        phase, remaining, failures, granted, reason, streak = (int(value) for value in reply)
    except (TypeError, ValueError):
        raise StoreError(f"unexpected breaker reply {reply!r}") from None
    return BreakerResult(phase, remaining, failures, granted == 1, reason, streak)


def _decode_rate_limit(reply: object, count: int) -> RateLimitResult:
    if not isinstance(reply, list) or len(reply) != 1 + 4 * count:
        raise StoreError(f"unexpected rate-limit reply {reply!r}")
    try:
        values = reply if all(type(v) is int for v in reply) else [int(v) for v in reply]
    except (TypeError, ValueError):
        raise StoreError(f"unexpected rate-limit reply {reply!r}") from None
    states = tuple([
        LimitState(values[i] == 1, values[i + 1], values[i + 2], values[i + 3]) for i in range(1, len(values), 4)
    ])
    return RateLimitResult(values[0] == 1, states)
