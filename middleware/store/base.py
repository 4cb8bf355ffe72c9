"""The store contract: what every policy may ask of shared state.

A policy never talks to Redis, Upstash or memory directly. It describes what it
needs as *commands* (small frozen values) and hands the whole list for one
request to :meth:`Store.execute`, which costs exactly one network round trip on
the remote backends. Backends differ only in how they carry the commands:

- :class:`~edgeway.middleware.store.memory.MemoryStore` runs them in-process;
- :class:`~edgeway.middleware.store.redis.RedisStore` sends them over RESP, pipelined;
- :class:`~edgeway.middleware.store.upstash.UpstashStore` posts them to ``/pipeline``.

Besides the batch, a store may carry notifications between instances
(:class:`Publish` in a batch, :meth:`Store.subscribe` to receive): "a cache
entry was purged", "a breaker opened", "reload the policy".

Exceptions::

    StoreError                 a call failed: the policy's failure mode decides
     +-- StoreTimeout          no answer within the store timeout
    StoreConfigurationError    a store URL or option that cannot work (ValueError)

Two kinds of failure, kept apart on purpose:

- a *store* failure (:class:`StoreError`: connection lost, timeout, a server
  that cannot write — ``READONLY``, ``OOM``, ``LOADING``) is raised by
  :meth:`Store.execute` for the whole batch. :class:`FailoverStore` counts it
  against the store's health and runs the batch on the next store.
- a *command* failure (:class:`CommandError`: a script error, ``WRONGTYPE``, a
  value the SQL function refuses) is the answer to that one command from a
  store that works. It is returned **in place of the command's result** (never
  raised), so the rest of the batch keeps its results, the store's health is
  untouched and the command is never re-run on a fallback, where it would
  only give a different answer. Whoever reads results checks for it: the
  pipeline hands a policy whose command failed to that policy's
  ``store_failed`` (its failure mode decides for that request alone).
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import NamedTuple

__all__ = [
    "Algorithm",
    "BreakerEvent",
    "BreakerResult",
    "BreakerRule",
    "BreakerUpdate",
    "Command",
    "CommandError",
    "Delete",
    "Get",
    "Handler",
    "Heartbeat",
    "Incr",
    "IndexAdd",
    "IndexPurge",
    "LimitCheck",
    "LimitState",
    "Publish",
    "RateLimit",
    "RateLimitResult",
    "Revoke",
    "Revoked",
    "Set",
    "Store",
    "StoreConfigurationError",
    "StoreError",
    "StoreTimeout",
    "Subscription",
]


class StoreError(Exception):
    """A store call failed; the calling policy's failure mode decides what happens."""


class StoreTimeout(StoreError):
    """The store did not answer within its timeout."""


class CommandError(Exception):
    """One command's error answer from a store that works; a *result* value, never raised by ``execute``.

    See the module docstring: it is that request's error, not a store outage.
    """

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.args == self.args

    def __hash__(self) -> int:
        return hash((type(self), self.args))


class StoreConfigurationError(ValueError):
    """A store URL or option that cannot work; the message says how to fix it."""


class Algorithm(enum.StrEnum):
    """Rate-limit algorithms, selected per limit with ``algorithm:``."""

    SLIDING_WINDOW = "sliding-window"
    """Weighted two-window estimate, O(1) memory per key: at most the quota per aligned window, but it
    assumes the previous window's traffic was spread evenly, so up to about 2x the quota can pass in the
    worst unaligned window-long span. Use sliding-log for an exact limit."""
    SLIDING_LOG = "sliding-log"
    """Exact: one sorted-set entry per unit in the window (O(quota) memory)."""
    FIXED_WINDOW = "fixed-window"
    """One counter per window; allows up to 2x quota across a window edge."""
    TOKEN_BUCKET = "token-bucket"
    """Refills quota/window per second up to ``burst`` tokens."""


@dataclass(frozen=True, slots=True)
class Get:
    """Read a value; the result is ``str | None``, or ``bytes | None`` with ``binary=True``.

    Values are bytes in every store: a text read of a value written as bytes
    decodes it as UTF-8 (invalid sequences become U+FFFD); a binary read of a
    value written as text returns its UTF-8 encoding.
    """

    key: str
    binary: bool = False


@dataclass(frozen=True, slots=True)
class Set:
    """Write a text or binary value with a TTL (every key Edgeway writes expires).

    The result is ``None``; with ``only_if_absent=True`` (a lock: ``SET NX PX``)
    it is ``True`` when the value was written and ``False`` when the key
    already existed (and was left untouched). Binary-safe on every backend,
    values up to several MB.
    """

    key: str
    value: str | bytes
    ttl_ms: int
    only_if_absent: bool = False


@dataclass(frozen=True, slots=True)
class Delete:
    """Delete a key; the result is the number of keys removed (0 or 1).

    With ``if_value``, delete only if the current value equals it, atomically
    (compare-and-delete: releasing a lock only its holder may release); text
    and bytes compare by their UTF-8 bytes.
    """

    key: str
    if_value: str | bytes | None = None


