"""The response cache: AI answers served once, safe by default, no stampedes across instances.

``CacheMiddleware(app, ttl=60, key=["method", "path", "query", "body"], store=...)``
works on its own; the gateway builds the same :class:`CachePolicy` from a
route's ``cache:`` block and runs it in the route's one store round trip.

One request's path (pure rules in :mod:`.cache_rules`, keys in :mod:`.cache_key`,
the stored value in :mod:`.cache_entry`):

- ``prepare``: a request that must not use the cache (``Authorization``,
  ``Cookie``, unkeyed overrides, ...) bypasses it; otherwise the entry's
  ``Get`` joins the batch.
- ``decide``: fresh -> the stored answer (or 304 for a matching conditional
  request); a vary marker -> one more read for the variant; stale within
  ``stale_while_revalidate`` -> stale at once, and the request that wins the
  refresh lock refreshes it in the background (:mod:`.cache_refresh`); stale
  within ``stale_if_error`` -> kept in ``ctx.stale``;
  a miss -> ``Set(lock, NX)``: the winner goes upstream, the others wait for its
  fill (a store notification, else a bounded backoff) up to ``lock_timeout``
  and answer ``collapsed`` from it, or go upstream themselves.
- ``respond``: ``Cache-Status`` on the response start; a stale entry instead
  of a 502/504; a stored entry refreshed by the upstream's 304.
- ``finish``: the entry (only a complete response within ``max_body``), its
  purge indexes, the lock release and the "filled" notification, all deferred.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .cache_entry import PASS, RESPONSE, VARY, Entry, decode, encode, vary_marker
from .cache_key import body_part, canonical_query, digest, vary_digest, vary_names
from .cache_refresh import collect
from .cache_rules import (
    UNKEYED_OVERRIDES,
    RequestFacts,
    bypass,
    cdn_cache_control,
    first,
    freshness,
    not_modified,
    not_storable,
    refreshed,
    stored_headers,
    validators,
)
from .cache_settings import CacheSettings
from .cache_signals import fills, purges
from .clientip import IPNetwork
from .context import RequestContext
from .memo import Memo
from .metrics import CACHE_REQUESTS, CACHE_STORED_BYTES, tally
from .pipeline import ASGIApp, PolicyPipeline
from .policy import Answer, BasePolicy, Completed, Pending, Prepared
from .responses import Message, Response
from .store import Command, CommandError, Delete, Get, IndexAdd, IndexPurge, Publish, Set, Store, StoreError

logger = logging.getLogger("edgeway.cache")

WAIT_INITIAL, WAIT_MAX = 0.01, 0.25  # seconds: backoff between re-reads while another request fills
_MIN_TTL_MS = 1000
_MEMO_ENTRIES, _MEMO_MAX_VALUE = 256, 16_384  # decoded entries kept per route: at most 4 MB
# hot entries: a fresh entry read from the store is served from this instance's memory for up to HOT_FOR
# seconds without reading it again (purges clear them at once); per route at most HOT_ENTRIES of at most
# HOT_MAX_SIZE bytes each (8 MB)
HOT_FOR, HOT_ENTRIES, HOT_MAX_SIZE = 1.0, 128, 65_536
_KEYS_KEPT = 1024  # primary keys remembered per route (method, host, path, query -> key)
_CONDITIONAL = frozenset({b"if-none-match", b"if-modified-since"})
_SESSION_COOKIE = re.compile(rb"(?:^|;)\s*sb-[^=;]*-auth-token")
_WATCHED = frozenset({b"host", b"authorization", b"cookie", b"content-length", b"transfer-encoding", *_CONDITIONAL,
                      *(name.encode() for name in UNKEYED_OVERRIDES)})


@dataclass(slots=True)
class _Request:
    """One request's cache state, from prepare to finish."""

    key: str = ""
    primary: str = ""
    url: str = ""  # label of this request's target in the route index (purge by URL), set when filling
    conditional: bool = False  # the client sent If-None-Match / If-Modified-Since
    detail: str | None = None  # bypass reason
    status: str = "miss"  # hit | miss | stale | bypass | collapsed (metrics and ctx.outcomes)
    lock: str | None = None  # the fill lock's token while this request holds it
    vary: tuple[str, ...] = ()
    stale: Entry | None = None  # being refreshed or revalidated by this request
    revalidating: bool = False
    cache_status: bytes = b""
    replaced_by: Entry | None = None  # the entry refreshed by a 304
    conditional_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    hot: _Hot | None = None  # a fresh entry this instance read less than HOT_FOR seconds ago


