"""The session policy's outside world: the JWKS cache and the auth provider's ``/user`` endpoint.

- :class:`JwksCache` keeps the issuer's public keys: fetched on first need,
  kept 10 minutes, refetched on an unknown ``kid`` at most once per 30 s
  (panva/jose and supabase auth-js use the same numbers), the last good set
  kept when a refetch fails. The URL comes from the configuration only.
- :class:`AuthProvider` asks ``GET {url}/auth/v1/user`` (headers ``apikey`` and
  the bearer token) over one pooled aiohttp session with a timeout, no cookie
  jar and no redirects, and sorts the answer into valid / invalid / failed.
- Every ``/user`` call goes through a :class:`~edgeway.middleware.breaker.CircuitBreaker`
  (shared by the instances through the store), so a dead provider is not
  hammered: once it opens, unknown tokens are answered at once (503) until a
  probe finds the provider back.

Tokens are never logged: log lines name a token by its digest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from .breaker import CircuitBreaker, CircuitOpen
from .metrics import SESSION_PROVIDER_CALLS, SESSION_PROVIDER_SECONDS
from .tokens import VerificationKey, key_from_jwk

logger = logging.getLogger("edgeway.session")

JWKS_TTL = 600.0
JWKS_COOLDOWN = 30.0
MAX_ANSWER_BYTES = 1_000_000

_VALID = SESSION_PROVIDER_CALLS.labels("valid")
_INVALID = SESSION_PROVIDER_CALLS.labels("invalid")
_ERROR = SESSION_PROVIDER_CALLS.labels("error")
_TIMEOUT = SESSION_PROVIDER_CALLS.labels("timeout")


class _Session:
    """One aiohttp session per event loop, created on first use inside it."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                cookie_jar=aiohttp.DummyCookieJar(),  # one user's Set-Cookie must never ride on another's call
                connector=aiohttp.TCPConnector(limit=64),
                auto_decompress=True,
            )
            self._loop = loop
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed and self._loop is asyncio.get_running_loop():
            await self._session.close()
        self._session = None


class JwksCache:
    """Public keys from a configured JWKS URL; see the module docstring."""

    def __init__(self, url: str, session: _Session, *, clock: Callable[[], float] = time.monotonic,
                 ttl: float = JWKS_TTL, cooldown: float = JWKS_COOLDOWN) -> None:
        self.url = url
        self._session = session
        self._clock = clock
        self._ttl = ttl
        self._cooldown = cooldown
        self.keys: tuple[VerificationKey, ...] = ()
        self._fetched = -float("inf")
        self._attempted = -float("inf")
        self._flight: asyncio.Future[None] | None = None
        self.fetches = 0

    @property
    def fresh(self) -> bool:
        """Keys were fetched less than the TTL ago."""
        return self._clock() - self._fetched < self._ttl

    def may_refetch(self) -> bool:
        """An unknown ``kid`` may trigger a fetch: not within the cooldown of the last attempt."""
        return self._clock() - self._attempted >= self._cooldown

    async def refresh(self) -> None:
        """Fetch the key set once, however many requests wait for it (single-flight in the process)."""
        if self._flight is not None:
            await asyncio.shield(self._flight)
            return
        flight: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flight = flight
        try:
            await self._fetch()
        finally:
            self._flight = None
            flight.set_result(None)

    async def _fetch(self) -> None:
        self._attempted = self._clock()
        self.fetches += 1
        started = time.perf_counter()
        try:
            async with self._session.get().get(self.url, allow_redirects=False) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                document = json.loads(await response.content.read(MAX_ANSWER_BYTES))
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            _ERROR.inc()
            logger.warning("JWKS fetch from %s failed: %s; keeping %d known keys", self.url, error, len(self.keys))
            return
        finally:
            SESSION_PROVIDER_SECONDS.observe(time.perf_counter() - started)
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            _ERROR.inc()
            logger.warning("JWKS from %s has no keys list; keeping %d known keys", self.url, len(self.keys))
            return
        _VALID.inc()
        self.keys = tuple(key for key in (key_from_jwk(e) for e in entries if isinstance(e, dict)) if key)
        self._fetched = self._clock()


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    """What the provider said of a token: ``user`` when valid, ``invalid`` when refused, else it failed."""

    user: Mapping[str, Any] | None = None
    invalid: bool = False
    detail: str = ""


class AuthProvider:
    """``GET {base}/auth/v1/user`` with ``apikey`` and the bearer token; see the module docstring."""

    def __init__(self, user_url: str, anon_key: str | None, session: _Session, breaker: CircuitBreaker) -> None:
        self.user_url = user_url
        self._anon_key = anon_key
        self._session = session
        self.breaker = breaker
        self.calls = 0

    async def get_user(self, token: str) -> ProviderAnswer:
        """Ask the provider about ``token``; never raises (failures are answers without user nor invalid)."""
        try:
            async with self.breaker:
                answer = await self._call(token)
                if answer.user is None and not answer.invalid:
                    self.breaker.fail()
                return answer
        except CircuitOpen as refused:
            _ERROR.inc()
            return ProviderAnswer(detail=f"the auth provider is failing; calls are paused ({refused})")

    async def _call(self, token: str) -> ProviderAnswer:
        self.calls += 1
        headers = {"authorization": f"Bearer {token}", "accept": "application/json"}
        if self._anon_key:
            headers["apikey"] = self._anon_key
        started = time.perf_counter()
        try:
            async with self._session.get().get(self.user_url, headers=headers, allow_redirects=False) as response:
                status = response.status
                body = await response.content.read(MAX_ANSWER_BYTES)
        except TimeoutError:
            _TIMEOUT.inc()
            return ProviderAnswer(detail="the auth provider did not answer in time")
        except aiohttp.ClientError as error:
            _ERROR.inc()
            return ProviderAnswer(detail=f"the auth provider could not be reached ({type(error).__name__})")
        finally:
            SESSION_PROVIDER_SECONDS.observe(time.perf_counter() - started)
        if status in (400, 401, 403, 404):
            _INVALID.inc()
            return ProviderAnswer(invalid=True, detail=f"the auth provider refused the token ({status})")
        try:
            user = json.loads(body) if status == 200 else None
        except ValueError:
            user = None
        if not isinstance(user, dict) or not isinstance(user.get("id"), str) or not user["id"]:
            _ERROR.inc()
            return ProviderAnswer(detail=f"the auth provider answered HTTP {status} without a user")
        _VALID.inc()
        return ProviderAnswer(user=user)
