"""The ``sessions:`` block: how tokens are verified and their results cached (frozen, validated once)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .units import Duration

_HEADER = re.compile(r"^x-edgeway-[a-z0-9-]+$")
_CLAIM = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")


class SessionSettings(BaseModel):
    """How a session token is verified and cached; every field documents its default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Literal["supabase", "jwt"] = Field(
        "supabase", description="supabase (JWKS + /auth/v1/user) or jwt (any issuer: jwks_url / jwt_secret).")
    url: str | None = Field(None, description="Supabase project URL: GET {url}/auth/v1/user, JWKS under it.")
    verify: Literal["auto", "jwt", "remote"] = Field(
        "auto", description="auto: locally when a key is known, else ask the provider; jwt: never ask; "
        "remote: always ask (then cache).")
    anon_key: str | None = Field(None, description="apikey for /auth/v1/user; default $SUPABASE_ANON_KEY.")
    jwt_secret: str | None = Field(None, description="HS256 secret (legacy Supabase projects, other issuers).")
    jwks_url: str | None = Field(None, description="JWKS URL; default {url}/auth/v1/.well-known/jwks.json.")
    issuer: str | None = Field(None, description="Required iss; default {url}/auth/v1 for supabase.")
    audience: str | None = Field(None, description="Required aud; default authenticated for supabase.")
    ttl: Duration = Field(86400.0, description="Positive results cached (sliding), never past the token's exp.")
    negative_ttl: Duration = Field(30.0, description="Refusals cached this long, so bad tokens don't reach the "
                                   "provider in a flood.")
    cookie: str | None = Field(None, description="Auth cookie name; default sb-<project-ref>-auth-token for "
                               "supabase, none for jwt.")
    on_provider_failure: Literal["closed", "open"] = Field(
        "closed", description="Provider down and token unknown: 503 auth_unavailable (closed), or anonymous on "
        "optional routes (open). Required routes always answer 503.")
    claims: tuple[str, ...] = Field((), description="Claims kept with the user (email, app_metadata.tenant).")
    headers: dict[str, str] = Field(
        default_factory=dict, description="Upstream headers from claims: {X-Edgeway-Role: role}.")
    timeout: Duration = Field(5.0, description="Provider and JWKS calls give up after this long.")
    leeway: Duration = Field(10.0, description="Clock skew allowed on exp / nbf / iat.")
    revocation_ttl: Duration = Field(
        604800.0, description="Revocations by jti / session_id / user are kept this long (Supabase caps a "
        "token's life at a week); by token, until that token expires.")

    @field_validator("claims")
    @classmethod
    def _claims(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for path in value:
            if not _CLAIM.match(path):
                raise ValueError(f"bad claim path {path!r}: expected a name or a dotted path such as "
                                 "app_metadata.tenant")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        out = {}
        for name, path in value.items():
            lower = name.strip().lower()
            if not _HEADER.match(lower) or lower == "x-edgeway-user":
                raise ValueError(f"header {name!r}: identity headers are named X-Edgeway-<Name> (not "
                                 "X-Edgeway-User, which is always the user id)")
            if not isinstance(path, str) or not _CLAIM.match(path):
                raise ValueError(f"header {name!r}: {path!r} is not a claim path")
            out[lower] = path
        return out

    @model_validator(mode="after")
    def _consistent(self) -> SessionSettings:
        if self.provider == "supabase" and not self.url:
            raise ValueError("provider: supabase needs url: (the project URL, e.g. ${SUPABASE_URL})")
        if self.provider == "jwt":
            if not self.jwks_url and not self.jwt_secret:
                raise ValueError("provider: jwt needs jwks_url: or jwt_secret: to verify tokens")
            if self.verify == "remote":
                raise ValueError("verify: remote needs provider: supabase (a jwt issuer has no user endpoint)")
        if self.verify == "jwt" and not (self.url or self.jwks_url or self.jwt_secret):
            raise ValueError("verify: jwt needs jwks_url: or jwt_secret:")
        for url in (self.url, self.jwks_url):
            if url is not None and not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} must be an http:// or https:// URL")
        return self

    @property
    def base_url(self) -> str:
        return (self.url or "").rstrip("/")

    @property
    def effective_jwks_url(self) -> str | None:
        if self.jwks_url:
            return self.jwks_url
        return f"{self.base_url}/auth/v1/.well-known/jwks.json" if self.provider == "supabase" else None

    @property
    def effective_issuer(self) -> str | None:
        if self.issuer is not None:
            return self.issuer
        return f"{self.base_url}/auth/v1" if self.provider == "supabase" else None

    @property
    def effective_audience(self) -> str | None:
        if self.audience is not None:
            return self.audience
        return "authenticated" if self.provider == "supabase" else None

    @property
    def remote(self) -> bool:
        """Whether unknown tokens may be validated by the provider."""
        return self.provider == "supabase" and self.verify != "jwt"


@dataclass(frozen=True, slots=True)
class SessionUser:
    """The verified caller: ``scope["state"]["user"]`` in-app, ``request.state.user`` in Starlette/FastAPI."""

    id: str
    role: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)
    """Only the claims the policy asks for (``claims:`` and those its ``headers:`` use)."""
