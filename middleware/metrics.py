"""Every Prometheus metric family Edgeway exports at ``/_edgeway/metrics``.

One module holds them all, so the dashboard test, the docs and the policies
agree on the names. Rules for code that records them:

- Bind label children once, when a route or upstream is compiled
  (``REQUESTS.labels(route, ...)`` kept on the compiled object); calling
  ``labels()`` per request costs more than the increment itself.
- Under ``edgeway serve --workers N`` the CLI points ``PROMETHEUS_MULTIPROC_DIR``
  at a private directory before the workers start, so every worker writes its
  values there and one scrape sums them (:func:`scrape`). Each gauge therefore
  declares how workers' values combine (``multiprocess_mode``); that choice is
  part of the metric's meaning and is stated in its docstring.
- On the request path, count through :func:`tally` and :func:`timings` (bound once, like the children):
  an increment there is a plain integer addition, folded into the Prometheus child whenever metrics are
  collected (a scrape, a test reading ``REGISTRY``), where ``child.inc()`` takes a lock on every call. Under
  ``--workers N`` they are the children themselves: workers share values through files a scrape reads.
- Counters never go down; label values come from the policy (route, upstream,
  store kind) or from small fixed sets named in each docstring, never from
  request data, so cardinality stays bounded.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Protocol

import prometheus_client
from prometheus_client import REGISTRY, CollectorRegistry, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

# -- counting on the request path ------------------------------------------------------------------


class Increments(Protocol):
    """A counter child, or its :class:`Tally`."""

    def inc(self, amount: float = 1) -> None: ...


class Observations(Protocol):
    """A histogram child, or its :class:`Timings`."""

    def observe(self, amount: float) -> None: ...


class Tally:
    """A counter child's increments, added up in a plain number and folded into the child when metrics are
    collected. Only the event loop's thread increments; :func:`fold` may run in any thread."""

    __slots__ = ("child", "count", "folded")

    def __init__(self, child: prometheus_client.Counter) -> None:
        self.child = child
        self.count: float = 0
        self.folded: float = 0

    def inc(self, amount: float = 1) -> None:
        self.count += amount

    def fold(self) -> None:
        count = self.count  # read once: increments made meanwhile are folded next time
        if count != self.folded:
            self.child.inc(count - self.folded)
            self.folded = count


class Timings:
    """A histogram child's observations, counted per bucket in plain numbers and folded like :class:`Tally`."""

    __slots__ = ("bounds", "child", "counts", "folded", "folded_total", "total")

    def __init__(self, child: prometheus_client.Histogram) -> None:
        self.child = child
        self.bounds: list[float] = list(child._upper_bounds)  # the child's own bounds, +Inf last
        self.counts = [0] * len(self.bounds)
        self.folded = [0] * len(self.bounds)
        self.total = self.folded_total = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1  # the first bucket whose bound is >= amount, as observe
        self.total += amount

    def fold(self) -> None:
        buckets = self.child._buckets
        for index, count in enumerate(self.counts):
            if count != self.folded[index]:
                buckets[index].inc(count - self.folded[index])
                self.folded[index] = count
        total = self.total
        if total != self.folded_total:
            self.child._sum.inc(total - self.folded_total)
            self.folded_total = total


_PENDING: dict[object, Tally | Timings] = {}  # by child: one per label set, so bounded as the children are
_FOLDING = threading.Lock()


def _pending(child: object, kind: type[Tally] | type[Timings]) -> object:
    if multiprocess_dir() is not None:
        return child
    found = _PENDING.get(child)
    if found is None:
        found = _PENDING[child] = kind(child)  # type: ignore[arg-type]
    return found


def tally(child: prometheus_client.Counter) -> Increments:
    """What the request path increments instead of ``child`` (see the module docstring)."""
    return _pending(child, Tally)  # type: ignore[return-value]


