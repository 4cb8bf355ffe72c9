"""The breaker as a route policy (last before the upstream) and as ``CircuitBreakerMiddleware``.

Per request: ``prepare`` adds a command only when the local copy is due for a
re-read or the open time is over (the probe-token request); ``decide`` lets
the request through or answers for the upstream — with the cache's stale entry
(``ctx.stale``), the upstream's static ``fallback:``, or 503
``upstream_unavailable`` with ``Retry-After`` — and past ``max_in_flight`` with
503 ``upstream_overloaded``; ``finish`` classifies the response and returns the
breaker's write, if any.

What counts as a failure (:func:`failed`): the gateway's own 502 ``bad_gateway``
(``connect``) and 504 ``upstream_timeout`` (``timeout``) when listed in ``on:``,
an upstream status listed there, and with ``slow_call`` an answer slower than
that to its first byte. 4xx answers never count, nor does a response cut short
(the client left): neither says the upstream failed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .breaker import PROBE, Admission, CircuitBreaker, CircuitOpen
from .breaker_config import BreakerSettings
from .clientip import IPNetwork
from .context import RequestContext
from .pipeline import ASGIApp, PolicyPipeline
from .policy import Answer, BasePolicy, Completed, Pending, Prepared
from .responses import ErrorResponse, Response
from .store import BreakerUpdate, Command, CommandError, Store, StoreError

__all__ = ["BreakerPolicy", "CircuitBreakerMiddleware", "failed"]

_GATEWAY_ERRORS = {b"bad_gateway": "connect", b"upstream_timeout": "timeout"}


def failed(response: Completed, settings: BreakerSettings, statuses: frozenset[int]) -> bool | None:
    """True for a failure, False for a success, None for a response that says nothing about the upstream."""
    status = response.status
    if not response.complete or status == 0:
        return None
    if status < 400 and status not in statuses:  # nearly every answer: no header to look at
        return settings.slow_call is not None and response.elapsed > settings.slow_call
    own = response.header(b"edgeway-error")
    if own is not None:
        kind = _GATEWAY_ERRORS.get(own)
        return True if kind is not None and kind in settings.on else None
    if response.status in statuses:
        return True
    if 400 <= response.status < 500:
        return None
    return settings.slow_call is not None and response.elapsed > settings.slow_call


class BreakerPolicy(BasePolicy):
    """A route's use of its upstream's :class:`CircuitBreaker` (shared by all routes to that upstream)."""

    name = "breaker"
    wants_finish = True

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker
        settings = breaker.settings
        self._settings = settings
        self._statuses = settings.statuses
        self._fallback: tuple[int, list[tuple[bytes, bytes]], bytes] | None = None
        if settings.fallback is not None:
            headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in settings.fallback.headers.items()]
            self._fallback = (settings.fallback.status, headers, settings.fallback.body.encode())

    # Per request, ``prepared.state`` is None until the call is admitted, then its Admission, and after
    # ``finish`` the write it returned, if any (for ``written``). A closed breaker allocates nothing of its own.

    def prepare(self, ctx: RequestContext) -> Prepared:
        command = self.breaker.before()
        return Prepared() if command is None else Prepared((command,))

    def decide(self, ctx: RequestContext, prepared: Prepared, results: Sequence[object]) -> Answer | None:
        if not results:  # nothing was asked of the store: nearly every request to a closed breaker
            return self._admitted(ctx, prepared, self.breaker.admit(None, None))
        return self._admit(ctx, prepared, results[0])

    def store_failed(self, ctx: RequestContext, prepared: Prepared,
                     error: StoreError | CommandError) -> Answer | Pending | None:
        return self._admit(ctx, prepared, error)

    def _admit(self, ctx: RequestContext, prepared: Prepared, result: object) -> Answer | None:
        command = prepared.commands[0] if prepared.commands else None
        return self._admitted(ctx, prepared,
                              self.breaker.admit(command if isinstance(command, BreakerUpdate) else None, result))

    def _admitted(self, ctx: RequestContext, prepared: Prepared, admitted: Admission | CircuitOpen) -> Answer | None:
        if isinstance(admitted, CircuitOpen):
            return self._refusal(ctx, admitted)
        prepared.state = admitted
        if admitted is PROBE:
            ctx.outcomes["breaker"] = "probe"
        return None

    def _refusal(self, ctx: RequestContext, refused: CircuitOpen) -> Answer:
        name = self.breaker.name
        retry_after = (b"retry-after", str(refused.retry_after).encode())
        if refused.overloaded:
            ctx.outcomes["breaker"] = "overloaded"
            return ErrorResponse(503, "upstream_overloaded", f"upstream {name} has too many requests in flight",
                                 extra={"upstream": name}, headers=[retry_after])
        if ctx.stale is not None:
            ctx.outcomes["breaker"] = "stale"
            stale: Answer = ctx.stale
            return stale
        if self._fallback is not None:
            ctx.outcomes["breaker"] = "fallback"
            status, headers, body = self._fallback
            return Response(status, [*headers, (b"edgeway-error", b"upstream_unavailable"), retry_after,
                                     (b"content-length", str(len(body)).encode())], [body] if body else [])
        ctx.outcomes["breaker"] = "open"
        return ErrorResponse(503, "upstream_unavailable", f"upstream {name} is failing; its circuit breaker is open",
                             extra={"upstream": name}, headers=[retry_after])

    def finish(self, ctx: RequestContext, prepared: Prepared, response: Completed) -> Sequence[Command]:
        admission = prepared.state
        if not isinstance(admission, Admission):
            return ()  # not admitted: answered before the call
        outcome = failed(response, self._settings, self._statuses)
        if admission is PROBE and outcome is None and response.complete and response.status:
            outcome = False  # a 4xx to the probe: the upstream answers, that is all a probe asks
        write = self.breaker.record(admission, outcome)
        if write is None:
            return ()
        prepared.state = write
        return (write,)

    def written(self, ctx: RequestContext, prepared: Prepared, outcome: Sequence[object] | StoreError) -> None:
        write = prepared.state
        if isinstance(write, BreakerUpdate):
            self.breaker.written(write, outcome if isinstance(outcome, StoreError) else outcome[0])


class CircuitBreakerMiddleware(PolicyPipeline):
    """A circuit breaker around an ASGI app (or part of one), without a policy file.

    >>> breaker = CircuitBreaker("backend", BreakerSettings(failures=5, open_for="30s"), store=store)
    >>> app = CircuitBreakerMiddleware(app, breaker=breaker)

    The app's 5xx answers listed in ``on:`` count as failures; while open the
    middleware answers 503 ``upstream_unavailable`` (or the settings'
    ``fallback``) without calling the app. Pass the same ``breaker`` to several
    middlewares, or use it with ``async with breaker:`` in code: they share one state.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        breaker: CircuitBreaker | None = None,
        store: Store | None = None,
        settings: BreakerSettings | None = None,
        name: str = "app",
        key_prefix: str = "edgeway:",
        trusted_proxies: Iterable[str | IPNetwork] = (),
    ) -> None:
        if breaker is None:
            if store is None:
                raise TypeError("CircuitBreakerMiddleware needs a breaker= or a store= to build one")
            breaker = CircuitBreaker(name, settings, store=store, key_prefix=key_prefix)
        self.breaker = breaker
        super().__init__(app, policies=[BreakerPolicy(breaker)], store=breaker.store,
                         trusted_proxies=trusted_proxies, route=breaker.name)
