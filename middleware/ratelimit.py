"""Rate limits that hold across instances: all of a route's limits in one atomic store call.

``RateLimitMiddleware(app, limits=[Limit(rate="10/minute"), Limit(rate="100/day")], store=...)``
is usable on its own; the gateway builds the same :class:`RateLimitPolicy`
from the ``limits:`` list of a route and runs it with the route's other
policies in one store round trip.
"""

from __future__ import annotations

import collections
import hashlib
import ipaddress
import json
import re
import time
from collections.abc import Iterable, Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .clientip import IPNetwork, TrustedProxies
from .context import RequestContext
from .metrics import RATELIMIT_DECISIONS, RATELIMIT_KEY_FALLBACKS, STORE_FAILURES, tally
from .pipeline import ASGIApp, PolicyPipeline, Throttled
from .policy import Answer, BasePolicy, Completed, Prepared
from .ratelimit_headers import HeaderLimit, RateLimitFields, policy_name, seconds_ceil
from .responses import ErrorResponse, Message
from .store import (
    Algorithm,
    Command,
    CommandError,
    LimitCheck,
    LimitState,
    RateLimit,
    RateLimitResult,
    Store,
    StoreError,
)
from .units import RateField
from .users import UserFrom, UserSource, find_user, user_source

KEY_KINDS = ("ip", "user", "global", "header:NAME", "query:NAME")
PROBLEM_TYPE = "https://iana.org/assignments/http-problem-types#quota-exceeded"
NEAR_LIMIT = 0.8  # envoyproxy/ratelimit's near-limit ratio
COST_BODY_LIMIT = 1_000_000  # JSON bodies larger than this are not parsed for cost_from
_JSON_PATH = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")


def _check_key_part(part: str) -> str:
    kind, sep, name = part.partition(":")
    if part in ("ip", "user", "global") or (sep and kind in ("header", "query") and name.strip()):
        return f"{kind}:{name.strip().lower()}" if kind == "header" else part
    raise ValueError(f"unknown key {part!r}: expected one of {', '.join(KEY_KINDS)} or a list of them")