def timings(child: prometheus_client.Histogram) -> Observations:
    """What the request path observes instead of ``child`` (see the module docstring)."""
    return _pending(child, Timings)  # type: ignore[return-value]


def fold() -> None:
    """Add every tally's and timing's new counts to its child (collecting a family calls this first)."""
    with _FOLDING:
        for pending in list(_PENDING.values()):
            pending.fold()


class _Folding:
    """A family whose children may count through :func:`tally` / :func:`timings`: folded before collected."""

    def collect(self) -> Iterable[Metric]:
        fold()
        return super().collect()  # type: ignore[misc, no-any-return]


class Counter(_Folding, prometheus_client.Counter):
    """A counter family (see :class:`_Folding`)."""


class Histogram(_Folding, prometheus_client.Histogram):
    """A histogram family (see :class:`_Folding`)."""


# Latency buckets (seconds): from a fast Redis round trip to a slow AI upstream.
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# -- requests and upstreams ------------------------------------------------------------------------

REQUESTS = Counter(
    "edgeway_requests_total",
    "Requests answered, by route, method and status code.",
    ["route", "method", "status"],
)
"""``route`` is the matched route's id (``id:`` or ``PATH@METHODS``) (``none`` when no route matched, ``admin`` for
``/_edgeway/*``); ``method`` is the standard method name or ``OTHER``; ``status`` the code sent."""

REQUEST_SECONDS = Histogram(
    "edgeway_request_duration_seconds",
    "Time from the request's arrival to the end of its response, by route.",
    ["route"],
    buckets=_SLOW,
)

UPSTREAM_SECONDS = Histogram(
    "edgeway_upstream_duration_seconds",
    "Time from sending a request upstream to receiving its status line and headers, by upstream.",
    ["upstream"],
    buckets=_SLOW,
)

UPSTREAM_ERRORS = Counter(
    "edgeway_upstream_errors_total",
    "Requests the gateway answered itself because the upstream failed.",
    ["upstream", "error"],  # bad_gateway | upstream_timeout
)

DROPPED_HEADERS = Counter(
    "edgeway_dropped_headers_total",
    "Request header fields the gateway dropped instead of forwarding, by reason.",
    ["reason"],  # underscore: a name with '_' (headers_with_underscores: drop)
)

# -- rate limits ------------------------------------------------------------------------------------

RATELIMIT_DECISIONS = Counter(
    "edgeway_ratelimit_decisions_total",
    "Rate-limit decisions per route and limit.",
    ["route", "limit", "outcome"],  # allowed | rejected | shadow_rejected | near_limit | exempt | local_block
)
RATELIMIT_KEY_FALLBACKS = Counter(
    "edgeway_ratelimit_key_fallbacks_total",
    "Requests whose limit key was missing, by the on_missing action taken.",
    ["route", "limit", "action"],  # ip | deny | skip
)
STORE_FAILURES = Counter(
    "edgeway_store_failures_total",
    "Store batches that failed or timed out, by the failure mode applied.",
    ["route", "mode"],  # open | closed
)
STORE_FALLBACKS = Counter(
    "edgeway_store_fallbacks_total",
    "Store batches that failed or timed out on one store of the chain and went on to the next one.",
    ["store"],  # the store that failed them; its quota did not decide them (counters don't move between stores)
)

# -- response cache ---------------------------------------------------------------------------------

CACHE_REQUESTS = Counter(
    "edgeway_cache_requests_total",
    "Requests on cached routes by what the cache did.",
    ["route", "status"],
)
"""``status``: ``hit`` (fresh entry served), ``miss`` (forwarded, maybe stored), ``stale`` (stale entry
served: stale-while-revalidate, stale-if-error, breaker open), ``bypass`` (not looked up: method,
Authorization, Cookie, session without ``user`` in the key), ``collapsed`` (served from a concurrent
request's fill)."""

CACHE_STORED_BYTES = Counter(
    "edgeway_cache_stored_bytes",
    "Bytes of response bodies written to the cache, by route (exported as _total).",
    ["route"],
)

