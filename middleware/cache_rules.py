"""What a shared cache may store, for how long, and what it owes its clients (RFC 9111, 5861, 9211).

Pure functions of (request facts, response headers, rules, now), no I/O, so
every rule is a row in a table-driven test (tests/middleware/test_cache_rules.py).
:mod:`edgeway.middleware.cache` wires them to the pipeline.

Never stored (each returns its ``detail`` for ``Cache-Status``):
``set-cookie``, ``private``, ``no-store``, ``no-cache``, ``vary-star``,
``status``, ``edgeway-error`` (an answer Edgeway made itself), ``no-freshness``
(``ttl: origin`` without explicit freshness), ``too-large``, ``incomplete``.
Requests that bypass the cache: ``authorization``, ``cookie``, ``session``
(a verified user while the key does not include ``user``), ``method``,
``request-too-large``, ``request-body`` (a GET/HEAD with a body the key
ignores: a "fat GET" could make the upstream answer differently under the
same key), ``unkeyed-header`` (method or URL overrides such as
``X-HTTP-Method-Override``, ``X-Original-URL``, ``X-Forwarded-Host``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authenticate", b"proxy-authorization",
})
NOT_STORED_HEADERS = HOP_BY_HOP | {b"set-cookie", b"age", b"date", b"cache-status", b"ratelimit", b"ratelimit-policy",
                                   b"x-ratelimit-limit", b"x-ratelimit-remaining", b"x-ratelimit-reset",
                                   b"retry-after"}
"""Per-connection or per-answer fields: never part of a stored entry (the pipeline adds its own again)."""

NOT_UPDATED_BY_304 = frozenset({b"content-length", b"content-encoding", b"content-type", b"content-range"})
"""RFC 9111 §4.3.4: a 304 updates the stored fields, except those describing the stored body."""

UNKEYED_OVERRIDES = ("x-http-method-override", "x-http-method", "x-method-override", "x-original-url",
                     "x-rewrite-url", "x-forwarded-host", "x-forwarded-server", "x-host", "x-forwarded-scheme")
"""Request fields some frameworks read as the method, URL or host: a request carrying one is not keyed by
it, so its answer could poison the entry of an ordinary request; such requests bypass the cache."""

DEFAULT_STATUSES = (200, 203, 204, 300, 301, 308, 404, 410)
CACHEABLE_METHODS = ("GET", "HEAD")


@dataclass(frozen=True, slots=True)
class Rules:
    """A route's cache rules, as the pure functions need them."""

    ttl: float | None
    """Freshness in seconds; None: origin-directed (``ttl: origin``)."""
    default_ttl: float | None = None
    """With ``ttl: origin``: the freshness of responses that state none (None: those are not stored)."""
    respect_origin: bool = True
    statuses: frozenset[int] = frozenset(DEFAULT_STATUSES)
    max_body: int = 2_000_000
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the storability rules need to know of a request."""

    method: str
    authorization: bool = False
    cookie: bool = False
    user: bool = False
    """A verified user is set (session policy, or the app's authentication)."""
    body: bool = False
    body_too_large: bool = False
    override_header: bool = False
    session_cookie: bool = False
    """A session cookie (Supabase's ``sb-<ref>-auth-token``): it says who the client is, so even
    ``cookies: ignore`` does not ignore it."""


@dataclass(frozen=True, slots=True)
class Freshness:
    """How long an entry is fresh and how long after that it may still be served stale."""

    fresh: float
    stale_while_revalidate: float
    stale_if_error: float

    @property
    def keep(self) -> float:
        """Seconds the store keeps the entry: fresh plus the longer stale window."""
        return self.fresh + max(self.stale_while_revalidate, self.stale_if_error)


def cache_control(values: Iterable[bytes]) -> dict[str, str | None]:
    """``Cache-Control`` directives by lower-case name (``max-age`` -> ``"60"``, ``no-store`` -> None)."""
    directives: dict[str, str | None] = {}
    for value in values:
        for item in value.decode("latin-1").split(","):
            name, sep, argument = item.strip().partition("=")
            if name:
                directives.setdefault(name.lower(), argument.strip().strip('"') if sep else None)
    return directives


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = int(value)
    except ValueError:
        return None
    return float(seconds) if seconds >= 0 else None


def _all(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


def first(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of a header (``name`` in lower case)."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def bypass(request: RequestFacts, *, key_has_body: bool, key_has_user: bool, cookies_ignored: bool,
           methods: Sequence[str]) -> str | None:
    """Why this request neither reads nor fills the cache, or None when it may use it."""
    if request.method not in methods:
        return "method"
    if request.override_header:
        return "unkeyed-header"
    personal_cookie = request.cookie and (not cookies_ignored or request.session_cookie)
    if not key_has_user:
        if request.authorization:
            return "authorization"
        if personal_cookie:
            return "cookie"
        if request.user:
            return "session"
    elif not request.user and (request.authorization or personal_cookie):
        # keyed by user, but nobody verified who this is: never file it under "anonymous"
        return "authorization" if request.authorization else "cookie"
    if request.body_too_large:
        return "request-too-large"
    if request.body and not key_has_body:
        return "request-body"
    return None


def not_storable(status: int, headers: Sequence[tuple[bytes, bytes]], rules: Rules) -> str | None:
    """Why a response must not be stored (its ``Cache-Status`` detail), or None."""
    if first(headers, b"edgeway-error") is not None:
        return "edgeway-error"
    if status not in rules.statuses:
        return "status"
    if first(headers, b"set-cookie") is not None:
        return "set-cookie"
    directives = cache_control(_all(headers, b"cache-control"))
    for directive in ("no-store", "private", "no-cache"):
        if directive in directives:
            return directive
    if any(item.strip() == b"*" for value in _all(headers, b"vary") for item in value.split(b",")):
        return "vary-star"
    return None


def freshness(headers: Sequence[tuple[bytes, bytes]], rules: Rules, now: float) -> Freshness | None:
    """The entry's windows from the route's rules and the response's own; None: nothing to store."""
    directives = cache_control(_all(headers, b"cache-control"))
    origin = _seconds(directives.get("s-maxage")) if "s-maxage" in directives else _seconds(
        directives.get("max-age"))
    if origin is None and rules.ttl is None:
        origin = _expires(headers, now)
    age = _seconds((first(headers, b"age") or b"").decode("latin-1") or None) or 0.0
    if rules.ttl is None:
        lifetime = origin if origin is not None else rules.default_ttl
    elif origin is not None and rules.respect_origin:
        lifetime = min(rules.ttl, origin)
    else:
        lifetime = rules.ttl
    if lifetime is None:
        return None
    fresh = max(0.0, lifetime - age)
    if "must-revalidate" in directives or "proxy-revalidate" in directives:
        return Freshness(fresh, 0.0, 0.0)  # the origin forbids serving it stale
    swr, sie = rules.stale_while_revalidate, rules.stale_if_error
    if rules.respect_origin:
        swr = max(swr, _seconds(directives.get("stale-while-revalidate")) or 0.0)
        sie = max(sie, _seconds(directives.get("stale-if-error")) or 0.0)
    if fresh <= 0 and swr <= 0 and sie <= 0:
        return None
    return Freshness(fresh, swr, sie)


def _expires(headers: Sequence[tuple[bytes, bytes]], now: float) -> float | None:
    expires = first(headers, b"expires")
    if expires is None:
        return None
    try:
        when = parsedate_to_datetime(expires.decode("latin-1")).timestamp()
    except (TypeError, ValueError, IndexError):
        return 0.0  # RFC 9111 §5.3: an invalid Expires means "already expired"
    date = first(headers, b"date")
    base = now
    if date is not None:
        try:
            base = parsedate_to_datetime(date.decode("latin-1")).timestamp()
        except (TypeError, ValueError, IndexError):
            base = now
    return max(0.0, when - base)


def stored_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The fields an entry keeps: hop-by-hop, per-connection and per-answer ones removed."""
    named = {item.strip().lower() for value in _all(headers, b"connection") for item in value.split(b",")}
    return [(key.lower(), value) for key, value in headers
            if key.lower() not in NOT_STORED_HEADERS and key.lower() not in named]


def refreshed(stored: Sequence[tuple[bytes, bytes]],
              not_modified: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The stored fields updated by a 304 (RFC 9111 §4.3.4): its fields replace the stored ones of that name."""
    update = [(key, value) for key, value in stored_headers(not_modified) if key not in NOT_UPDATED_BY_304]
    names = {key for key, _ in update}
    return [*((key, value) for key, value in stored if key not in names), *update]


def _etags(value: str) -> list[str]:
    return [tag.strip().removeprefix("W/") for tag in value.split(",") if tag.strip()]


def not_modified(request_headers: dict[str, list[str]], stored: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether a client's conditional request matches the entry (then it gets a 304)."""
    if_none_match = request_headers.get("if-none-match")
    if if_none_match:
        etag = first(stored, b"etag")
        if etag is None:
            return False
        wanted = [tag for value in if_none_match for tag in _etags(value)]
        return "*" in wanted or etag.decode("latin-1").removeprefix("W/") in wanted
    if_modified_since = request_headers.get("if-modified-since")
    last_modified = first(stored, b"last-modified")
    if if_modified_since and last_modified is not None:
        try:
            since = parsedate_to_datetime(if_modified_since[0]).timestamp()
            modified = parsedate_to_datetime(last_modified.decode("latin-1")).timestamp()
        except (TypeError, ValueError, IndexError):
            return False
        return modified <= since
    return False


def validators(stored: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The conditional request fields that revalidate an entry with the upstream (empty: it has none)."""
    found = []
    etag = first(stored, b"etag")
    if etag is not None:
        found.append((b"if-none-match", etag))
    last_modified = first(stored, b"last-modified")
    if last_modified is not None:
        found.append((b"if-modified-since", last_modified))
    return found


def cdn_cache_control(headers: list[tuple[bytes, bytes]], cdn_ttl: int) -> list[tuple[bytes, bytes]]:
    """``Cache-Control`` rewritten for a CDN in front: ``s-maxage`` and ``CDN-Cache-Control`` set to ``cdn_ttl``.

    Responses that must not be shared (private, no-store, Set-Cookie) are left alone.
    """
    directives = cache_control(_all(headers, b"cache-control"))
    if "private" in directives or "no-store" in directives or first(headers, b"set-cookie") is not None:
        return headers
    kept = [f"{name}={value}" if value is not None else name for name, value in directives.items()
            if name not in ("s-maxage", "public")]
    value = ", ".join(["public", *kept, f"s-maxage={cdn_ttl}"]).encode()
    rest = [(key, val) for key, val in headers if key.lower() not in (b"cache-control", b"cdn-cache-control")]
    return [*rest, (b"cache-control", value), (b"cdn-cache-control", f"max-age={cdn_ttl}".encode())]
