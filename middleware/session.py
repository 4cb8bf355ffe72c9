"""Sessions: who is calling, checked once per token, with revocations every instance sees at once.

``session: required | optional`` on a route runs :class:`SessionPolicy` first
(docs/architecture.md, "The four policies on one route"):

- ``prepare`` takes the token (``Authorization: Bearer``, else the Supabase
  auth cookie) and verifies it without any store work when it can (a JWT with a
  known key, or a result this instance already holds): a refusal is a 401 here,
  so it is charged by no limit and served from no cache. It sets ``ctx.user``
  and the ``X-Edgeway-*`` identity headers, and adds its revocation check to
  the route's one store batch (the rate limiter carries the same check as a
  guard, so a revoked session is not charged either). A token only the provider
  can judge, in no cache, is a :class:`~.policy.Pending` (see
  :mod:`.session_cache`).
- ``decide`` refuses a revoked session (401 ``revoked``). When no shared store
  can answer, ``privileged: true`` routes fail closed (503), others open, with
  a log line and ``edgeway_session_revocations_unchecked_total``.

In-app, the user is ``scope["state"]["user"]`` (``request.state.user``) and
:func:`current_user` is a FastAPI/Starlette dependency.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any, Literal

from starlette.requests import Request

from .clientip import IPNetwork
from .context import RequestContext
from .memo import Memo
from .metrics import SESSION_REVOCATIONS_UNCHECKED
from .pipeline import ASGIApp, PolicyPipeline, Throttled
from .policy import BasePolicy, Pending, Prepared
from .responses import ErrorResponse, Receive, Send
from .session_cache import Known, NeedKeys, NeedRemote, ProviderFailure, SessionService
from .session_settings import SessionSettings, SessionUser
from .store import CommandError, Revoke, Revoked, Store, StoreError
from .tokens import TokenError, bearer_token, cookie_token, token_digest, unverified_claims

__all__ = ["SessionMiddleware", "SessionPolicy", "SessionService", "SessionSettings", "SessionUser",
           "current_user", "optional_user", "revoke"]

ALWAYS = 9_007_199_254_740_991  # a revocation time after any iat: the token or session is refused outright
_REASONS = {
    "missing": "this route needs a session token (Authorization: Bearer, or the auth cookie)",
    "expired": "the session token has expired",
    "revoked": "the session has been revoked",
}


def _digest(value: str) -> str:
    return hashlib.blake2b(value.encode(), digest_size=16).hexdigest()


def _header_value(value: Any) -> bytes:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    # header values are ASCII without controls: anything else is escaped, never passed raw
    return "".join(ch if 32 <= ord(ch) < 127 else f"\\u{ord(ch):04x}" for ch in text).encode("ascii")


def unauthorized(reason: str, detail: str | None = None) -> ErrorResponse:
    """401 ``unauthorized`` with ``WWW-Authenticate: Bearer`` and the reason in the body."""
    challenge = b'Bearer realm="edgeway"' if reason == "missing" else (
        b'Bearer realm="edgeway", error="invalid_token"')
    return ErrorResponse(401, "unauthorized", detail or _REASONS.get(reason, "the session token is not valid"),
                         extra={"reason": reason}, headers=[(b"www-authenticate", challenge)])


def auth_unavailable(detail: str) -> ErrorResponse:
    """503 ``auth_unavailable``: the session could not be checked right now."""
    return ErrorResponse(503, "auth_unavailable", detail, headers=[(b"retry-after", b"1")])


class _Grant:
    """What an admitted token adds to each of its requests, built once per token (kept in ``Known.grant``)."""

    __slots__ = ("commands", "digest", "identity")

    def __init__(self, digest: str, identity: tuple[tuple[bytes, bytes], ...], check: Revoked) -> None:
        self.digest = digest
        self.identity = identity
        self.commands = (check,)


def _scan(headers: Sequence[tuple[bytes, bytes]]) -> tuple[bytes | None, bool]:
    """The first Authorization value, and whether the client sent any ``X-Edgeway-*`` field: one pass over the
    raw fields, without building the context's header dict."""
    authorization = None
    copies = False
    for name, value in headers:
        if len(name) == 13 and authorization is None and name.lower() == b"authorization":
            authorization = value
        elif name.startswith(b"x-edgeway-"):
            copies = True
    return authorization, copies


