"""The gateway: an ASGI app built from a policy by :func:`create_app`.

One request's path (docs/architecture.md draws it):

    __call__ -> request sanity (400) -> /_edgeway/* endpoints
             -> route table (first match; 404 no_route, 405)
             -> route app = PolicyPipeline(policies, one store batch) -> UpstreamProxy

A new policy is applied as a whole (routes, proxies, store) by swapping one
immutable ``_Active`` object; a policy that fails to load never replaces the
running one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import re
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from edgeway.middleware import metrics
from edgeway.middleware.breaker import CircuitBreaker
from edgeway.middleware.clientip import TrustedProxies
from edgeway.middleware.context import SCOPE_KEY, RequestContext, Scope
from edgeway.middleware.pipeline import Throttled
from edgeway.middleware.policy import Answer
from edgeway.middleware.responses import ErrorResponse, Message, Receive, Send, bad_request
from edgeway.middleware.session import SessionService
from edgeway.middleware.store import Clock, Store, StoreError
from edgeway.middleware.store.failover import FailoverStore

from .accesslog import AccessLog
from .admin import AdminEndpoints, token_digest
from .cluster import Cluster
from .config import Policy, Route, ServerConfig
from .errors import PolicyError, Problem
from .headers import request_problem
from .loader import LoadedPolicy, load_policy
from .proxy import UpstreamProxy
from .routing import RouteMeter, RouteTable, build_breakers, needs_normalizing, normalize_path
from .stores import build_store

logger = logging.getLogger("edgeway")

ADMIN_PREFIX = "/_edgeway/"
MEMORY_SAMPLE_EVERY = 60.0
_REQUEST_ID = b"x-request-id"
_VALID_ID = re.compile(rb"[\x21-\x7e]{1,128}")
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Active:
    loaded: LoadedPolicy
    routes: RouteTable
    proxies: tuple[UpstreamProxy, ...]
    breakers: dict[str, CircuitBreaker]
    store: Store
    trusted: TrustedProxies
    admin_digest: bytes | None
    reject_underscores: bool


class Gateway:
    """The gateway ASGI app. Build it with :func:`create_app`."""

    def __init__(self, loaded: LoadedPolicy, *, store: Store | None = None, clock: Clock | None = None,
                 policy_path: str | None = None, access_log: AccessLog | None = None,
                 watch: float | None = None) -> None:
        self._clock = clock
        self._instance_id = os.urandom(6).hex()
        self._fixed_store = store
        self.policy_path = policy_path
        self.access_log = access_log
        self._active = self._compile(loaded, store)
        self._retiring: set[asyncio.Task[None]] = set()
        self._sampler: asyncio.Task[None] | None = None
        self._watch = watch if policy_path is not None else None
        self._watcher: asyncio.Task[None] | None = None
        self._errors = Throttled()
        self.admin = AdminEndpoints(self)
        self.cluster = Cluster(self)
        self._unrouted = RouteMeter("none")
        self._admin_meter = RouteMeter("admin")
        self._version_gauge = metrics.POLICY_VERSION.labels(loaded.version)
        self._version_gauge.set(1)

    # -- building -------------------------------------------------------------

    def _compile(self, loaded: LoadedPolicy, store: Store | None) -> _Active:
        policy = loaded.policy
        trusted = TrustedProxies(policy.trusted_proxies)
        store = store or build_store(policy.store, self._clock, key_prefix=policy.key_prefix)
        breakers = build_breakers(policy, store, self._clock)
        proxies = {name: UpstreamProxy(name, upstream, trusted, policy.server, breakers.get(name), self._clock)
                   for name, upstream in policy.upstreams.items()}
        routes = RouteTable(policy, store, trusted, lambda route: proxies[_upstream_of(route, loaded)],
                            breakers=breakers, clock=self._clock)
        token = policy.admin.token
        return _Active(loaded, routes, tuple(proxies.values()), breakers, store, trusted,
                       token_digest(token) if token else None, policy.server.headers_with_underscores == "reject")

    @property
    def loaded(self) -> LoadedPolicy:
        return self._active.loaded

    @property
    def server_settings(self) -> ServerConfig:
        """The running policy's ``server:`` block; :mod:`edgeway.gateway.server` reads it per connection."""
        return self._active.loaded.policy.server

    @property
    def store(self) -> Store:
        return self._active.store

    @property
    def admin_token_digest(self) -> bytes | None:
        """SHA-256 of the policy's admin token; None while the admin API is off."""
        return self._active.admin_digest

    @property
    def instance_id(self) -> str:
        """This process's id among the instances sharing the store (the heartbeat's, when there is one)."""
        store = self._active.store
        return store.instance_id if isinstance(store, FailoverStore) else self._instance_id

    @property
    def routes(self) -> RouteTable:
        return self._active.routes

    @property
    def breakers(self) -> dict[str, CircuitBreaker]:
        """The running policy's circuit breakers by upstream name."""
        return self._active.breakers

    @property
    def sessions(self) -> SessionService | None:
        """The running policy's session service (revocations go through it), or None without sessions:."""
        return self._active.routes.sessions

    async def apply(self, loaded: LoadedPolicy) -> None:
        """Switch to a new valid policy at once; requests already running finish on the old one, whose
        upstream sessions (and store, if it changed) close once their longest read timeout has passed."""
        old = self._active
        same_store = self._fixed_store is not None or (
            (old.loaded.policy.store, old.loaded.policy.name) == (loaded.policy.store, loaded.policy.name))
        self._active = self._compile(loaded, old.store if same_store else None)
        if not same_store:
            await self._active.store.start()
        grace = max((up.timeout.read for up in old.loaded.policy.upstreams.values()), default=0.0) + 1.0
        task = asyncio.get_running_loop().create_task(self._retire(old, not same_store, min(grace, 300.0)))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        self._version_gauge.set(0)
        self._version_gauge = metrics.POLICY_VERSION.labels(loaded.version)
        self._version_gauge.set(1)
        logger.info("policy %s (version %s) applied", loaded.source, loaded.version)
        if not same_store and self.cluster.available:
            await self.cluster.store_changed()

    async def _retire(self, old: _Active, close_store: bool, after: float) -> None:
        try:
            await asyncio.sleep(after)
        finally:  # also when cancelled by close(): the old sessions must not leak
            for proxy in old.proxies:
                await proxy.close()
            for breaker in old.breakers.values():
                await breaker.close()
            await old.routes.close()
            if close_store:
                await old.store.close()

    async def reload(self) -> bool:
        """Re-read the policy file; on any problem keep the running policy and log every problem."""
        if self.policy_path is None:
            return False
        return await self.reload_file() is None

    async def reload_file(self) -> str | None:
        """Re-read the policy file: None when applied, else its problems (FILE:LINE:COL lines), logged, with
        the running policy kept."""
        assert self.policy_path is not None, "reload_file needs a gateway built from a file"
        try:
            # off the event loop: parsing and validating a large policy must never stall traffic
            loaded = await asyncio.to_thread(load_policy, self.policy_path, mode="gateway")
        except PolicyError as exc:
            metrics.POLICY_RELOADS.labels("failed").inc()
            logger.error("policy reload failed, keeping version %s:\n%s", self._active.loaded.version, exc)
            return str(exc)
        await self.apply(loaded)
        metrics.POLICY_RELOADS.labels("ok").inc()
        return None

    async def close(self) -> None:
        self._version_gauge.set(0)
        await self.cluster.close()
        for task in (self._sampler, self._watcher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._sampler = self._watcher = None
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for proxy in self._active.proxies:
            await proxy.close()
        for breaker in self._active.breakers.values():
            await breaker.close()
        await self._active.routes.close()
        await self._active.store.close()

    # -- ASGI -----------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(receive, send)
            else:  # websocket: not proxied (yet); refuse the handshake
                await send({"type": "websocket.close", "code": 1008})
            return
        # one coroutine from here to the route's app: every level of await costs on each suspension
        started = time.perf_counter()
        active = self._active
        ctx = RequestContext(scope, active.trusted)
        scope[SCOPE_KEY] = ctx
        ctx.request_id = _request_id(scope)
        status = 500  # what the client sees if the app fails before answering (the server sends it)

        def observed(message: Message) -> Awaitable[None]:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            return send(message)

        meter = self._unrouted
        try:
            app, meter = self._dispatch(active, ctx, scope)
            await app(scope, receive, observed)
        except Exception as exc:  # a bug or an unforeseen input must not print a traceback per request
            await self._failed(exc, scope, receive, send)
        finally:
            elapsed = time.perf_counter() - started
            meter.record(scope["method"], status, elapsed)
            if self.access_log is not None:
                self.access_log.record(ctx, status, elapsed, active.store.kind)
            # the scope and its context point at each other: unlinked, the request's objects are freed as soon
            # as the server lets go of the scope, not by the cyclic collector (whose passes grow with them)
            scope.pop(SCOPE_KEY, None)

    def answer_now(self, scope: Scope) -> Answer | None:
        """The answer to a request that can be decided from memory alone (a hot cache entry on a route whose
        only policy is the cache), counted and logged as ``__call__`` would; None: serve it normally (nothing
        was answered, counted or logged).

        :mod:`edgeway.gateway.server` calls this from the connection's protocol for a bodiless request, and
        writes the answer itself: no ASGI task, no store round trip. Requests that need more than a plain
        route match (a path to normalise, the admin API, a refusal) are left to ``__call__``.
        """
        active = self._active
        if not active.routes.answers_now:
            return None
        path: str = scope["path"]
        if path.startswith(ADMIN_PREFIX) or needs_normalizing(path, scope.get("raw_path")):
            return None
        found = active.routes.match(path, scope["method"])
        if isinstance(found, set) or not found.answers_now:
            return None
        if request_problem(scope, reject_underscores=active.reject_underscores) is not None:
            return None
        started = time.perf_counter()
        ctx = RequestContext(scope, active.trusted, found.name)
        scope[SCOPE_KEY] = ctx
        answer: Answer | None = found.app.answer_now(ctx)
        scope.pop(SCOPE_KEY, None)  # (see __call__)
        if answer is None:
            return None
        ctx.request_id = _request_id(scope)
        elapsed = time.perf_counter() - started
        found.meter.record(scope["method"], answer.status, elapsed)
        if self.access_log is not None:
            self.access_log.record(ctx, answer.status, elapsed, active.store.kind)
        return answer

    def _dispatch(self, active: _Active, ctx: RequestContext, scope: Scope) -> tuple[ASGIApp, RouteMeter]:
        """The app that answers this request (its route's, the admin API, or an error) and its meter.

        Refusals come first: request sanity (400), then the route table
        (404 no_route, 405); a path is normalised (``//``, ``%2F``) before it is matched.
        """
        problem = request_problem(scope, reject_underscores=active.reject_underscores)
        if problem is not None:
            return bad_request(problem), self._unrouted
        path: str = scope["path"]
        odd = needs_normalizing(path, scope.get("raw_path"))
        if odd:
            path, scope["raw_path"] = normalize_path(path, scope.get("raw_path"))
            scope["path"] = path
        if path.startswith(ADMIN_PREFIX):
            ctx.route = "admin"
            return self.admin, self._admin_meter
        found = active.routes.match(path, scope["method"])
        if isinstance(found, set):
            if found:
                return ErrorResponse(405, "method_not_allowed", f"{scope['method']} is not allowed on {path}",
                                     headers=[(b"allow", ", ".join(sorted(found)).encode())]), self._unrouted
            return ErrorResponse(404, "no_route", f"no route matches {path}"), self._unrouted
        if odd:
            if ";" in path and not found.allow_semicolons:
                return bad_request("';' path parameters are not allowed on this route (match.allow_semicolons)"), \
                    self._unrouted
            if "\\" in path and not found.allow_backslashes:
                return bad_request("'\\' is not allowed in paths on this route (match.allow_backslashes)"), \
                    self._unrouted
        ctx.route = found.name
        return found.app, found.meter

    async def _failed(self, exc: Exception, scope: Scope, receive: Receive, send: Send) -> None:
        self._errors.warning("request %s %s failed: %s: %s (traceback at debug level)", scope.get("method"),
                             scope.get("path"), type(exc).__name__, exc)
        logger.debug("request failed", exc_info=exc)
        response = ErrorResponse(500, "internal_error", "the gateway could not handle this request",
                                 headers=[(b"connection", b"close")])
        try:
            await response(scope, receive, send)
        except RuntimeError:
            # the response had already started: returning without completing it makes the server close the
            # connection, so the client sees a truncated response, never a complete-looking wrong one
            return

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._install_reload_signal()
                await self.store.start()  # heartbeats from now: peers count this instance before it serves
                loop = asyncio.get_running_loop()
                self._sampler = loop.create_task(self._sample_store())
                if self._watch is not None:
                    self._watcher = loop.create_task(self._watch_file(self._watch))
                await self.cluster.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                metrics.process_exiting()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _watch_file(self, every: float) -> None:
        """``--watch``: reload when the policy file's content changes (a stat per ``every`` seconds; the file
        is read only when its size, time or inode moved, which also catches a Kubernetes ConfigMap swap)."""
        assert self.policy_path is not None
        path = Path(self.policy_path)

        def signature() -> tuple[int, int, int] | None:
            try:
                stat = path.stat()
            except OSError:
                return None
            return stat.st_mtime_ns, stat.st_size, stat.st_ino

        seen = signature()
        while True:
            await asyncio.sleep(every)
            now = signature()
            if now is None or now == seen:
                continue
            seen = now
            try:
                text = path.read_bytes()
            except OSError:
                continue
            if hashlib.sha256(text).hexdigest()[:12] != self._active.loaded.version:
                logger.info("policy file %s changed: reloading", path)
                await self.reload()

    async def _sample_store(self) -> None:
        """Store memory for the metrics, every MEMORY_SAMPLE_EVERY seconds: never on a request's path."""
        while True:
            store = self._active.store
            try:
                usage = await store.memory_usage()
            except StoreError as error:
                logger.debug("store memory sample failed: %s", error)
                usage = None
            if usage is not None:
                metrics.STORE_MEMORY_USED.labels(store.kind).set(usage[0])
                metrics.STORE_MEMORY_MAX.labels(store.kind).set(usage[1])
            await asyncio.sleep(MEMORY_SAMPLE_EVERY)

    def _install_reload_signal(self) -> None:
        if self.policy_path is None:
            return
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        # add_signal_handler raises NotImplementedError on loops without signal support (Windows),
        # RuntimeError or ValueError outside the main thread (tests, embedded servers): reload stays on the API
        except (NotImplementedError, RuntimeError, ValueError):
            logger.debug("SIGHUP reload not available in this process")


def _request_id(scope: Scope) -> str:
    """The client's ``X-Request-Id`` when it is 1-128 visible ASCII characters; otherwise a new one, put in the
    request in its place so the upstream, the access log and the client's trace agree."""
    headers = scope["headers"]
    found = -1
    for position, (name, value) in enumerate(headers):
        if name == _REQUEST_ID:
            if _VALID_ID.fullmatch(value):
                client: str = value.decode("ascii")
                return client
            found = position
            break
    generated = f"{random.getrandbits(96):024x}"  # a trace id, not a secret: no system call per request
    pair = (_REQUEST_ID, generated.encode())
    if not isinstance(headers, list):
        headers = scope["headers"] = list(headers)
    if found >= 0:
        headers[found] = pair
    else:
        headers.append(pair)  # the server built this list for this request alone
    return generated


def _upstream_of(route: Route, loaded: LoadedPolicy) -> str:
    if route.upstream is None:  # the loader refuses this in gateway mode; a Policy object may still hold it
        raise PolicyError(loaded.source, [Problem(1, 1, f"route {route.route_id} has no upstream: the gateway "
                                                        "needs one on every route (in-app policies may leave it out)")])
    return route.upstream


def create_app(policy: LoadedPolicy | Policy | str | Path, *, store: Store | None = None,
               clock: Clock | None = None, access_log: AccessLog | None = None,
               watch: float | None = None) -> Gateway:
    """Build the gateway from a policy file path, a loaded policy, or a :class:`Policy` object.

    ``access_log`` writes one line per request (see :mod:`edgeway.gateway.accesslog`); None: no access log.
    ``watch``: seconds between checks of the policy file, reloaded when it changes (a file path only).
    """
    path: str | None = None
    if isinstance(policy, str | Path):
        path = str(policy)
        loaded = load_policy(path, mode="gateway")
    elif isinstance(policy, Policy):
        loaded = LoadedPolicy(policy, "<object>", "object")
    else:
        loaded = policy
    return Gateway(loaded, store=store, clock=clock, policy_path=path, access_log=access_log, watch=watch)