@dataclass(slots=True)
class _Hot:
    """A fresh entry served from this instance's memory until ``until``, and the answer it last made: the same
    for every hit until ``answer_until``, when its ``Age`` or ``ttl=`` (whole seconds) would change."""

    entry: Entry
    until: float
    answer: Response | None = None
    answer_until: float = 0.0


def _status(*parts: str) -> bytes:
    return "; ".join(("edgeway", *parts)).encode()


class CachePolicy(BasePolicy):
    """A route's response cache; shared by all requests (per-request state lives in :class:`_Request`)."""

    name = "cache"
    wants_respond = True
    wants_finish = True
    decides_from_memory = True  # prepare only reads; a hot entry is answered by decide at once

    def __init__(self, settings: CacheSettings, *, store: Store, route: str = "default",
                 key_prefix: str = "edgeway:", clock: Callable[[], float] = time.time,
                 upstream: ASGIApp | None = None) -> None:
        """``upstream`` is the app behind the route's policies: stale_while_revalidate refreshes through it
        in the background (without it, the request that wins the refresh goes upstream itself)."""
        self.settings = settings
        self.upstream = upstream
        self._refreshes: set[asyncio.Task[None]] = set()
        self.rules = settings.rules()
        self.store = store
        self.route = route
        self.clock = clock
        self.methods = settings.methods
        self.parts = settings.key
        self.key_has_body = "body" in settings.key
        self.key_has_user = "user" in settings.key
        self.cookies_ignored = settings.cookies == "ignore"
        self._decoded: dict[str, tuple[bytes, Entry]] = {}
        self._hot: dict[str, _Hot] = {}  # by primary key
        self._plain_key = set(self.parts) <= {"method", "path", "query"}
        self._keys: Memo[tuple[str, bytes, str, bytes], str] = Memo(_KEYS_KEPT)  # request target -> primary key
        self.request_body_limit = settings.max_request_body if self.key_has_body else 0
        self.response_body_limit = settings.max_body
        self.prefix = f"{key_prefix}cache:"
        self.route_index = f"{self.prefix}ix:route:{route}"
        self.lock_ms = max(1, int(settings.lock_age * 1000))
        self.channel = f"{self.prefix}filled"
        self.purge_channel = f"{self.prefix}purged"
        self._purges = purges(store, self.purge_channel)
        self._purges.on_purge(self.forget_hot)
        self._counters = {s: tally(CACHE_REQUESTS.labels(route, s))
                          for s in ("hit", "miss", "stale", "bypass", "collapsed")}
        self._stored_bytes = CACHE_STORED_BYTES.labels(route)
        self._tag_header = settings.tag_header.lower().encode() if settings.tag_header else None

    # -- keys ---------------------------------------------------------------------

    def tag_index(self, tag: str) -> str:
        """The index of every entry carrying ``tag`` (shared by all routes)."""
        return f"{self.prefix}ix:tag:{tag}"

    def url_label(self, method: str, path: str, query_string: bytes) -> str:
        """The label, in the route index, of every entry of one request target (all its hosts, users,
        bodies and variants): what a purge by URL deletes."""
        method = "GET" if method == "HEAD" else method
        query = canonical_query(query_string, self.settings.ignore_query)
        return digest((method.encode(), path.encode("utf-8", "surrogateescape"), query))[:32]

    def _primary(self, ctx: RequestContext, method: str, host: bytes) -> str:
        """The request's primary key; for a key of method, path and query only, remembered per request target
        (a hot entry's hits skip the query parsing and hashing)."""
        if not self._plain_key:
            return self._digest(ctx, method, host)
        scope = ctx.scope
        target = (method, host, scope["path"], scope.get("query_string", b""))
        key = self._keys.get(target)
        if key is None:
            key = self._keys.keep(target, self._digest(ctx, method, host))
        return key

    def _digest(self, ctx: RequestContext, method: str, host: bytes) -> str:
        scope = ctx.scope
        parts: list[bytes] = []
        for part in self.parts:
            if part == "method":
                parts.append(method.encode())
            elif part == "path":
                # the target URI, authority included (RFC 9111's key): a client's own Host never selects
                # another host's entry, so an upstream that echoes it cannot poison anyone else's answer
                parts.append(host.lower() + b" " + scope["path"].encode("utf-8", "surrogateescape"))
            elif part == "query":
                parts.append(canonical_query(scope.get("query_string", b""), self.settings.ignore_query))
            elif part == "body":
                parts.append(body_part(ctx.body or b"", ctx.header("content-type"), self.settings.body_include,
                                       self.settings.body_exclude))
            elif part == "user":
                parts.append((ctx.user or "").encode())
            else:
                parts.append(",".join(ctx.headers.get(part[7:], ())).encode("utf-8", "surrogateescape"))
        return f"{self.prefix}{self.route}:{digest(parts)}"

    # -- the protocol -------------------------------------------------------------------

    def prepare(self, ctx: RequestContext) -> Prepared:
        if not self._purges.listening:
            self._purges.listen()
        scope = ctx.scope
        method = scope["method"]
        host = b""
        authorization = cookie = session = override = body = conditional = False
        for name, value in scope["headers"]:  # one pass over the raw fields: this runs on every hit
            if name in _WATCHED:
                if name == b"host":
                    host = value
                elif name == b"authorization":
                    authorization = True
                elif name == b"cookie":
                    cookie = True
                    session = session or (self.cookies_ignored and _SESSION_COOKIE.search(value) is not None)
                elif name == b"content-length":
                    body = body or value.strip() not in (b"0", b"")
                elif name == b"transfer-encoding":
                    body = True
                elif name in _CONDITIONAL:
                    conditional = True
                else:
                    override = True
        detail = None
        if authorization or cookie or body or override or ctx.user is not None or ctx.body_too_large or \
                method not in self.methods:  # else bypass has no reason (a plain GET: every hit)
            facts = RequestFacts(method, authorization, cookie, ctx.user is not None, body, ctx.body_too_large,
                                 override, session)
            detail = bypass(facts, key_has_body=self.key_has_body, key_has_user=self.key_has_user,
                            cookies_ignored=self.cookies_ignored, methods=self.methods)
        if detail is not None:
            return Prepared((), _Request(detail=detail, status="bypass",
                                         cache_status=_status("fwd=bypass", f"detail={detail}")))
        primary = self._primary(ctx, "GET" if method == "HEAD" else method, host)
        hot = self._hot.get(primary)
        if hot is not None:
            now = self.clock()
            if now < hot.until and hot.entry.ttl(now) > 0:  # no store command: answered from memory in decide
                return Prepared((), _Request(key=primary, primary=primary, conditional=conditional, hot=hot))
            del self._hot[primary]
        return Prepared((Get(primary, binary=True),), _Request(key=primary, primary=primary, conditional=conditional))

    def forget_hot(self) -> None:
        """Drop the entries served from memory (a purge ran here or in another instance)."""
        self._hot.clear()

    def _keep_hot(self, key: str, entry: Entry, now: float) -> None:
        if entry.size > HOT_MAX_SIZE:
            return
        hot = self._hot
        if key not in hot and len(hot) >= HOT_ENTRIES:
            del hot[next(iter(hot))]
        hot[key] = _Hot(entry, now + HOT_FOR)

    def decide(self, ctx: RequestContext, prepared: Prepared, results: Sequence[object]) -> Answer | Pending | None:
        state: _Request = prepared.state  # type: ignore[assignment]
        if state.detail is not None:
            return None
        if state.hot is not None:
            return self._hot_hit(ctx, state, state.hot)
        found = results[0]
        entry = self._decode(state.key, found if isinstance(found, bytes) else None)
        if entry is not None and entry.kind == VARY:
            return Pending(self._variant(ctx, state, entry))
        return self._lookup(ctx, state, entry)

    def _hot_hit(self, ctx: RequestContext, state: _Request, hot: _Hot) -> Response:
        now = self.clock()
        if state.conditional:  # (rare: its answer depends on the request's validators)
            return self._hit(ctx, state, hot.entry, now, _status("hit", f"ttl={int(hot.entry.ttl(now))}"), "hit")
        if now < hot.answer_until and hot.answer is not None:
            self._count(ctx, "hit")
            return hot.answer
        entry = hot.entry
        age, ttl = entry.age(now), entry.ttl(now)
        hot.answer = self._hit(ctx, state, entry, now, _status("hit", f"ttl={int(ttl)}"), "hit")
        hot.answer_until = now + min(math.ceil(age) - age or 1.0, ttl - math.floor(ttl))
        return hot.answer

    def _decode(self, key: str, found: bytes | None) -> Entry | None:
        """The entry a stored value holds; the last few decoded are kept, so a hot entry decodes once."""
        if found is None:
            return None
        memo = self._decoded.get(key)
        if memo is not None and memo[0] == found:
            return memo[1]
        entry = decode(found)
        if entry is not None and len(found) <= _MEMO_MAX_VALUE:
            if len(self._decoded) >= _MEMO_ENTRIES:
                del self._decoded[next(iter(self._decoded))]
            self._decoded[key] = (found, entry)
        return entry

    def store_failed(self, ctx: RequestContext, prepared: Prepared, error: StoreError | CommandError) -> None:
        state: _Request = prepared.state  # type: ignore[assignment]
        if state.detail is None:  # no store: a miss that goes upstream and tries to fill later
            state.cache_status = _status("fwd=miss", "detail=store-unavailable")
        return None

    async def _variant(self, ctx: RequestContext, state: _Request, marker: Entry) -> Answer | None:
        state.vary = marker.vary
        state.key = f"{state.primary}:{vary_digest(marker.vary, ctx.headers)}"
        try:
            (found,) = await self.store.execute([Get(state.key, binary=True)])
        except StoreError:
            return None
        outcome = self._lookup(ctx, state, decode(found if isinstance(found, bytes) else None))
        return await outcome.awaitable if isinstance(outcome, Pending) else outcome  # type: ignore[return-value]

    def _lookup(self, ctx: RequestContext, state: _Request, entry: Entry | None) -> Answer | Pending | None:
        now = self.clock()
        if entry is not None and entry.kind == PASS:
            return None  # the last answer was not storable: no waiting for a fill that will not come
        if entry is not None:
            ttl = entry.ttl(now)
            if ttl > 0:
                if state.key == state.primary and entry.kind == RESPONSE:
                    self._keep_hot(state.key, entry, now)
                return self._hit(ctx, state, entry, now, _status("hit", f"ttl={int(ttl)}"), "hit")
            stale_for = -ttl
            if stale_for < entry.stale_while_revalidate:
                return Pending(self._revalidate_or_stale(ctx, state, entry, now))
            if stale_for < entry.stale_if_error:
                ctx.stale = self._hit(ctx, state, entry, now, _status("hit", "stale"), "stale", count=False)
            if validators(entry.headers) and ctx.scope["method"] != "HEAD":
                self._conditional(ctx, state, entry)
        return Pending(self._fill_or_wait(ctx, state))

    def _hit(self, ctx: RequestContext, state: _Request, entry: Entry, now: float, cache_status: bytes,
             status: str, *, count: bool = True) -> Response:
        headers = [*entry.headers, (b"age", str(int(entry.age(now))).encode()), (b"cache-status", cache_status)]
        if self.settings.cdn_ttl is not None:
            headers = cdn_cache_control(headers, int(self.settings.cdn_ttl))
        if count:
            self._count(ctx, status)
        if state.conditional and entry.status == 200 and not_modified(ctx.headers, entry.headers):
            kept = [(k, v) for k, v in headers if k not in (b"content-length", b"content-type", b"content-encoding")]
            return Response(304, kept)
        return Response(entry.status, headers, entry.chunks)

    def _count(self, ctx: RequestContext, status: str) -> None:
        ctx.outcomes["cache"] = status
        self._counters[status].inc()

    def _conditional(self, ctx: RequestContext, state: _Request, entry: Entry) -> None:
        """Ask the upstream whether the stale entry still holds, when the client sent no conditions of its own."""
        if state.conditional:
            return
        state.stale = entry
        state.revalidating = True
        ctx.scope["headers"] = [*ctx.scope["headers"], *validators(entry.headers)]

    async def _release(self, key: str, token: str, taken: object) -> None:
        if taken is True:
            with contextlib.suppress(StoreError):
                await self.store.execute([Delete(key, if_value=token)])

    async def _take_lock(self, key: str) -> str | None:
        token = uuid.uuid4().hex
        (taken,) = await self.store.execute([Set(f"{key}:lock", token, self.lock_ms, only_if_absent=True)])
        return token if taken is True else None  # a refused command (CommandError) holds no lock

    async def _revalidate_or_stale(self, ctx: RequestContext, state: _Request, entry: Entry,
                                   now: float) -> Answer | None:
        """Within stale_while_revalidate: stale at once; one request across instances refreshes the entry."""
        try:
            token = await self._take_lock(state.key)
        except StoreError:
            token = None
        stale = self._hit(ctx, state, entry, now, _status("hit", "stale"), "stale")
        if token is None:
            return stale  # another request (here or in another instance) is refreshing it
        if self.upstream is not None:
            task = asyncio.get_running_loop().create_task(self._refresh(ctx, state, entry, token))
            self._refreshes.add(task)
            task.add_done_callback(self._refreshes.discard)
            return stale
        # no app to call in the background: this request refreshes in the foreground
        state.lock = token
        ctx.stale = self._hit(ctx, state, entry, now, _status("hit", "stale"), "stale", count=False)
        if validators(entry.headers) and ctx.scope["method"] != "HEAD":
            self._conditional(ctx, state, entry)
        state.status = "stale"
        return None

    async def _refresh(self, ctx: RequestContext, state: _Request, entry: Entry, token: str) -> None:
        """Ask the app again for a stale entry (conditionally when it has validators) and store the answer."""
        lock_key = state.key
        response = await collect(self.upstream, ctx.scope, ctx.body or b"", validators(entry.headers),
                                 limit=self.rules.max_body, timeout=self.settings.lock_age)
        scope = ctx.scope
        state.url = self.url_label(scope["method"], scope["path"], scope.get("query_string", b""))
        writes: list[Command] = []
        if response.status == 304 and response.complete:
            now = self.clock()
            headers = refreshed(entry.headers, response.headers)
            fresh = freshness(headers, self.rules, now)
            if fresh is not None:
                renewed = Entry(entry.status, headers, entry.chunks, now, fresh.fresh, fresh.stale_while_revalidate,
                                fresh.stale_if_error)
                writes.extend(self._entry_writes(state, renewed, response.headers))
        else:
            writes.extend(self._fill(state, response, "GET", ctx.headers, keep=True))
        writes.append(Delete(f"{lock_key}:lock", if_value=token))
        writes.append(Publish(self.channel, lock_key))
        try:
            await self.store.execute(writes)
        except StoreError as error:
            logger.warning("storing the refreshed entry of %s failed: %s", scope["path"], error)

    async def _fill_or_wait(self, ctx: RequestContext, state: _Request) -> Answer | None:
        """A miss: fill it (holding the lock), or wait for the request that does."""
        if ctx.scope["method"] == "HEAD":
            return None  # a HEAD answer has no body to store: never the filler, never waiting
        waits = fills(self.store, self.channel)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.lock_timeout
        notified = await waits.ready()
        delay = WAIT_INITIAL
        while True:
            future = waits.future(state.key) if notified else None
            token = uuid.uuid4().hex
            lock = Set(f"{state.key}:lock", token, self.lock_ms, only_if_absent=True)
            try:
                # read and lock in one round trip: a fill that landed since the last look is used, not redone
                found, taken = await self.store.execute([Get(state.key, binary=True), lock])
            except StoreError:
                return None
            entry = decode(found if isinstance(found, bytes) else None)
            now = self.clock()
            if entry is not None and entry.kind == VARY and not state.vary:
                # the fill varies on request fields: wait for (or fill) this request's own variant
                await self._release(lock.key, token, taken)
                state.vary = entry.vary
                state.key = f"{state.primary}:{vary_digest(entry.vary, ctx.headers)}"
                continue
            if entry is not None and entry.kind == RESPONSE and entry.ttl(now) > 0:
                await self._release(lock.key, token, taken)
                return self._hit(ctx, state, entry, now, _status("hit", "collapsed"), "collapsed")
            if taken is True:
                state.lock = token
                return None
            if entry is not None and entry.kind == PASS:
                return None
            remaining = deadline - loop.time()
            if remaining <= 0:
                state.cache_status = _status("fwd=miss", "detail=lock-timeout")
                return None
            wait = min(remaining, delay * 10 if notified else delay)
            if future is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(future), wait)
            else:
                await asyncio.sleep(wait)
            delay = min(delay * 2, WAIT_MAX)

    def respond(self, ctx: RequestContext, prepared: Prepared, start: Message) -> Answer | None:
        state: _Request = prepared.state  # type: ignore[assignment]
        status = start["status"]
        headers = start.setdefault("headers", [])
        if state.detail is not None:
            self._count(ctx, "bypass")
            headers.append((b"cache-status", state.cache_status))
            return None
        if ctx.stale is not None and status in (502, 504):
            stale: Response = ctx.stale
            self._count(ctx, "stale")
            return stale
        if state.revalidating and status == 304 and state.stale is not None:
            entry = state.stale
            now = self.clock()
            fresh = freshness(refreshed(entry.headers, headers), self.rules, now)
            if fresh is not None:
                state.replaced_by = Entry(entry.status, refreshed(entry.headers, headers), entry.chunks, now,
                                          fresh.fresh, fresh.stale_while_revalidate, fresh.stale_if_error)
                self._count(ctx, "stale")
                return self._hit(ctx, state, state.replaced_by, now, _status("fwd=stale", "fwd-status=304"),
                                 "stale", count=False)
        self._count(ctx, "stale" if state.status == "stale" else "miss")
        if not state.cache_status:
            detail = self._refusal(ctx, status, headers)
            state.cache_status = _status("fwd=stale" if state.status == "stale" else "fwd=miss",
                                         "stored" if detail is None else f"detail={detail}")
        headers.append((b"cache-status", state.cache_status))
        if self.settings.cdn_ttl is not None:
            start["headers"] = cdn_cache_control(headers, int(self.settings.cdn_ttl))
        return None

    def _refusal(self, ctx: RequestContext, status: int, headers: Sequence[tuple[bytes, bytes]]) -> str | None:
        if ctx.scope["method"] == "HEAD":
            return "head"
        detail = not_storable(status, headers, self.rules)
        if detail is not None:
            return detail
        if freshness(headers, self.rules, self.clock()) is None:
            return "no-freshness"  # ttl: origin without freshness, or max-age=0 and no stale window
        length = first(headers, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.rules.max_body:
            return "too-large"
        return None

    def finish(self, ctx: RequestContext, prepared: Prepared, response: Completed) -> Sequence[Command]:
        state: _Request = prepared.state  # type: ignore[assignment]
        if state.detail is not None or not state.key:
            return ()
        lock_key = state.key
        scope = ctx.scope
        state.url = self.url_label(scope["method"], scope["path"], scope.get("query_string", b""))
        writes: list[Command] = []
        if state.replaced_by is not None:
            writes.extend(self._entry_writes(state, state.replaced_by, response.headers))
        else:
            writes.extend(self._fill(state, response, scope["method"], ctx.headers,
                                     keep=state.stale is not None or ctx.stale is not None))
        if state.lock is not None:
            writes.append(Delete(f"{lock_key}:lock", if_value=state.lock))
            writes.append(Publish(self.channel, lock_key))
        return writes

    def _fill(self, state: _Request, response: Completed, method: str, request_headers: dict[str, list[str]], *,
              keep: bool) -> list[Command]:
        """The writes storing a response (``keep``: an entry kept for stale serving must not be replaced by a
        hit-for-miss marker)."""
        if not response.complete or response.status in (0, 304) or method == "HEAD":
            return []  # an interrupted response is never stored; the next request fills
        detail = not_storable(response.status, response.headers, self.rules)
        now = self.clock()
        fresh = None if detail is not None else freshness(response.headers, self.rules, now)
        names = vary_names(value for name, value in response.headers if name.lower() == b"vary")
        if fresh is None or response.chunks is None or names is None:
            if state.lock is None or keep:
                return []  # never overwrite an entry kept for stale serving
            # hit-for-miss: the waiters and the next requests go upstream at once instead of queueing on the lock
            return [Set(state.key, encode(Entry(0, [], [], now, 0.0, kind=PASS)), self.lock_ms)]
        entry = Entry(response.status, stored_headers(response.headers), list(response.chunks), now,
                      fresh.fresh, fresh.stale_while_revalidate, fresh.stale_if_error)
        writes: list[Command] = []
        if names:
            keep_ms = max(_MIN_TTL_MS, int(fresh.keep * 1000))
            state.key = f"{state.primary}:{vary_digest(names, request_headers)}"
            writes.append(Set(state.primary, encode(vary_marker(names, now, fresh.keep)), keep_ms))
            writes.append(IndexAdd(self.route_index, state.primary, keep_ms, state.url))
        else:
            state.key = state.primary
        writes.extend(self._entry_writes(state, entry, response.headers))
        return writes

    def _entry_writes(self, state: _Request, entry: Entry,
                      headers: Sequence[tuple[bytes, bytes]]) -> list[Command]:
        value = encode(entry)
        keep_ms = max(_MIN_TTL_MS, int((entry.fresh + max(entry.stale_while_revalidate, entry.stale_if_error))
                                       * 1000))
        self._stored_bytes.inc(entry.size)
        writes: list[Command] = [Set(state.key, value, keep_ms),
                                 IndexAdd(self.route_index, state.key, keep_ms, state.url)]
        for tag in self._tags(headers):
            writes.append(IndexAdd(self.tag_index(tag), state.key, keep_ms))
        return writes

    def _tags(self, headers: Sequence[tuple[bytes, bytes]]) -> Iterable[str]:
        yield from self.settings.tags
        if self._tag_header is not None:
            for name, value in headers:
                if name.lower() == self._tag_header:
                    yield from (tag.strip() for tag in value.decode("latin-1").split(",") if tag.strip())

    # -- purge ----------------------------------------------------------------------------

    def purge_commands(self, *, everything: bool = False, tag: str | None = None,
                       url: tuple[str, str, bytes] | None = None) -> list[IndexPurge]:
        """The store commands of one purge on this route (see :func:`.cache_signals.purge`)."""
        if everything:
            return [IndexPurge(self.route_index)]
        if tag is not None:
            return [IndexPurge(self.tag_index(tag))]
        if url is not None:
            return [IndexPurge(self.route_index, self.url_label(*url))]
        return []


class CacheMiddleware(PolicyPipeline):
    """The response cache as ASGI middleware, without a policy file.

    >>> app = CacheMiddleware(app, ttl=60, key=["method", "path", "query", "body"],
    ...                       store=open_store("redis://localhost:6379"))

    Keyword options are the ``cache:`` block's (:class:`CacheSettings`): ``max_body``,
    ``stale_if_error``, ``tags``, ``tag_header``, ``cdn_ttl``, ...
    """

    def __init__(self, app: ASGIApp, *, store: Store, ttl: float | str = 300.0,
                 key: Sequence[str] = ("method", "path", "query"), trusted_proxies: Iterable[str | IPNetwork] = (),
                 route: str = "default", key_prefix: str = "edgeway:", clock: Callable[[], float] = time.time,
                 paths: Iterable[str] | None = None, exclude: Iterable[str] = (), **options: object) -> None:
        settings = CacheSettings.model_validate({"ttl": ttl, "key": list(key), **options})
        self.cache = CachePolicy(settings, store=store, route=route, key_prefix=key_prefix, clock=clock, upstream=app)
        super().__init__(app, policies=[self.cache], store=store, trusted_proxies=trusted_proxies, route=route,
                         paths=paths, exclude=exclude)
