"""The session policy's outside world: the JWKS cache and the auth provider's ``/user`` endpoint.

- :class:`JwksCache` keeps the issuer's public keys: fetched on first need,
  kept 10 minutes, refetched on an unknown ``kid`` at most once per 30 s
  (panva/jose and supabase auth-js use the same numbers), the last good set
  kept when a refetch fails. The URL comes from the configuration only.
- :class:`AuthProvider` asks ``GET {url}/auth/v1/user`` (headers ``apikey`` and
  the bearer token) over one pooled aiohttp session with a timeout, no cookie
  jar and no redirects, and sorts the answer into valid / invalid / failed.
- :class:`ProviderGuard` keeps a dead provider from being hammered: after
  ``failures`` consecutive failures calls fail at once for ``open_for``
  seconds, then one call probes. It has the shape of the gateway's circuit
  breaker (``async with``, ``fail()``), which can take its place.

Tokens are never logged: log lines name a token by its digest.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp

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


class GuardOpen(Exception):
    """The provider guard is open: calls are paused after repeated failures."""


class ProviderGuard:
    """Fail fast while the provider is down; see the module docstring.

    Used like the gateway's circuit breaker (``async with guard:`` raising while
    open, ``guard.fail()`` for a failure that raised nothing, an exception in the
    block counting as one), so either can guard the provider.
    """

    def __init__(self, *, failures: int = 3, open_for: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self._failures = failures
        self._open_for = open_for
        self._clock = clock
        self._count = 0
        self._open_until = 0.0
        self._probing = False
        self._failed: contextvars.ContextVar[list[bool]] = contextvars.ContextVar("provider_call_failed")

    async def __aenter__(self) -> ProviderGuard:
        if self._count >= self._failures:
            if self._clock() < self._open_until or self._probing:
                raise GuardOpen("the auth provider is failing; calls are paused")
            self._probing = True  # open_for has passed: this call probes
        self._failed.set([False])
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        failed = kind is not None or self._failed.get([False])[0]
        self._probing = False
        if not failed:
            self._count = 0
            return
        self._count += 1
        if self._count >= self._failures:
            self._open_until = self._clock() + self._open_for

    def fail(self) -> None:
        """Count the call in progress as failed (it raised nothing, but its answer was bad)."""
        self._failed.get([False])[0] = True


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

    def __init__(self, user_url: str, anon_key: str | None, session: _Session, guard: ProviderGuard) -> None:
        self.user_url = user_url
        self._anon_key = anon_key
        self._session = session
        self.guard = guard
        self.calls = 0

    async def get_user(self, token: str) -> ProviderAnswer:
        """Ask the provider about ``token``; never raises (failures are answers without user nor invalid)."""
        try:
            async with self.guard:
                answer = await self._call(token)
                if answer.user is None and not answer.invalid:
                    self.guard.fail()
                return answer
        except GuardOpen as error:
            _ERROR.inc()
            return ProviderAnswer(detail=str(error))

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
