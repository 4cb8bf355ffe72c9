"""The policy file's typed model (version 1). Validated once, frozen; see SPEC.md.

Cross-field rules that need positions in the file (unknown upstream names,
duplicate routes) are checked in :mod:`edgeway.gateway.loader`, which reports every
problem as ``FILE:LINE:COL: message``.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from edgeway.middleware.breaker_config import BreakerSettings
from edgeway.middleware.cache_settings import CacheSettings
from edgeway.middleware.ratelimit import Limit
from edgeway.middleware.session_settings import SessionSettings
from edgeway.middleware.store.failover import MIN_PROBE_INTERVAL
from edgeway.middleware.units import Duration, Size

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SupabaseFallback(Model):
    """Supabase over PostgREST RPC (``{url}/rest/v1/rpc/<fn>``)."""

    url: str
    key: str


class PostgresFallback(Model):
    """A direct Postgres connection to the same functions."""

    dsn: str


class FallbackEntry(Model):
    """One entry of ``store.fallback``: ``memory``, ``{supabase: {...}}`` or ``{postgres: {...}}``."""

    supabase: SupabaseFallback | None = None
    postgres: PostgresFallback | None = None
    memory: bool = False

    @classmethod
    def _coerce(cls, value: object) -> object:
        if value == "memory":
            return {"memory": True}
        return value


def _fallback_list(value: object) -> object:
    if isinstance(value, list):
        return [FallbackEntry._coerce(item) for item in value]
    return value


def _monthly(value: object) -> int:
    text = str(value).replace("_", "").replace(" ", "")
    count, sep, period = text.partition("/")
    if sep and period == "month" and count.isdigit() and int(count) > 0:
        return int(count)
    raise ValueError(f"a budget is N/month, such as 500000/month (Upstash's free tier), got {value!r}")


MonthlyBudget = Annotated[
    int,
    BeforeValidator(_monthly),
    PlainSerializer(lambda count: f"{count}/month"),
    WithJsonSchema({"type": "string", "pattern": r"^[0-9_]+\s*/\s*month$", "description": "N/month"}),
]


class StoreConfig(Model):
    """Where shared state lives."""

    url: str = Field("memory://", description="redis:// rediss:// unix:// upstash+https:// memory://")
    enabled: bool = Field(True, description="false skips the primary (emergency rollback); EDGEWAY_REDIS_ENABLED too.")
    key_prefix: str = Field("edgeway:", description="Prefix of every key Edgeway writes.")
    timeout: Duration = Field(0.05, description="Per store call; past it the call counts as a store failure.")
    fallback: tuple[FallbackEntry, ...] | None = Field(
        None, description="Tried in order when the primary fails; absent means [memory]; [] means none."
    )
    failures: int = Field(3, ge=1, description="Consecutive failures within failure_window that mark a store down.")
    failure_window: Duration = Field(10.0, description="Window for counting those failures.")
    probe_interval: Duration = Field(
        0.5, description="First wait before probing a down store (then doubles); at least 50ms.",
        json_schema_extra={"minimum": MIN_PROBE_INTERVAL},
    )
    instances: int | None = Field(
        None, ge=1, description="Static instance count for degraded limits (default: counted by heartbeats)."
    )
    min_instances: int = Field(1, ge=1, description="Floor of the heartbeat count for degraded limits.")
    budget: MonthlyBudget | None = Field(
        None, description="Commands the primary store may take per calendar month (UTC), e.g. 500000/month: counted "
        "in the store by every instance; a warning at 80%."
    )
    on_budget_exhausted: Literal["alert", "fallback"] = Field(
        "alert", description="alert: only tell (log, metrics, readyz); fallback: shared state moves to the next "
        "store of the chain until the month turns."
    )

    @field_validator("fallback", mode="before")
    @classmethod
    def _fallback(cls, value: object) -> object:
        return _fallback_list(value)

    @model_validator(mode="after")
    def _budget(self) -> StoreConfig:
        if self.budget is not None and self.url.lower().startswith("memory://"):
            raise ValueError("store.budget counts commands sent to a remote store; memory:// sends none")
        if self.on_budget_exhausted == "fallback" and self.fallback == ():
            raise ValueError("on_budget_exhausted: fallback needs a store to fall back to (store.fallback is [])")
        return self

    @field_validator("probe_interval")
    @classmethod
    def _probe_floor(cls, value: float) -> float:
        if value < MIN_PROBE_INTERVAL:
            raise ValueError(f"probe_interval must be at least {MIN_PROBE_INTERVAL * 1000:.0f}ms (a down store "
                             f"would be probed in a busy loop); got {value * 1000:g}ms")
        return value

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        from edgeway.middleware.store import SCHEMES

        scheme = value.split("://", 1)[0].lower() if "://" in value else ""
        if scheme not in (*SCHEMES, "redis+sentinel", "redis+cluster"):
            raise ValueError(
                f"unknown store URL {value!r}: use memory://, redis://, rediss://, unix:// or upstash+https://TOKEN@host"
            )
        return value


class UpstreamTimeout(Model):
    connect: Duration = Field(2.0, description="TCP (and TLS) connect timeout.")
    read: Duration = Field(30.0, description="Longest wait for the next bytes of the response.")
    pool: Duration = Field(
        1.0, description="Longest wait for a free pooled connection once max_connections are busy; then 503 "
                         "upstream_overloaded (fails fast instead of queueing behind a stalled upstream).")


class Upstream(Model):
    url: str = Field(description="Base URL: http(s)://host[:port][/base-path]")
    timeout: UpstreamTimeout = UpstreamTimeout()
    max_connections: int = Field(256, ge=1, description="Pooled connections kept to this upstream.")
    max_pending: int = Field(
        1024, ge=0, description="Requests that may wait for a connection when all max_connections are busy "
                                "(Envoy's max_pending_requests default); past it 503 upstream_overloaded at once.")
    breaker: BreakerSettings | None = Field(None, description="A circuit breaker shared by every instance.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")) or len(value.split("://", 1)[1].strip("/")) == 0:
            raise ValueError(f"an upstream url must start with http:// or https:// and name a host, got {value!r}")
        return value.rstrip("/")


class Match(Model):
    path: str = Field(description="Exact path, or a prefix ending in * (first match wins).")
    methods: tuple[str, ...] | None = Field(None, description="Allowed methods; absent means all.")
    case_insensitive: bool = Field(
        False, description="Match the path ignoring case, for upstreams that fold case (IIS, some Java stacks), "
                           "so /LIMITED/x cannot dodge the policies of /limited/*.")
    allow_semicolons: bool = Field(
        False, description="Let ';' path parameters through (refused with 400 otherwise: upstreams that strip "
                           "them would serve /a;x/b as /a/b, a path the policy did not match).")
    allow_backslashes: bool = Field(
        False, description="Let '\\' through in paths (refused with 400 otherwise: some upstreams read it as '/').")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"a route path must start with '/', got {value!r}")
        if "*" in value[:-1]:
            raise ValueError(f"'*' may only end a route path (it matches the rest), got {value!r}")
        return value

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, value: object) -> object:
        if isinstance(value, str):  # `methods: POST`: one method needs no list
            value = [value]
        if isinstance(value, list):
            upper = [str(m).upper() for m in value]
            unknown = [m for m in upper if m not in HTTP_METHODS]
            if unknown:
                raise ValueError(f"unknown method(s) {', '.join(unknown)}: expected {', '.join(HTTP_METHODS)}")
            return tuple(upper)
        return value


ROUTE_ID = r"^[A-Za-z0-9._\-/*@,+=]+$"


class Route(Model):
    match: Match
    id: str | None = Field(
        None, pattern=ROUTE_ID,
        description="Stable identity of the route in store keys; default derived from match (path@METHODS), "
        "so reordering routes never resets counters.",
    )
    upstream: str | None = Field(None, description="The upstream to proxy to; in-app policies leave it out.")
    limits: tuple[Limit, ...] = ()
    cache: CacheSettings | None = None
    session: Literal["required", "optional", "off"] = Field(
        "off", description="required: 401 without a valid token; optional: anonymous allowed (see sessions:).")
    privileged: bool = Field(
        False, description="With a session: 503 rather than open when revocations cannot be read from any store.")

    @property
    def route_id(self) -> str:
        """``id``, or ``PATH`` / ``PATH@GET,POST`` from the match (braces swapped: they are Redis hash tags)."""
        if self.id is not None:
            return self.id
        path = self.match.path.replace("{", "(").replace("}", ")")
        return f"{path}@{','.join(sorted(self.match.methods))}" if self.match.methods else path


Sessions = SessionSettings


class ServerConfig(Model):
    """How ``edgeway serve`` treats client connections (each setting applies per process)."""

    header_timeout: Duration = Field(
        10.0, description="A connection must send a whole request head within this time, else it is closed "
                          "(nginx client_header_timeout is 60s; 10s is Envoy's request_headers_timeout "
                          "advice for edges and stops slowloris).")
    keepalive_timeout: Duration = Field(
        75.0, description="Idle keep-alive connections are closed after this (nginx's keepalive_timeout).")
    max_connections: int = Field(
        10_000, ge=1, description="Open client connections per process; past it new ones get 503 and are "
                                  "closed, instead of the process running out of file descriptors.")
    max_header_bytes: Size = Field(
        65_536, description="Request line plus header block size; larger heads get 431 (nginx allows 4 x 8k "
                            "buffers, Envoy 60 KiB).")
    max_headers: int = Field(100, ge=1, description="Header fields per request; more get 431 (Envoy's default).")
    client_body_timeout: Duration = Field(
        10.0, description="Longest pause between two reads of a request body; then 408 and the connection "
                          "closes (nginx's client_body_timeout is 60s; an edge frees stalled uploads sooner).")
    request_buffer: Size = Field(
        65_536, description="Request bodies up to this size are read whole before an upstream connection is "
                            "taken, so a stalled upload never holds one (nginx's proxy_request_buffering); "
                            "larger bodies stream.")
    max_request_body: Size = Field(
        10_000_000, description="Larger request bodies get 413 (nginx's 1m is too small for JSON APIs carrying "
                                "images; 10 MB still bounds abuse).")
    headers_with_underscores: Literal["drop", "reject", "allow"] = Field(
        "drop", description="Header names with '_' reach WSGI/CGI upstreams as HTTP_X_... , the same as the "
                            "'-' spelling, so a client could forge identity headers: drop them (nginx's and "
                            "Envoy's edge default, counted in edgeway_dropped_headers_total), reject the "
                            "request with 400, or allow them.")


class Admin(Model):
    token: str = Field("", description="Bearer token for the admin API; empty turns it off.")


def _network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"not a network: {value!r} (expected a CIDR such as 10.0.0.0/8)") from None
    return value


Network = Annotated[str, AfterValidator(_network), Field(description="A CIDR such as 10.0.0.0/8 or 127.0.0.1/32")]


def _user_from(value: str) -> str:
    kind, sep, name = value.partition(":")
    if kind != "header" or not sep or not name.strip():
        raise ValueError(f"bad user_from {value!r}: expected header:NAME (a header an auth layer in front sets)")
    return f"header:{name.strip().lower()}"


class Policy(Model):
    """An Edgeway policy file, version 1."""

    version: Literal[1]
    name: str = Field(
        "default", pattern=r"^[A-Za-z0-9._\-]+$",
        description="This policy's identity: part of every store key and of the heartbeat set, so apps sharing "
        "one Redis never share counters by accident.",
    )
    store: StoreConfig = StoreConfig()
    trusted_proxies: tuple[Network, ...] = ()
    user_from: Annotated[str, AfterValidator(_user_from)] | None = Field(
        None, description="Where `key: user` finds the user when nothing else set one: header:NAME, honoured "
        "only from trusted_proxies (an auth layer in front).",
    )
    upstreams: dict[str, Upstream] = Field(
        default_factory=dict, description="Where the gateway proxies to; in-app policies need none."
    )
    routes: tuple[Route, ...]
    sessions: Sessions | None = None
    server: ServerConfig = ServerConfig()
    admin: Admin = Admin()

    @property
    def key_prefix(self) -> str:
        """What every key of this policy starts with: ``store.key_prefix``, then ``name:``."""
        return f"{self.store.key_prefix}{self.name}:"