@dataclass(frozen=True, slots=True)
class Incr:
    """Add ``amount`` to the integer at ``key`` (0 when absent); the result is the new value (``int``).

    ``ttl_ms`` is set when the increment creates the key; an existing key keeps
    its expiry. A key holding a non-integer is a :class:`StoreError`. ``Get``
    reads the counter as its decimal text.
    """

    key: str
    amount: int = 1
    _: KW_ONLY
    ttl_ms: int


@dataclass(frozen=True, slots=True)
class Publish:
    """Send ``message`` to every current subscriber of ``channel`` (see :meth:`Store.subscribe`).

    The result is the number of subscribers it reached where the backend
    knows it (memory, Redis), else ``None`` (Upstash, PostgreSQL). Delivery is
    at most once and only to subscribers connected at the time: use it to say
    "something changed, re-read the store", never to carry state.
    """

    channel: str
    message: str


@dataclass(frozen=True, slots=True)
class IndexAdd:
    """Record ``member`` (a key) in the index ``index`` for ``ttl_ms``; the result is ``None``.

    An index names keys to delete together later (a cache route, a tag):
    :class:`IndexPurge` deletes them, all of them or those recorded with one
    ``label`` (the entries of one URL within a route's index, say). A label
    never contains ``|``. Members leave the index once their TTL passed; the
    index itself expires with its longest-lived member.
    """

    index: str
    member: str
    ttl_ms: int
    label: str = ""


@dataclass(frozen=True, slots=True)
class IndexPurge:
    """Delete every key recorded in ``index`` (only those recorded with ``label`` when it is given), and
    forget them; the result is how many of those keys existed (``int``)."""

    index: str
    label: str | None = None


CACHE_COMMANDS = (Get, Set, Delete, Incr, IndexAdd, IndexPurge)
"""Commands on per-instance caches: when the primary store is down they go to memory, never to a
shared fallback (a cache miss is acceptable, an error is not)."""


# LimitCheck, LimitState and RateLimitResult are NamedTuples: built for every request on the hot path,
# where a tuple is several times cheaper to create than a frozen dataclass.
class LimitCheck(NamedTuple):
    """One limit of a request: ``cost`` units against ``quota`` per ``window_ms`` on ``key``."""

    key: str
    algorithm: Algorithm
    quota: int
    window_ms: int
    cost: int = 1
    burst: int = 0
    """Token-bucket capacity; 0 means ``quota``."""
    enforced: bool = True
    """False for a shadow-mode limit: counted and reported, never the reason for a rejection."""


class LimitState(NamedTuple):
    """What the store knows of one limit after the decision."""

    allowed: bool
    """Whether this limit alone would admit the request."""
    remaining: int
    reset_ms: int
    retry_after_ms: int
    """0 when allowed; otherwise how long until the same request would pass."""


class RateLimitResult(NamedTuple):
    """The decision for all limits of one request, taken atomically."""

    allowed: bool
    """True when every enforced limit admits the request; only then is any limit charged."""
    states: tuple[LimitState, ...]
    revoked: bool = False
    """True when the command's guard found the session revoked: nothing was checked nor charged."""


@dataclass(frozen=True, slots=True)
class Revoked:
    """Whether a session is revoked: one of ``keys`` holds a time (ms) later than ``issued_at_ms``.

    The result is ``True`` or ``False``; ``None`` when the store serving the
    request cannot know (the per-instance memory fallback of a shared chain),
    so the session policy applies its failure mode. It is shared state: it
    fails over to Supabase/Postgres like rate limits, never to memory caches.
    """

    keys: tuple[str, ...]
    issued_at_ms: int