def _without_copies(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` minus every ``X-Edgeway-*`` field (only the session policy's own identity may carry them)."""
    return [pair for pair in headers if not pair[0].startswith(b"x-edgeway-")]


_DIGESTS_KEPT = 4096  # Authorization values whose token digest an instance remembers (see SessionPolicy.prepare)


class SessionPolicy(BasePolicy):
    """``session: required | optional`` of one route as a :class:`~edgeway.middleware.policy.Policy`."""

    name = "session"

    def __init__(self, service: SessionService, *, mode: Literal["required", "optional"] = "required",
                 privileged: bool = False, route: str = "default") -> None:
        self.service = service
        self.required = mode == "required"
        self.privileged = privileged
        self.route = route
        self._headers = tuple((name.encode(), path) for name, path in service.settings.headers.items())
        self._open = service.settings.on_provider_failure == "open" and not self.required
        self._unchecked = SESSION_REVOCATIONS_UNCHECKED.labels(route)
        self._log = Throttled(60.0)
        prefix = service.key_prefix
        self._token_key, self._sid_key, self._user_key = f"{prefix}rv:t:", f"{prefix}rv:s:", f"{prefix}rv:u:"
        # Authorization value -> its token's digest: a known bearer token skips parsing and hashing. The values
        # stay in this process, in a bounded map (never in the store or a log line), as they do in its requests.
        self._digests: Memo[bytes, str] = Memo(_DIGESTS_KEPT)

    # -- policy protocol ----------------------------------------------------------------------

    def prepare(self, ctx: RequestContext) -> Prepared | ErrorResponse | Pending:
        service = self.service
        now = service.clock()
        authorization, copies = _scan(ctx.scope["headers"])
        # a bearer token this instance has seen: its digest without parsing or hashing it again
        seen = self._digests.get(authorization) if authorization is not None else None
        if seen is not None:
            known = service.cached(seen, now)
            if known is not None:
                return self._admit(ctx, seen, known, now, copies)
        try:
            token = bearer_token(authorization.decode("latin-1") if authorization is not None else None)
            bearer = token is not None  # the Bearer header wins over the cookie
            if token is None and service.cookie is not None:
                token = cookie_token(ctx.headers.get("cookie", ()), service.cookie)
        except TokenError as error:
            return unauthorized(error.reason, str(error))
        if token is None:
            return self._anonymous(ctx, copies) if not self.required else unauthorized("missing")
        if seen is not None:  # its result ran out: verify it again
            digest, cached = seen, None
        else:
            digest = token_digest(token)
            if bearer and authorization is not None:
                self._digests.keep(authorization, digest)
            cached = service.cached(digest, now)
        if cached is not None:
            return self._admit(ctx, digest, cached, now, copies)
        try:
            known = service.verify_local(token, now)
        except TokenError as error:
            service.remember(digest, service.refused(error.reason, now))
            return unauthorized(error.reason, str(error))
        except (NeedKeys, NeedRemote) as need:
            return Pending(self._slow(ctx, token, digest, need))
        service.remember(digest, known)
        return self._admit(ctx, digest, known, now, copies)

    async def _slow(self, ctx: RequestContext, token: str, digest: str, need: Exception) -> Prepared | ErrorResponse:
        service = self.service
        try:
            known = await service.resolve(token, digest, need)
        except TokenError as error:
            service.remember(digest, service.refused(error.reason, service.clock()))
            return unauthorized(error.reason, str(error))
        except ProviderFailure as failure:
            if self._open:
                self._log.warning("route %s: auth provider unavailable, request passed as anonymous", self.route)
                return self._anonymous(ctx)
            return auth_unavailable(str(failure))
        service.remember(digest, known)
        return self._admit(ctx, digest, known, service.clock())

    def _admit(self, ctx: RequestContext, digest: str, known: Known, now: float,
               copies: bool = True) -> Prepared | ErrorResponse:
        """Let the request through as ``known``'s user; ``copies``: the client may have sent X-Edgeway-* fields."""
        user = known.user
        if user is None:
            return unauthorized(known.reason)
        grant: _Grant | None = known.grant
        if grant is None:
            grant = known.grant = self._grant(digest, known, user)
        ctx.user = user.id
        ctx.identity = grant.identity
        scope = ctx.scope
        # in-app the identity travels in the scope's headers; client copies of X-Edgeway-* never do
        headers = scope["headers"]
        if copies:
            headers = _without_copies(headers)
        scope["headers"] = [*headers, *grant.identity]
        scope.setdefault("state", {})["user"] = user
        ctx.revocation = grant.commands[0]
        refresh = self.service.refresh_shared(digest, known, now) if known.remote else None
        return Prepared(grant.commands if refresh is None else (*grant.commands, refresh), known)

    def _grant(self, digest: str, known: Known, user: SessionUser) -> _Grant:
        identity = [(b"x-edgeway-user", _header_value(user.id))]
        for name, path in self._headers:
            value = user.claims.get(path)
            if value is not None:
                identity.append((name, _header_value(value)))
        keys = [self._token_key + digest, self._user_key + _digest(user.id)]
        if known.sid is not None:
            keys.append(self._sid_key + _digest(known.sid))
        return _Grant(digest, tuple(identity), Revoked(tuple(keys), known.iat_ms))

    def _anonymous(self, ctx: RequestContext, copies: bool = True) -> Prepared:
        """Let the request through without a user; ``copies``: the client may have sent X-Edgeway-* fields."""
        scope = ctx.scope
        if copies:
            scope["headers"] = _without_copies(scope["headers"])
        scope.setdefault("state", {})["user"] = None
        return Prepared()

    def decide(self, ctx: RequestContext, prepared: Prepared, results: Sequence[object]) -> ErrorResponse | None:
        known = prepared.state
        if not isinstance(known, Known):
            return None
        revoked = results[0]
        if revoked is True:
            service = self.service
            service.remember(known.grant.digest, service.refused("revoked", service.clock(), known.until))
            return unauthorized("revoked")
        if revoked is None:
            return self._unchecked_revocations("no shared store answered")
        return None

    def store_failed(self, ctx: RequestContext, prepared: Prepared,
                     error: StoreError | CommandError) -> ErrorResponse | None:
        if not isinstance(prepared.state, Known):
            return None
        return self._unchecked_revocations(str(error))

    def _unchecked_revocations(self, why: str) -> ErrorResponse | None:
        self._unchecked.inc()
        if self.privileged:
            return auth_unavailable("session revocations cannot be checked right now")
        self._log.warning("route %s: session revocations not checked (%s); request let through", self.route, why)
        return None


# -- revocation (POST /_edgeway/sessions/revoke) -----------------------------------------------------------


async def revoke(service: SessionService, body: object) -> tuple[int, dict[str, Any]]:
    """Revoke by ``token``, ``jti`` / ``session_id``, or ``user`` (optionally ``before``: epoch seconds).

    Returns (HTTP status, JSON answer). Every instance refuses the session from
    its next request on: the check is in every request's store batch.
    """
    kinds = ("token", "jti", "session_id", "user")
    if not isinstance(body, dict) or sum(1 for kind in kinds if kind in body) != 1 or not all(
            isinstance(body[kind], str) and body[kind] for kind in kinds if kind in body):
        return 400, {"error": "bad_request",
                     "message": 'send exactly one of {"token": ...}, {"jti": ...}, {"session_id": ...} or '
                                '{"user": "<user id>", "before": <epoch seconds, optional>}'}
    unknown = set(body) - {*kinds, "before"}
    before = body.get("before")
    if unknown or ("before" in body and ("user" not in body or isinstance(before, bool)
                                         or not isinstance(before, int | float))):
        return 400, {"error": "bad_request", "message": f"unexpected fields: {', '.join(sorted(map(str, body)))}"}
    now = service.clock()
    prefix = service.key_prefix
    settings = service.settings
    if "token" in body:
        digest = token_digest(body["token"])
        exp = unverified_claims(body["token"]).get("exp")
        left = (float(exp) - now) if isinstance(exp, int | float) and not isinstance(exp, bool) else settings.ttl
        command = Revoke(f"{prefix}rv:t:{digest}", ALWAYS, max(1000, int((left + settings.leeway) * 1000)))
        service.remember(digest, service.refused("revoked", now, now + max(left, settings.negative_ttl)))
    elif "user" in body:
        at = float(body.get("before", now))
        command = Revoke(f"{prefix}rv:u:{_digest(body['user'])}", int(at * 1000), int(settings.revocation_ttl * 1000))
    else:
        sid = body.get("jti") or body["session_id"]
        command = Revoke(f"{prefix}rv:s:{_digest(sid)}", ALWAYS, int(settings.revocation_ttl * 1000))
    try:
        (result,) = await service.store.execute([command])
    except StoreError as error:
        result = error
    if isinstance(result, StoreError | CommandError):
        return 503, {"error": "store_unavailable", "message": f"the revocation could not be stored: {result}"}
    return 200, {"revoked": True}


# -- in-app use -------------------------------------------------------------------------------------------


class SessionMiddleware(PolicyPipeline):
    """Sessions as ASGI middleware, without a policy file.

    >>> app = SessionMiddleware(app, store=open_store("memory://"), url="https://abc.supabase.co")
    ... # then request.state.user, or Depends(current_user) in FastAPI

    ``options`` are the ``sessions:`` keys (:class:`SessionSettings`).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: Store,
        mode: Literal["required", "optional"] = "required",
        privileged: bool = False,
        settings: SessionSettings | None = None,
        trusted_proxies: Iterable[str | IPNetwork] = (),
        route: str = "default",
        key_prefix: str = "edgeway:",
        clock: Callable[[], float] = time.time,
        **options: Any,
    ) -> None:
        settings = settings or SessionSettings(**options)
        self.service = SessionService(settings, store, key_prefix=key_prefix, clock=clock)
        policy = SessionPolicy(self.service, mode=mode, privileged=privileged, route=route)
        super().__init__(app, policies=[policy], store=store, trusted_proxies=trusted_proxies, route=route)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await super().__call__(scope, receive, send)
            return
        service = self.service

        async def send_closing(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "lifespan.shutdown.complete":  # the provider's connections go with the app
                await service.close()
            await send(message)

        await self.app(scope, receive, send_closing)


def _state(request: Request) -> Mapping[str, Any]:
    state = request.scope.get("state")
    return state if isinstance(state, Mapping) else {}


def current_user(request: Request) -> SessionUser:
    """FastAPI dependency (``user: SessionUser = Depends(current_user)``): the verified user, else 401."""
    user = _state(request).get("user")
    if not isinstance(user, SessionUser):
        from starlette.exceptions import HTTPException

        raise HTTPException(401, "unauthorized", headers={"www-authenticate": 'Bearer realm="edgeway"'})
    return user


def optional_user(request: Request) -> SessionUser | None:
    """FastAPI dependency for ``session: optional`` routes: the verified user or None."""
    user = _state(request).get("user")
    return user if isinstance(user, SessionUser) else None
