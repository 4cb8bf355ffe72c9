"""Prometheus metrics shared by the policies and the gateway (``/_edgeway/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
UPSTREAM_ERRORS = Counter(
    "edgeway_upstream_errors_total",
    "Requests the gateway answered itself because the upstream failed.",
    ["upstream", "error"],
)
STORE_UP = Gauge("edgeway_store_up", "1 while the store answers readiness probes.", ["store"])
STORE_MODE = Gauge("edgeway_store_mode", "1 for the store currently serving shared state.", ["mode"])
STORE_MODE_CHANGES = Counter(
    "edgeway_store_mode_changes_total", "Failovers and recoveries between stores.", ["from_mode", "to_mode"]
)
STORE_FALLBACKS = Counter(
    "edgeway_store_fallbacks_total",
    "Store batches that failed or timed out on one store of the chain and went on to the next one.",
    ["store"],  # the store that failed them; its quota did not decide them (counters don't move between stores)
)
CACHE_REQUESTS = Counter(
    "edgeway_cache_requests_total",
    "Requests on cached routes by what the cache did.",
    ["route", "status"],  # hit | miss | stale | bypass | collapsed
)
CACHE_STORED_BYTES = Counter(
    "edgeway_cache_stored_bytes",
    "Bytes of response bodies written to the cache, by route (exported as _total).",
    ["route"],
)
DROPPED_HEADERS = Counter(
    "edgeway_dropped_headers_total",
    "Request header fields the gateway dropped instead of forwarding, by reason.",
    ["reason"],  # underscore: a name with '_' (headers_with_underscores: drop)
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

# -- session cache (names as issue 13 defines them) -----------------------------------------------

_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

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