@dataclass(frozen=True, slots=True)
class Revoke:
    """Record a revocation: ``key`` holds ``at_ms`` (sessions issued before it are refused) for ``ttl_ms``.

    The result is ``None``. A :class:`FailoverStore` writes it to every
    healthy store of its chain, so it survives the primary failing later.
    """

    key: str
    at_ms: int
    ttl_ms: int


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Check all limits of one request together; charge all of them or none.

    The store's own clock decides the windows (Redis ``TIME`` inside the script),
    so instances with skewed clocks agree.
    """

    checks: tuple[LimitCheck, ...]
    guard: Revoked | None = None
    """A revocation check run first, atomically: when it finds the session revoked nothing is charged and the
    result is ``RateLimitResult(False, (), revoked=True)``. When the batch also holds that same check (the
    session's own), a backend may answer it from the guard (Redis does: one script call, no MGET)."""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Mark ``instance`` live in the set ``key`` for ``ttl_ms``; the result is how many instances are live."""

    key: str
    instance: str
    ttl_ms: int


class BreakerRule(NamedTuple):
    """How one circuit breaker trips and recovers; every time is in ms, every number an integer.

    The same integers reach the Lua script, the SQL function and
    :func:`edgeway.middleware.breaker_state.apply`, so every backend decides alike.
    """

    failures: int
    """Consecutive failures that open it (0: only the failure rate does)."""
    rate_bp: int
    """Failure rate in basis points (5000 = 50%) over the window that opens it (0: off)."""
    window_ms: int
    min_requests: int
    open_ms: int
    max_open_ms: int
    success_threshold: int
    probe_ms: int
    """How long the half-open probe token lasts before another instance may probe."""


class BreakerEvent(NamedTuple):
    """What one :class:`BreakerUpdate` reports and asks, applied in this order.

    ``reset`` closes the breaker; ``seed_*`` is the caller's last view, adopted
    only when the store holds no state for the breaker (it just failed over to a
    fresh store, so an open breaker stays open); ``successes`` then ``failures``
    are results (``probe``: they come from the half-open probe; a probe with
    neither hands the token back); ``acquire``
    asks for the probe token when the open time is over.
    """

    successes: int = 0
    failures: int = 0
    probe: bool = False
    acquire: bool = False
    reset: bool = False
    seed_phase: int = 0
    seed_remaining_ms: int = 0
    seed_streak: int = 0
    jitter: int = 0
    """Per mille taken off the open time if this update opens the breaker (callers draw 0..100 at random,
    so openings of different breakers and reopenings don't line up)."""


class BreakerResult(NamedTuple):
    """The breaker after a :class:`BreakerUpdate`."""

    phase: int
    """0 closed, 1 open, 2 half-open."""
    remaining_ms: int
    """Open: ms until a probe may go (0: now). Half-open: ms the probe token still runs."""
    failures: int
    """Consecutive failures while closed."""
    granted: bool
    """True when the caller may send the request (closed, or it got the probe token)."""
    reason: int
    """Why the phase changed with this update (see ``breaker_state.Reason``), 0 when it did not."""
    streak: int
    """Openings in a row (the open time grows with it)."""


_NOTHING = BreakerEvent()  # a plain read


@dataclass(frozen=True, slots=True)
class BreakerUpdate:
    """Read and change one breaker's shared state atomically; the result is a :class:`BreakerResult`.

    A key holding anything but breaker state gets a :class:`CommandError` result
    (the breaker then decides on its instance's own copy).
    """

    key: str
    rule: BreakerRule
    event: BreakerEvent = _NOTHING


Command = (Get | Set | Delete | Incr | Publish | IndexAdd | IndexPurge | RateLimit | Heartbeat | BreakerUpdate | Revoke
           | Revoked)
"""Every operation a policy may put in a request's batch."""

Clock = Callable[[], float]
"""Seconds since the epoch; injectable so tests can walk window edges without sleeping."""

Handler = Callable[[str], None]
"""Called with each message of a subscribed channel, on the event loop: it must return quickly
(schedule real work with ``asyncio.create_task``). An exception it raises is logged and dropped."""


class Subscription(abc.ABC):
    """A live subscription to one channel; ``await close()`` ends it (idempotent)."""

    channel: str

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop delivering messages and release what the subscription holds."""


class Store(abc.ABC):
    """Shared state for policies: one :meth:`execute` call is one round trip."""

    kind: str = "store"
    """Short name shown in ``/_edgeway/readyz`` and metrics (``memory``, ``redis``, ``upstash``)."""

    @abc.abstractmethod
    async def execute(self, commands: Sequence[Command], *, timeout: float | None = None) -> list[object]:
        """Run ``commands`` in order and return one result per command.

        Raises :class:`StoreError` (or :class:`StoreTimeout` after ``timeout``
        seconds, defaulting to the store's own) when the batch cannot be run;
        a batch is never half-reported. A command the store refuses on its own
        merits gets a :class:`CommandError` as its result instead.
        """

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise :class:`StoreError` unless the store answers."""

    async def memory_usage(self) -> tuple[int, int] | None:
        """``(used bytes, limit bytes)`` as the store reports them (limit 0: none), or None when it
        cannot tell. Called by a background sampler for metrics, never per request."""
        return None

    notifies: bool = False
    """Whether :meth:`subscribe` works on this backend (``False``: it raises :class:`StoreError`)."""

    async def subscribe(self, channel: str, handler: Handler) -> Subscription:
        """Call ``handler`` with every message later published to ``channel``.

        Messages published through any store object on the same backend (another
        instance) arrive within 1 s. The subscription survives the backend's
        failures: it reconnects and resubscribes in the background with backoff
        (messages published meanwhile are lost), so a store being down when
        subscribing is no error. Backends without notifications
        (``notifies = False``) raise :class:`StoreError`.
        """
        raise StoreError(f"the {self.kind} store carries no notifications")

    async def close(self) -> None:
        """Release connections and end every subscription made through this store, promptly even when
        the backend is unreachable; the store may be used again afterwards (it reconnects, and only new
        subscriptions hear anything)."""
        return None

    async def start(self) -> None:
        """Begin background work (heartbeats) at application startup; idempotent, a no-op by default."""
        return None

    def describe(self) -> str:
        """The store's location without credentials, for logs and readyz."""
        return f"{self.kind}://"
