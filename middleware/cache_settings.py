"""The ``cache:`` block of a route: validated once into a frozen model (defaults documented per field)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from .cache_key import check_json_path, check_key_part
from .cache_rules import DEFAULT_STATUSES, Rules
from .units import Duration, Size, validate_duration

_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def _ttl(value: object, info: ValidationInfo) -> object:
    return value if value == "origin" else validate_duration(value, info)


Ttl = Annotated[
    float | Literal["origin"],
    BeforeValidator(_ttl),
    WithJsonSchema({"type": ["string", "number"], "pattern": r"^(origin|\d+(\.\d+)?(ms|s|m|h|d)?)$",
                    "description": "a duration such as 1h, or origin"}),
]


class CacheSettings(BaseModel):
    """A route's response cache. Every field documents its default and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttl: Ttl = Field(
        300.0, description="How long a stored response stays fresh (Kong's default 300s), or `origin`: "
        "freshness from the upstream's s-maxage/max-age/Expires only.")
    default_ttl: Duration | None = Field(
        None, description="With ttl: origin, the freshness of responses stating none (absent: not stored).")
    key: tuple[str, ...] = Field(
        ("method", "path", "query"),
        description="Parts hashed into the key: method, path, query, body, user, header:NAME.")
    max_body: Size = Field(2_000_000, description="Larger responses pass through, streaming, not stored.")
    max_request_body: Size = Field(
        1_000_000, description="A body-keyed request larger than this bypasses the cache (read at most once).")
    ignore_query: tuple[str, ...] = Field((), description="Query parameters left out of the key (utm_*).")
    body_include: tuple[str, ...] = Field((), description="JSON paths the body key keeps (default: all).")
    body_exclude: tuple[str, ...] = Field((), description="JSON paths the body key drops (stream, user, ids).")
    statuses: tuple[int, ...] = Field(DEFAULT_STATUSES, description="Statuses that may be stored.")
    respect_origin: bool = Field(
        True, description="A shorter s-maxage/max-age from the upstream wins over ttl; its stale-* extend ours.")
    cookies: Literal["bypass", "ignore"] = Field(
        "bypass", description="bypass: requests with a Cookie skip the cache unless keyed by user; "
        "ignore: for upstreams that never personalise on cookies.")
    stale_while_revalidate: Duration = Field(
        0.0, description="Serve a stale entry at once while one request (across instances) refreshes it.")
    stale_if_error: Duration = Field(
        0.0, description="Serve a stale entry when the upstream fails (502/504, timeout) or its breaker is open.")
    lock_timeout: Duration = Field(
        5.0, description="How long concurrent misses wait for the one filling request (NGINX's 5s).")
    lock_age: Duration = Field(
        5.0, description="TTL of the fill lock, so a crashed filler never blocks a key (NGINX's 5s).")
    tags: tuple[str, ...] = Field((), description="Purge tags of every entry of this route.")
    tag_header: str | None = Field(None, description="Response header listing more purge tags (Cache-Tag).")
    cdn_ttl: Duration | None = Field(
        None, description="Rewrite Cache-Control (s-maxage) and CDN-Cache-Control for a CDN in front.")

    @field_validator("key", mode="before")
    @classmethod
    def _key(cls, value: object) -> tuple[str, ...]:
        parts = [value] if isinstance(value, str) else value
        if not isinstance(parts, list | tuple) or not parts:
            raise ValueError(f"expected a list of key parts such as [method, path, query]; got {value!r}")
        return tuple(check_key_part(str(part)) for part in parts)

    @field_validator("body_include", "body_exclude")
    @classmethod
    def _paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_json_path(path) for path in value)

    @field_validator("tag_header")
    @classmethod
    def _header_name(cls, value: str | None) -> str | None:
        if value is not None and not _HEADER_NAME.match(value):
            raise ValueError(f"not a header name: {value!r}")
        return value

    @field_validator("max_body", "max_request_body")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1 byte")
        return value

    @field_validator("statuses")
    @classmethod
    def _statuses(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        bad = [status for status in value if not 200 <= status <= 599]
        if bad:
            raise ValueError(f"not HTTP statuses a response may carry: {bad}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CacheSettings:
        if (self.body_include or self.body_exclude) and "body" not in self.key:
            raise ValueError("body_include/body_exclude need `body` in key")
        if self.default_ttl is not None and self.ttl != "origin":
            raise ValueError("default_ttl applies to ttl: origin only")
        return self

    @property
    def methods(self) -> tuple[str, ...]:
        """Methods whose answers are stored: GET and HEAD, and POST when the key includes the body."""
        return ("GET", "HEAD", "POST") if "body" in self.key else ("GET", "HEAD")

    def rules(self) -> Rules:
        """The pure storability/freshness rules (:mod:`edgeway.middleware.cache_rules`)."""
        return Rules(
            ttl=None if self.ttl == "origin" else float(self.ttl),
            default_ttl=self.default_ttl,
            respect_origin=self.respect_origin,
            statuses=frozenset(self.statuses),
            max_body=self.max_body,
            stale_while_revalidate=self.stale_while_revalidate,
            stale_if_error=self.stale_if_error,
        )