class Override(BaseModel):
    """A different rate for one key value (e.g. a premium API key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    match: str = Field(description="The key value this override applies to (e.g. the API key).")
    rate: RateField


class Limit(BaseModel):
    """One rate limit of a route. Every field documents its default."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    rate: RateField = Field(description="Quota per period: 10/minute, 1000/day, 100/15m.")
    key: Annotated[tuple[str, ...], Field(description="ip | user | global | header:NAME | query:NAME, or a list.")] = (
        "ip",
    )
    algorithm: Algorithm = Field(
        Algorithm.SLIDING_WINDOW,
        description="sliding-window (default): O(1), at most the quota per aligned window but up to about 2x in the "
        "worst unaligned window-long span (it assumes the previous window's traffic was even); sliding-log: exact, "
        "O(quota) memory; fixed-window; token-bucket.",
    )
    burst: int | None = Field(None, ge=1, description="Token-bucket capacity; default the quota.")
    cost: int = Field(1, ge=1, description="Units one request consumes.")
    on_missing: Literal["ip", "deny", "skip"] = Field(
        "ip", description="When the key's header/query/user is absent: fall back to ip, answer 400, or skip."
    )
    on_store_failure: Literal["open", "closed"] = Field(
        "open", description="When no store answers: allow (default, like Envoy and Kong) or answer 503."
    )
    headers: Literal["ietf", "legacy", "both", "none"] = Field(
        "ietf", description="RateLimit-Policy/RateLimit fields (ietf), X-RateLimit-* (legacy), both or none."
    )
    mode: Literal["enforce", "shadow"] = Field(
        "enforce", description="shadow counts and reports but never rejects: roll a limit out safely."
    )
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9._\-]+$", description="Policy name in the headers.")
    ipv6_prefix: int = Field(64, ge=8, le=128, description="IPv6 clients share a limit per this prefix.")
    exempt: tuple[str, ...] = Field((), description="CIDRs or header:NAME=value that bypass this limit.")
    overrides: tuple[Override, ...] = Field((), description="Other rates for specific key values.")
    cost_from: str | None = Field(
        None,
        description="Debit the real cost after the response: response_header:NAME or a JSON path such as "
        "usage.total_tokens. `cost` is charged up front, the rest afterwards, also when the client leaves early "
        "(a JSON cost then needs the whole body; without it the up-front cost stands).",
    )

    @field_validator("cost_from")
    @classmethod
    def _cost_from(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.startswith("response_header:") and value.removeprefix("response_header:").strip():
            return value
        if _JSON_PATH.match(value.removeprefix("json:")):
            return value
        raise ValueError(f"bad cost_from {value!r}: expected response_header:NAME or a JSON path such as "
                         "usage.total_tokens")

    @field_validator("key", mode="before")
    @classmethod
    def _key(cls, value: object) -> tuple[str, ...]:
        parts = [value] if isinstance(value, str) else value
        if not isinstance(parts, list | tuple) or not parts:
            raise ValueError(f"expected a key such as ip or header:X-Api-Key, or a list of them; got {value!r}")
        return tuple(_check_key_part(str(part)) for part in parts)

    @field_validator("exempt", mode="before")
    @classmethod
    def _exempt(cls, value: object) -> tuple[str, ...]:
        entries = [value] if isinstance(value, str) else list(value or ())  # type: ignore[call-overload]
        for entry in entries:
            if isinstance(entry, str) and entry.startswith("header:") and "=" in entry:
                continue
            try:
                ipaddress.ip_network(str(entry), strict=False)
            except ValueError:
                message = f"bad exemption {entry!r}: expected a CIDR (10.0.0.0/8) or header:NAME=value"
                raise ValueError(message) from None
        return tuple(str(entry) for entry in entries)

    @model_validator(mode="after")
    def _burst_only_for_token_bucket(self) -> Limit:
        if self.burst is not None and self.algorithm is not Algorithm.TOKEN_BUCKET:
            raise ValueError(f"burst applies to algorithm token-bucket only, not {self.algorithm.value}")
        return self


class _CompiledLimit:
    """A limit with everything the request path needs precomputed (keys, counters, check fields)."""

    def __init__(self, limit: Limit, ident: str, route: str, key_head: str, key_tail: str) -> None:
        self.limit = limit
        self.id = ident
        self.text = str(limit.rate)
        self.simple_ip = limit.key == ("ip",)
        self.key_head, self.key_tail = key_head, key_tail
        self.algorithm = limit.algorithm
        self.cost = limit.cost
        self.burst = limit.burst or 0
        self.enforced = limit.mode == "enforce"
        self.near = limit.rate.quota * (1 - NEAR_LIMIT)
        nets, headers = [], []
        for entry in limit.exempt:
            if entry.startswith("header:"):
                name, _, value = entry.removeprefix("header:").partition("=")
                headers.append((name.strip().lower(), value.strip()))
            else:
                nets.append(ipaddress.ip_network(entry, strict=False))
        self.exempt_nets: TrustedProxies = TrustedProxies(nets)
        self.exempt_headers: tuple[tuple[str, str], ...] = tuple(headers)
        self.has_exempt = bool(nets or headers)
        self.overrides = {o.match: o.rate for o in limit.overrides}
        source = limit.cost_from or ""
        self.cost_header = source.removeprefix("response_header:").strip().lower().encode() if source.startswith(
            "response_header:") else None
        self.cost_path = tuple(source.removeprefix("json:").split(".")) if source and not self.cost_header else None
        # metric children bound once: labels() on every request costs more than the increment
        self.allowed = tally(RATELIMIT_DECISIONS.labels(route, ident, "allowed"))
        self.rejected = tally(RATELIMIT_DECISIONS.labels(route, ident, "rejected"))
        self.shadow_rejected = tally(RATELIMIT_DECISIONS.labels(route, ident, "shadow_rejected"))
        self.near_limit = tally(RATELIMIT_DECISIONS.labels(route, ident, "near_limit"))
        self.exempt = tally(RATELIMIT_DECISIONS.labels(route, ident, "exempt"))
        self.local_block = tally(RATELIMIT_DECISIONS.labels(route, ident, "local_block"))
        self.key_fallback = RATELIMIT_KEY_FALLBACKS.labels(route, ident, limit.on_missing)

    def actual_cost(self, response: Completed) -> int | None:
        """The cost the upstream reported, or None when it reported none."""
        raw: object = None
        if self.cost_header is not None:
            value = response.header(self.cost_header)
            raw = value.decode("latin-1").strip() if value is not None else None
        elif self.cost_path is not None and response.body:
            try:
                raw = json.loads(response.body)
            except ValueError:
                return None
            for step in self.cost_path:
                raw = raw.get(step) if isinstance(raw, dict) else None
        try:
            cost = int(float(raw))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
        return cost if cost >= 0 else None

    def exempted(self, ctx: RequestContext) -> bool:
        if not self.has_exempt:
            return False
        if self.exempt_nets and ctx.client_ip in self.exempt_nets:
            return True
        return any(ctx.header(name) == value for name, value in self.exempt_headers)


def _digest(value: str) -> str:
    # header/query/user values may be secrets or contain "{}" (hash tags): store a digest
    return hashlib.blake2b(value.encode(), digest_size=8).hexdigest()


class _BlockCache:
    """Keys known blocked until a time: rejected locally without a store call (bounded LRU)."""

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._entries: collections.OrderedDict[tuple[str, ...], tuple[float, int, RateLimitResult]] = (
            collections.OrderedDict()
        )

    def get(self, keys: tuple[str, ...], cost: int) -> RateLimitResult | None:
        if not self._entries:
            return None
        entry = self._entries.get(keys)
        if entry is None:
            return None
        until, blocked_cost, result = entry
        if time.monotonic() >= until or cost < blocked_cost:
            if time.monotonic() >= until:
                del self._entries[keys]
            return None
        return result

    def put(self, keys: tuple[str, ...], cost: int, result: RateLimitResult, retry_ms: int) -> None:
        self._entries[keys] = (time.monotonic() + retry_ms / 1000, cost, result)
        self._entries.move_to_end(keys)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


class _Request:
    """The rate limiter's private state for one request."""

    __slots__ = ("active", "checks", "header_costs_charged")

    def __init__(self, active: list[_CompiledLimit], checks: tuple[LimitCheck, ...]) -> None:
        self.active = active
        self.checks = checks
        self.header_costs_charged = False


class RateLimitPolicy(BasePolicy):
    """The ``limits:`` of one route as a :class:`~edgeway.middleware.policy.Policy`."""

    name = "ratelimit"

    def __init__(self, limits: Sequence[Limit], *, route: str = "default", key_prefix: str = "edgeway:",
                 block_cache_size: int = 10_000, user_from: UserSource | None = None) -> None:
        if not limits:
            raise ValueError("RateLimitPolicy needs at least one limit")
        self.route = route
        self.key_prefix = key_prefix
        self.user_from = user_from
        ids = _limit_ids(limits)
        self.limits = [
            _CompiledLimit(limit, ident, route, head, tail)
            for limit, ident, (head, tail) in zip(limits, ids, key_layout(limits, ids, route, key_prefix), strict=True)
        ]
        self.fields = RateLimitFields(
            [
                HeaderLimit(c.id, c.limit.rate.quota, c.limit.rate.window, c.limit.headers in ("ietf", "both"),
                            c.limit.headers in ("legacy", "both"))
                for c in self.limits
            ]
        )
        self._blocks = _BlockCache(block_cache_size)
        self._post_cost = self.wants_finish = any(c.limit.cost_from for c in self.limits)
        self.response_body_limit = COST_BODY_LIMIT if any(c.cost_path for c in self.limits) else 0
        self.wants_respond = any(c.cost_header is not None for c in self.limits)
        self._fallback_log = Throttled(60.0)
        self._shadow_log = Throttled(60.0)

    # -- keys -----------------------------------------------------------------

    def _key_part(self, part: str, limit: Limit, ctx: RequestContext) -> str | None:
        if part == "ip":
            return "ip=" + _group_ip(ctx.client_ip, limit.ipv6_prefix)
        if part == "global":
            return "global"
        if part == "user":
            user = find_user(ctx, self.user_from)
            return None if user is None else "u=" + _digest(user)
        kind, _, name = part.partition(":")
        value = ctx.header(name) if kind == "header" else ctx.query(name)
        return None if value is None or value == "" else f"{kind[0]}={_digest(value)}"

    def _key(self, compiled: _CompiledLimit, ctx: RequestContext) -> tuple[str | None, str | None]:
        """(key text, raw first value for overrides); key text None means skip this limit."""
        limit = compiled.limit
        parts = []
        for part in limit.key:
            text = self._key_part(part, limit, ctx)
            if text is None:
                compiled.key_fallback.inc()
                self._fallback_log.warning("route %s limit %s: %s missing, on_missing=%s", self.route, compiled.id,
                                           part, limit.on_missing)
                if limit.on_missing == "skip":
                    return None, None
                if limit.on_missing == "deny":
                    return "", None
                text = "ip=" + _group_ip(ctx.client_ip, limit.ipv6_prefix)
            parts.append(text)
        raw = None
        if compiled.overrides:
            first = limit.key[0]
            kind, _, name = first.partition(":")
            raw = ctx.header(name) if kind == "header" else ctx.query(name) if kind == "query" else ctx.user
        return "|".join(parts), raw

    # -- policy protocol ------------------------------------------------------

    def prepare(self, ctx: RequestContext) -> Prepared | ErrorResponse:
        checks = []
        active = []
        for compiled in self.limits:
            if compiled.has_exempt and compiled.exempted(ctx):
                compiled.exempt.inc()
                continue
            raw: str | None = None
            if compiled.simple_ip:
                ip = ctx.client_ip
                key = "ip=" + (ip if ":" not in ip else _group_ip(ip, compiled.limit.ipv6_prefix))
            else:
                found, raw = self._key(compiled, ctx)
                if found is None:
                    continue
                key = found
                if key == "":
                    missing = ", ".join(p for p in compiled.limit.key if p not in ("ip", "global"))
                    return ErrorResponse(400, "missing_key",
                                         f"this route is rate limited by {missing}, which is missing")
            if raw is not None and raw in compiled.overrides:
                rate = compiled.overrides[raw]
                quota, window_ms = rate.quota, rate.window_ms
            else:
                quota, window_ms = compiled.limit.rate.quota, compiled.limit.rate.window_ms
            checks.append(LimitCheck(compiled.key_head + key + compiled.key_tail, compiled.algorithm, quota,
                                     window_ms, compiled.cost, compiled.burst, compiled.enforced))
            active.append(compiled)
        if not checks:
            ctx.outcomes["limit"] = "exempt"
            return Prepared()
        blocked = self._blocks.get(tuple(check.key for check in checks), max(check.cost for check in checks))
        if blocked is not None:
            for compiled in active:
                compiled.local_block.inc()
            ctx.outcomes["limit"] = "rejected"
            return self._reject(ctx, active, blocked)
        frozen = tuple(checks)
        # a revoked session is refused by the session policy in decide; the guard keeps it from being charged
        return Prepared((RateLimit(frozen, ctx.revocation),), _Request(active, frozen))

    def decide(self, ctx: RequestContext, prepared: Prepared, results: Sequence[object]) -> ErrorResponse | None:
        request = prepared.state
        if not isinstance(request, _Request):
            return None
        result = results[0]
        assert isinstance(result, RateLimitResult)
        if result.revoked:  # nothing was checked: the session policy answers (401) before this runs
            return None
        self._count(request.active, result)
        ctx.outcomes["limit"] = "allowed" if result.allowed else "rejected"
        if result.allowed:
            ctx.response_headers.extend(self.fields.headers(self._states(request.active, result.states)))
            return None
        retry = max(s.retry_after_ms for s, c in zip(result.states, request.checks, strict=True)
                    if c.enforced and not s.allowed)
        self._blocks.put(tuple(c.key for c in request.checks), max(c.cost for c in request.checks), result, retry)
        return self._reject(ctx, request.active, result)

    def store_failed(self, ctx: RequestContext, prepared: Prepared,
                     error: StoreError | CommandError) -> ErrorResponse | None:
        if not isinstance(prepared.state, _Request):
            return None
        closed = any(c.limit.on_store_failure == "closed" and c.limit.mode == "enforce" for c in prepared.state.active)
        ctx.outcomes["limit"] = "store_failed"
        STORE_FAILURES.labels(self.route, "closed" if closed else "open").inc()
        if closed:
            return ErrorResponse(503, "store_unavailable", "rate limits cannot be checked right now",
                                 headers=[(b"retry-after", b"1")])
        return None

    def respond(self, ctx: RequestContext, prepared: Prepared, start: Message) -> Answer | None:
        """Charge ``cost_from: response_header:`` costs as soon as the response starts.

        The header is known then: a long stream is charged before it ends, and a
        client that leaves early is charged all the same.
        """
        request = prepared.state
        if isinstance(request, _Request):
            request.header_costs_charged = True
            started = Completed(start["status"], start.get("headers", ()), None, complete=False)
            ctx.defer(self._debits(request, started, header_costs=True, json_costs=False))
        return None

    def finish(self, ctx: RequestContext, prepared: Prepared, response: Completed) -> Sequence[Command]:
        """Debit the rest of a ``cost_from`` limit's real cost; charged even past the quota (the work is done)."""
        request = prepared.state
        if not self._post_cost or not isinstance(request, _Request) or response.status == 0:
            return ()  # (status 0: the app never answered; nothing reported a cost)
        return self._debits(request, response, header_costs=not request.header_costs_charged, json_costs=True)

    def _debits(self, request: _Request, response: Completed, *, header_costs: bool,
                json_costs: bool) -> Sequence[Command]:
        """The debits of the limits whose cost the response reports, of the kinds asked for."""
        debits = []
        for compiled, check in zip(request.active, request.checks, strict=True):
            if compiled.limit.cost_from is None:
                continue
            if not (header_costs if compiled.cost_header is not None else json_costs):
                continue
            if compiled.cost_path is not None and not response.complete:
                self._fallback_log.warning("route %s limit %s: response incomplete, no JSON cost; the up-front "
                                           "cost stands", self.route, compiled.id)
                continue
            cost = compiled.actual_cost(response)
            if cost is None:
                self._fallback_log.warning("route %s limit %s: no cost in the response (%s)", self.route,
                                           compiled.id, compiled.limit.cost_from)
                continue
            if cost > check.cost:
                debits.append(LimitCheck(check.key, check.algorithm, check.quota, check.window_ms,
                                         cost - check.cost, check.burst, enforced=False))
        return (RateLimit(tuple(debits)),) if debits else ()

    # -- helpers ----------------------------------------------------------------

    def _states(self, active: list[_CompiledLimit], states: Sequence[LimitState]) -> Sequence[LimitState | None]:
        if len(active) == len(self.limits):
            return states
        by_id = {compiled.id: state for compiled, state in zip(active, states, strict=True)}
        return [by_id.get(compiled.id) for compiled in self.limits]

    def _count(self, active: list[_CompiledLimit], result: RateLimitResult) -> None:
        for compiled, state in zip(active, result.states, strict=True):
            if state.allowed:
                compiled.allowed.inc()
                if state.remaining <= compiled.near:
                    compiled.near_limit.inc()
            elif compiled.enforced:
                compiled.rejected.inc()
            else:
                compiled.shadow_rejected.inc()
                self._shadow_log.warning("shadow limit %s on route %s would reject", compiled.text, self.route)

    def _reject(self, ctx: RequestContext, active: list[_CompiledLimit], result: RateLimitResult) -> ErrorResponse:
        violated = [(c, s) for c, s in zip(active, result.states, strict=True)
                    if not s.allowed and c.limit.mode == "enforce"]
        retry = seconds_ceil(max(s.retry_after_ms for _, s in violated)) or 1
        first = violated[0][0]
        headers = [(b"retry-after", str(max(1, retry)).encode()),
                   *self.fields.headers(self._states(active, result.states))]
        return ErrorResponse(
            429,
            "rate_limited",
            f"rate limit {first.text} exceeded; retry in {retry}s",
            extra={
                "type": PROBLEM_TYPE,
                "title": "Request cannot be satisfied as assigned quota has been exceeded",
                "status": 429,
                "violated-policies": [c.id for c, _ in violated],
                "limit": first.text,
                "retry_after": max(1, retry),
            },
            headers=headers,
            content_type=b"application/problem+json",
        )


_ALGORITHM_CODES = {Algorithm.FIXED_WINDOW: "fw", Algorithm.SLIDING_WINDOW: "sw", Algorithm.SLIDING_LOG: "sl",
                    Algorithm.TOKEN_BUCKET: "tb"}


def key_layout(limits: Sequence[Limit], ids: Sequence[str], route: str, key_prefix: str) -> list[tuple[str, str]]:
    """Each limit's store key as (head, tail) around the request's key text (``ip=..``, ``h=..``).

    ``{KEY_PREFIX}rl:{ROUTE:KEY}:ID:ALGO``, or ``{KEY_PREFIX}rl:{ROUTE}:KEY:ID:ALGO`` when the limits' key texts
    could differ in any way (key parts, IPv6 prefix, missing-key fallback), so all keys one script touches
    share a Redis Cluster hash tag. The algorithm is part of the key: a reload that switches it starts a fresh
    counter instead of reading another algorithm's data structure (WRONGTYPE).
    """
    shared = len({(limit.key, limit.ipv6_prefix, limit.on_missing) for limit in limits}) == 1
    head = f"{key_prefix}rl:{{{route}:" if shared else f"{key_prefix}rl:{{{route}}}:"
    return [(head, f"{'}' if shared else ''}:{ident}:{_ALGORITHM_CODES[limit.algorithm]}")
            for limit, ident in zip(limits, ids, strict=True)]


def _limit_ids(limits: Sequence[Limit]) -> list[str]:
    """Policy names: ``name`` when given, else the window (``minute``), disambiguated by key then index."""
    base = [limit.name or policy_name(limit.rate.window) for limit in limits]
    ids = []
    for i, (limit, name) in enumerate(zip(limits, base, strict=True)):
        if limit.name is None and base.count(name) > 1:
            name = f"{name}-{'-'.join(limit.key).replace(':', '-')}"
            if sum(1 for j, other in enumerate(limits) if j < i and other.key == limit.key and base[j] == base[i]):
                name = f"{name}-{i + 1}"
        ids.append(name)
    if len(set(ids)) != len(ids):
        raise ValueError(f"two limits of a route share the name(s) {sorted({n for n in ids if ids.count(n) > 1})}")
    return ids


def _group_ip(address: str, prefix: int) -> str:
    if ":" not in address or prefix >= 128:
        return address
    try:
        network = ipaddress.IPv6Network(f"{address}/{prefix}", strict=False)
    except ValueError:
        return address
    return f"{network.network_address}/{prefix}"


class RateLimitMiddleware(PolicyPipeline):
    """Rate limits as ASGI middleware, without a policy file.

    >>> app = RateLimitMiddleware(app, limits=[Limit(rate="10/minute"), Limit(rate="100/day")],
    ...                           store=open_store("redis://localhost:6379"), exclude=["/docs", "/healthz"])

    ``paths``/``exclude`` choose the paths limited (exact, or a prefix ending in ``*``);
    ``user_from`` tells ``key: user`` where the user is when the app's own authentication
    (``scope["user"]``) has none: ``"header:X-User-Id"`` (from trusted proxies only) or a
    function of the ASGI scope.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limits: Sequence[Limit | str],
        store: Store,
        trusted_proxies: Iterable[str | IPNetwork] = (),
        route: str = "default",
        key_prefix: str = "edgeway:",
        paths: Iterable[str] | None = None,
        exclude: Iterable[str] = (),
        user_from: UserFrom | None = None,
    ) -> None:
        parsed = [Limit(rate=limit) if isinstance(limit, str) else limit for limit in limits]
        policy = RateLimitPolicy(parsed, route=route, key_prefix=key_prefix, user_from=user_source(user_from))
        super().__init__(app, policies=[policy], store=store, trusted_proxies=trusted_proxies, route=route,
                         paths=paths, exclude=exclude)
