"""Knowing tokens: verify locally when possible, ask the provider once per token otherwise, remember both.

One :class:`SessionService` per policy file, shared by its routes:

- a per-instance result cache (token digest -> user or refusal), so a token is
  verified once, not on every request: positive results slide up to ``ttl``,
  never past the token's ``exp``; refusals stay ``negative_ttl``;
- local verification of JWTs (:mod:`edgeway.middleware.tokens`) with the
  configured secret or the issuer's JWKS (:class:`~.session_provider.JwksCache`);
- for tokens only the provider can judge, a shared result in the store
  (``{prefix}session:{digest}``), single-flighted across instances by a short
  lock (``SET NX PX``): one instance asks the provider, the others wait for
  its answer in the store. In-process, concurrent requests share one flight.

Tokens never reach the store or the logs: only their BLAKE2 digests do.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from .breaker import CircuitBreaker
from .breaker_config import BreakerSettings
from .metrics import SESSION_CACHE, tally
from .session_provider import AuthProvider, JwksCache, ProviderAnswer, _Session
from .session_settings import SessionSettings, SessionUser
from .store import CommandError, Delete, Get, Set, Store, StoreError
from .tokens import (
    NeedsKey,
    TokenError,
    VerificationKey,
    check_claims,
    claim,
    looks_like_jwt,
    parse_jwt,
    secret_key,
    select_key,
    supabase_cookie_name,
    unverified_claims,
    verify_signature,
)

logger = logging.getLogger("edgeway.session")

CACHE_SIZE = 100_000
PROVIDER_BREAKER = "session-provider"
PROVIDER_BREAKER_SETTINGS = BreakerSettings(failures=3, open_for=10.0, max_open_for=60.0)
"""The auth provider's breaker: 3 failures in a row open it for 10 s (doubling on each reopening, up to 60 s)."""
POLL_FIRST, POLL_MAX = 0.01, 0.1  # waiting for another instance's provider answer in the store

class Known:
    """What this instance knows of one token (mutable: a hit slides ``until``).

    ``grant`` is the session policy's per-token work on an admitted request (identity headers, the
    revocation check), done on the first request and reused by every warm one.
    """

    __slots__ = ("exp", "grant", "iat_ms", "reason", "remote", "sid", "stored_at", "until", "user")

    def __init__(self, user: SessionUser | None, *, reason: str = "", until: float, exp: float | None = None,
                 iat_ms: int = 0, sid: str | None = None, remote: bool = False, stored_at: float = 0.0) -> None:
        self.user = user
        self.reason = reason
        self.until = until
        self.exp = exp
        self.iat_ms = iat_ms
        self.sid = sid
        self.remote = remote
        self.stored_at = stored_at
        self.grant: Any = None

    def encode(self) -> str:
        """The shared cache's value: the user id, role and asked-for claims, or the refusal; never the token."""
        if self.user is None:
            return json.dumps({"ok": 0, "reason": self.reason, "until": self.until})
        return json.dumps({"ok": 1, "id": self.user.id, "role": self.user.role, "claims": dict(self.user.claims),
                           "iat": self.iat_ms, "exp": self.exp, "sid": self.sid, "until": self.until})

    @classmethod
    def decode(cls, text: str, now: float) -> Known | None:
        try:
            data = json.loads(text)
            until = float(data["until"])
            if not data["ok"]:
                return cls(None, reason=str(data["reason"]), until=until, remote=True, stored_at=now)
            user = SessionUser(str(data["id"]), data["role"], dict(data["claims"]))
            exp = None if data["exp"] is None else float(data["exp"])
            return cls(user, until=until, exp=exp, iat_ms=int(data["iat"]), sid=data["sid"], remote=True,
                       stored_at=now)
        except (ValueError, KeyError, TypeError):
            return None


class ProviderFailure(Exception):
    """The provider could not judge the token (down, slow, odd answer); ``detail`` says how."""


class NeedRemote(Exception):
    """The token must be judged by the provider."""


class NeedKeys(Exception):
    """The JWKS must be fetched (first use, or an unknown kid past the cooldown) before verifying."""