CACHE_STORES = Counter(
    "edgeway_cache_stores_total",
    "Responses written to the cache, by route.",
    ["route"],
)

# -- circuit breaker --------------------------------------------------------------------------------

BREAKER_STATE = Gauge(
    "edgeway_breaker_state",
    "Breaker state per upstream as this instance last saw it: 0 closed, 1 open, 2 half-open.",
    ["upstream"],
    multiprocess_mode="livemostrecent",  # shared through the store: the latest observation wins
)
BREAKER_TRANSITIONS = Counter(
    "edgeway_breaker_transitions_total",
    "Breaker state changes made by this gateway, by upstream and new state.",
    ["upstream", "to"],  # closed | open | half_open
)
BREAKER_SHORT_CIRCUITED = Counter(
    "edgeway_breaker_short_circuited_total",
    "Requests answered without calling the upstream because its breaker was open (or past max_in_flight).",
    ["upstream"],
)

# -- session cache ----------------------------------------------------------------------------------

SESSION_CACHE = Counter(
    "edgeway_session_cache_total",
    "Session lookups by cache result.",
    ["result"],  # hit | miss | negative (a cached refusal)
)
SESSION_PROVIDER_CALLS = Counter(
    "edgeway_session_provider_calls_total",
    "Calls to the session provider (Supabase Auth /user, JWKS fetch), by outcome.",
    ["outcome"],  # valid | invalid | error | timeout
)
SESSION_PROVIDER_SECONDS = Histogram(
    "edgeway_session_provider_seconds",
    "Latency of session provider calls.",
    buckets=_SLOW,
)
SESSION_REVOCATIONS_UNCHECKED = Counter(
    "edgeway_session_revocations_unchecked_total",
    "Requests let through without a revocation check because no shared store could be read.",
    ["route"],
)

# -- stores -----------------------------------------------------------------------------------------

STORE_UP = Gauge(
    "edgeway_store_up",
    "1 while the store answers readiness probes, 0 when it does not.",
    ["store"],
    multiprocess_mode="livemostrecent",  # the latest probe result of any live worker
)
STORE_MODE = Gauge(
    "edgeway_store_mode",
    "Processes whose shared state is served by this store kind (1 per process; >0 on memory = fallback).",
    ["mode"],
    multiprocess_mode="livesum",
)
STORE_MODE_CHANGES = Counter(
    "edgeway_store_mode_changes_total", "Failovers and recoveries between stores.", ["from_mode", "to_mode"]
)
STORE_CALL_SECONDS = Histogram(
    "edgeway_store_call_duration_seconds",
    "Latency of one batch sent to a store of the chain, by store kind.",
    ["store"],
    buckets=_FAST,
)
STORE_ERRORS = Counter(
    "edgeway_store_errors_total",
    "Batches a store of the chain failed, by store kind and error.",
    ["store", "error"],  # timeout | error
)
STORE_COMMANDS = Counter(
    "edgeway_store_commands_total",
    "Commands sent to a store, by store kind and command kind (what a store's plan counts).",
    ["store", "kind"],  # kind: get | set | delete | ratelimit | heartbeat | budget | ... (the command type)
)
STORE_BUDGET_USED = Gauge(
    "edgeway_store_budget_used",
    "Commands counted this calendar month (UTC) against store.budget, as kept in the store.",
    ["store"],
    multiprocess_mode="livemax",  # every worker reads the same shared count; the largest is the latest
)
STORE_BUDGET_LIMIT = Gauge(
    "edgeway_store_budget_limit",
    "store.budget: commands allowed per calendar month (absent when no budget is set).",
    ["store"],
    multiprocess_mode="livemax",
)
STORE_MEMORY_USED = Gauge(
    "edgeway_store_memory_used_bytes",
    "Memory the store reports in use (Redis INFO used_memory), sampled in the background.",
    ["store"],
    multiprocess_mode="livemostrecent",
)
STORE_MEMORY_MAX = Gauge(
    "edgeway_store_memory_max_bytes",
    "The store's memory limit (Redis INFO maxmemory; 0 means none), sampled in the background.",
    ["store"],
    multiprocess_mode="livemostrecent",
)
LIVE_INSTANCES = Gauge(
    "edgeway_live_instances",
    "Gateway instances heartbeating through the shared store (what degraded limits divide by).",
    multiprocess_mode="livemax",
)

# -- policy -----------------------------------------------------------------------------------------

POLICY_RELOADS = Counter(
    "edgeway_policy_reloads_total",
    "Policy reloads by outcome.",
    ["outcome"],  # ok | failed
)
POLICY_VERSION = Gauge(
    "edgeway_policy_version",
    "Processes serving each policy version (the file's content hash); 1 per process.",
    ["version"],
    multiprocess_mode="livesum",
)

FAMILIES = (
    REQUESTS, REQUEST_SECONDS, UPSTREAM_SECONDS, UPSTREAM_ERRORS, DROPPED_HEADERS,
    RATELIMIT_DECISIONS, RATELIMIT_KEY_FALLBACKS, STORE_FAILURES,
    CACHE_REQUESTS, CACHE_STORED_BYTES, CACHE_STORES,
    BREAKER_STATE, BREAKER_TRANSITIONS, BREAKER_SHORT_CIRCUITED,
    SESSION_CACHE, SESSION_PROVIDER_CALLS, SESSION_PROVIDER_SECONDS, SESSION_REVOCATIONS_UNCHECKED,
    STORE_UP, STORE_MODE, STORE_MODE_CHANGES, STORE_FALLBACKS, STORE_CALL_SECONDS, STORE_ERRORS, STORE_COMMANDS,
    STORE_BUDGET_USED, STORE_BUDGET_LIMIT, STORE_MEMORY_USED, STORE_MEMORY_MAX, LIVE_INSTANCES,
    POLICY_RELOADS, POLICY_VERSION,
)
"""Every family above, for tests and tools (the dashboard test checks its queries against these)."""


def exported_names() -> frozenset[str]:
    """Every sample name a scrape can contain (``_total``, ``_bucket``, ``_sum``, ``_count``, ...)."""
    names: set[str] = set()
    for family in FAMILIES:
        for metric in family.describe():
            names.add(metric.name)
            if metric.type == "counter":
                names.update((metric.name + "_total", metric.name + "_created"))
            elif metric.type == "histogram":
                names.update(metric.name + suffix for suffix in ("_bucket", "_sum", "_count", "_created"))
    return frozenset(names)


def multiprocess_dir() -> str | None:
    """The directory workers share their values through, when running under ``--workers N``."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class _AllWorkers:
    """Every worker's values (read from the shared directory), plus the families no worker has recorded
    yet, so a scrape always names every family, as it does in a single process."""

    def collect(self) -> Iterator[Metric]:
        seen = set()
        for family in MultiProcessCollector(None).collect():  # type: ignore[no-untyped-call]
            seen.add(family.name)
            yield family
        for declared in FAMILIES:
            for family in declared.describe():
                if family.name not in seen:
                    yield family


_ATTEMPTS = 4


def scrape() -> bytes:
    """The Prometheus text of this process, or of every worker when running in multiprocess mode."""
    if multiprocess_dir() is None:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    registry.register(_AllWorkers())
    for _ in range(_ATTEMPTS - 1):
        try:
            return generate_latest(registry)
        except (struct.error, ValueError, OSError):
            # a worker that is starting has created its file but not yet sized it (or died): read again
            time.sleep(0.005)
    return generate_latest(registry)


def process_exiting() -> None:
    """Drop this worker's ``live*`` gauge values from the shared directory (its counters stay counted)."""
    if multiprocess_dir() is not None:
        mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