class SessionService:
    """Verification and result caches for one ``sessions:`` block; see the module docstring."""

    def __init__(self, settings: SessionSettings, store: Store, *, key_prefix: str = "edgeway:",
                 clock: Callable[[], float] = time.time, cache_size: int = CACHE_SIZE) -> None:
        self.settings = settings
        self.store = store
        self.key_prefix = key_prefix
        self.clock = clock
        self._size = cache_size
        self._known: collections.OrderedDict[str, Known] = collections.OrderedDict()
        self._flights: dict[str, asyncio.Task[Known]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._http = _Session(settings.timeout)
        jwks = settings.effective_jwks_url
        self.jwks = JwksCache(jwks, self._http, clock=clock) if jwks and settings.verify != "remote" else None
        self._secret: tuple[VerificationKey, ...] = (secret_key(settings.jwt_secret),) if settings.jwt_secret else ()
        anon_key = settings.anon_key if settings.anon_key is not None else os.environ.get("SUPABASE_ANON_KEY")
        self.breaker = CircuitBreaker(PROVIDER_BREAKER, PROVIDER_BREAKER_SETTINGS, store=store, key_prefix=key_prefix,
                                      clock=clock) if settings.remote else None
        self.provider = AuthProvider(f"{settings.base_url}/auth/v1/user", anon_key, self._http, self.breaker
                                     ) if self.breaker is not None else None
        self.cookie = settings.cookie or (supabase_cookie_name(settings.base_url) if settings.provider == "supabase"
                                          else None)
        self.audience = settings.effective_audience
        self.issuer = settings.effective_issuer
        self.wanted = tuple(dict.fromkeys((*settings.claims, *settings.headers.values())))
        self._lock_ms = int((settings.timeout + 1.0) * 1000)
        self._hits = tally(SESSION_CACHE.labels("hit"))
        self._misses = tally(SESSION_CACHE.labels("miss"))
        self._negatives = tally(SESSION_CACHE.labels("negative"))

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self.breaker is not None:
            await self.breaker.close()
        await self._http.close()

    # -- the per-instance cache -----------------------------------------------------------------

    def cached(self, digest: str, now: float) -> Known | None:
        """The token's known result, slid forward on a hit; None when unknown or expired."""
        known = self._known.get(digest)
        if known is None:
            self._misses.inc()
            return None
        if known.until <= now:
            del self._known[digest]
            self._misses.inc()
            return None
        if known.user is None:
            self._negatives.inc()
            return known
        self._hits.inc()
        ttl_end = now + self.settings.ttl
        known.until = ttl_end if known.exp is None else min(ttl_end, known.exp)
        return known

    def remember(self, digest: str, known: Known) -> None:
        self._known[digest] = known
        if len(self._known) > self._size:
            self._known.popitem(last=False)

    def forget(self, digest: str) -> None:
        self._known.pop(digest, None)

    def refused(self, reason: str, now: float, until: float | None = None) -> Known:
        return Known(None, reason=reason, until=until if until is not None else now + self.settings.negative_ttl)

    # -- local verification --------------------------------------------------------------------------

    def verify_local(self, token: str, now: float) -> Known:
        """The token's result from local checks; raises TokenError (refused), NeedKeys or NeedRemote."""
        settings = self.settings
        if settings.verify == "remote" or not looks_like_jwt(token):
            if self.provider is not None:
                self._expired_anyway(token, now)
                raise NeedRemote
            raise TokenError("malformed", "not a JWT")
        jwt = parse_jwt(token)
        keys = self._secret + (self.jwks.keys if self.jwks is not None else ())
        try:
            key = select_key(jwt, keys)
        except NeedsKey:
            if jwt.alg != "HS256" and self.jwks is not None and (
                not self.jwks.fresh or self.jwks.may_refetch()
            ):
                raise NeedKeys from None
            if self.provider is not None:
                self._expired_anyway(token, now)
                raise NeedRemote from None
            raise TokenError("unknown_key", "no configured key verifies this token") from None
        verify_signature(jwt, key)
        check_claims(jwt.claims, now, audience=self.audience, issuer=self.issuer, leeway=settings.leeway)
        return self._from_claims(jwt.claims, None, now, remote=False)

    def _expired_anyway(self, token: str, now: float) -> None:
        """Refuse, without asking, a JWT that says it has expired: refusing is always safe."""
        exp = unverified_claims(token).get("exp")
        if isinstance(exp, int | float) and not isinstance(exp, bool) and now > exp + self.settings.leeway:
            raise TokenError("expired", "the token has expired")

    def _from_claims(self, claims: Mapping[str, Any], user: Mapping[str, Any] | None, now: float, *,
                     remote: bool) -> Known:
        """A positive result from verified claims, or from the provider's user (claims then unverified extras)."""
        ident = user.get("id") if user is not None else claims.get("sub")
        if not isinstance(ident, str) or not ident:
            raise TokenError("malformed", "the token names no user (sub)")
        source: Mapping[str, Any] = user if user is not None else claims
        kept = {}
        for path in self.wanted:
            value = claim(source, path)
            if value is None and user is not None:
                value = claim(claims, path)
            if value is not None:
                kept[path] = value
        role = source.get("role") if isinstance(source.get("role"), str) else claims.get("role")
        exp = claims.get("exp")
        exp_s = float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
        iat = claims.get("iat")
        iat_ms = int(iat * 1000) if isinstance(iat, int | float) and not isinstance(iat, bool) else 0
        sid = claims.get("session_id") or claims.get("jti")
        ttl_end = now + self.settings.ttl
        return Known(SessionUser(ident, role if isinstance(role, str) else None, kept),
                     until=ttl_end if exp_s is None else min(ttl_end, exp_s), exp=exp_s, iat_ms=iat_ms,
                     sid=sid if isinstance(sid, str) else None, remote=remote, stored_at=now)

    # -- the slow path: keys to fetch, or the provider to ask ------------------------------------------------

    async def resolve(self, token: str, digest: str, need: Exception) -> Known:
        """Fetch keys or ask the provider as ``need`` says; raises TokenError or ProviderFailure."""
        if isinstance(need, NeedKeys):
            assert self.jwks is not None
            await self.jwks.refresh()
            try:
                return self.verify_local(token, self.clock())
            except (NeedKeys, NeedRemote):
                # fetched just now and still unknown (the cooldown stops a refetch loop): the provider decides
                if self.provider is None:
                    raise TokenError("unknown_key", "no configured key verifies this token") from None
        return await self.remote(token, digest)

    async def remote(self, token: str, digest: str) -> Known:
        """The provider's verdict on ``token``, at most one flight per token in this process."""
        flight = self._flights.get(digest)
        if flight is None:
            flight = asyncio.get_running_loop().create_task(self._remote(token, digest))
            self._flights[digest] = flight
            flight.add_done_callback(lambda _: self._flights.pop(digest, None))
        known = await asyncio.shield(flight)
        if known.user is None and known.reason == "auth_unavailable":
            raise ProviderFailure("the auth provider could not judge the token")
        return known

    async def _remote(self, token: str, digest: str) -> Known:
        store_key = f"{self.key_prefix}session:{digest}"
        lock_key = f"{self.key_prefix}session-lock:{digest}"
        owner = uuid.uuid4().hex
        try:
            found, taken = await self.store.execute(
                [Get(store_key), Set(lock_key, owner, self._lock_ms, only_if_absent=True)])
        except StoreError as error:
            logger.warning("session cache unreadable (%s): asking the provider without single-flight", error)
            return await self._ask(token)
        now = self.clock()
        locked = taken is True  # False when another instance holds it; a CommandError is no lock either
        if isinstance(found, str) and (known := Known.decode(found, now)) is not None:
            if locked:
                self._later([Delete(lock_key, if_value=owner)])
            return known
        if isinstance(taken, CommandError):  # the store refused the lock: ask without single-flight
            return await self._ask(token)
        if not locked:
            return await self._wait_for_other(token, store_key, lock_key)
        known = await self._ask(token)
        writes: list[Any] = [Delete(lock_key, if_value=owner)]
        if known.reason != "auth_unavailable":
            ttl_ms = max(1, int((known.until - self.clock()) * 1000))
            writes.insert(0, Set(store_key, known.encode(), ttl_ms))
        try:
            await self.store.execute(writes)
        except StoreError as error:
            logger.warning("session cache write failed: %s", error)
        return known

    async def _wait_for_other(self, token: str, store_key: str, lock_key: str) -> Known:
        """Another instance holds the lock: its answer appears in the store (or the lock goes, unanswered)."""
        deadline = time.monotonic() + self._lock_ms / 1000
        delay = POLL_FIRST
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX)
            try:
                found, holder = await self.store.execute([Get(store_key), Get(lock_key)])
            except StoreError:
                break
            if isinstance(found, str) and (known := Known.decode(found, self.clock())) is not None:
                return known
            if holder is None:
                # the holder writes its answer before it releases the lock: read once more to be sure
                try:
                    (found,) = await self.store.execute([Get(store_key)])
                except StoreError:
                    break
                if isinstance(found, str) and (known := Known.decode(found, self.clock())) is not None:
                    return known
                return self.refused("auth_unavailable", self.clock())  # it gave up: the provider is failing
        return await self._ask(token)

    async def _ask(self, token: str) -> Known:
        assert self.provider is not None
        answer: ProviderAnswer = await self.provider.get_user(token)
        now = self.clock()
        if answer.user is not None:
            return self._from_claims(unverified_claims(token), answer.user, now, remote=True)
        if answer.invalid:
            return self.refused("invalid", now)
        logger.warning("session provider failed: %s", answer.detail)
        return self.refused("auth_unavailable", now)

    def refresh_shared(self, digest: str, known: Known, now: float) -> Set | None:
        """A write sliding a provider-validated result's shared copy, when half its TTL has passed (rare)."""
        if not known.remote or known.user is None or now - known.stored_at < self.settings.ttl / 2:
            return None
        known.stored_at = now
        return Set(f"{self.key_prefix}session:{digest}", known.encode(), max(1, int((known.until - now) * 1000)))

    def _later(self, writes: list[Any]) -> None:
        async def run() -> None:
            try:
                await self.store.execute(writes)
            except StoreError as error:
                logger.warning("session cache write failed: %s", error)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
