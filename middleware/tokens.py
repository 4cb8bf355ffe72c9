"""Session tokens as pure functions: where a token comes from, and whether a JWT holds.

No I/O here: the session policy (:mod:`edgeway.middleware.session`) fetches
keys and asks the provider; these functions only parse and decide, so every
rule has a table-driven test.

- :func:`request_token`: ``Authorization: Bearer`` first, else Supabase's SSR
  auth cookie (plain, chunked ``.0 .1 ...``, ``base64-`` prefixed JSON).
- :func:`parse_jwt`: three base64url segments, JSON header and claims; ``alg:
  none`` and key references in the header (``jku``, ``x5u``, ``jwk``, ``x5c``)
  are refused outright: a key is only ever taken from the configuration or the
  configured JWKS URL, never from the token.
- :func:`verify_signature`: the algorithm is bound to the key's type (an EC
  P-256 key verifies ES256 only, RSA RS256 only, a shared secret HS256 only),
  so a token cannot pick a weaker algorithm or turn a public key into an HMAC
  secret.
- :func:`check_claims`: ``exp`` (required), ``nbf``, ``aud``, ``iss`` with a
  small leeway for clock skew.

Errors are :class:`TokenError` with a short ``reason`` that the 401 body
carries (``expired``, ``invalid_signature``, ...).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

MAX_TOKEN_BYTES = 16_384
"""Longer bearer tokens or session cookies are refused (Supabase's are ~1-3 KB)."""
MAX_COOKIE_CHUNKS = 8
"""Chunks of a split auth cookie read at most (supabase/ssr splits at ~3 KB per chunk)."""
KEY_REFERENCE_HEADERS = ("jku", "x5u", "jwk", "x5c")
"""Header parameters naming a key elsewhere: a token carrying one is refused, never followed."""


class TokenError(Exception):
    """A token that cannot be accepted; ``reason`` is the short code the 401 body carries."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class NeedsKey(Exception):
    """A well-formed JWT whose key is not available locally (unknown ``kid``, HS256 without a secret)."""


@dataclass(frozen=True, slots=True)
class Jwt:
    """A parsed (not yet verified) JWT."""

    header: Mapping[str, Any]
    claims: Mapping[str, Any]
    signing_input: bytes
    signature: bytes

    @property
    def alg(self) -> str:
        return str(self.header.get("alg", ""))

    @property
    def kid(self) -> str | None:
        kid = self.header.get("kid")
        return kid if isinstance(kid, str) else None


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A key the configuration trusts, with the one algorithm it may verify."""

    alg: str
    kid: str | None
    key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | bytes


def token_digest(token: str) -> str:
    """The token's identity for caches, logs and revocations: never the token itself."""
    return hashlib.blake2b(token.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def _b64url(segment: str | bytes) -> bytes:
    raw = segment.encode("ascii") if isinstance(segment, str) else segment
    try:
        return base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("malformed", "a token segment is not base64url") from None


def looks_like_jwt(token: str) -> bool:
    """Three dot-separated segments: worth parsing as a JWT (anything else is opaque)."""
    return token.count(".") == 2


def parse_jwt(token: str) -> Jwt:
    """Split and decode a compact JWS; raises :class:`TokenError` for anything malformed or unsafe."""
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenError("malformed", "the token is too large")
    parts = token.split(".")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise TokenError("malformed", "a JWT has three dot-separated segments")
    try:
        header = json.loads(_b64url(parts[0]))
        claims = json.loads(_b64url(parts[1]))
    except (ValueError, UnicodeDecodeError):
        raise TokenError("malformed", "the token's header or claims are not JSON") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise TokenError("malformed", "the token's header and claims must be JSON objects")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg.lower() == "none" or not alg:
        raise TokenError("unsupported_algorithm", "unsigned tokens (alg: none) are never accepted")
    referenced = [name for name in KEY_REFERENCE_HEADERS if name in header]
    if referenced:
        raise TokenError("untrusted_key", f"the token names its own key ({', '.join(referenced)}); refused")
    if header.get("crit") is not None:
        raise TokenError("malformed", "critical header extensions are not supported")
    return Jwt(header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), _b64url(parts[2]))


def key_from_jwk(jwk: Mapping[str, Any]) -> VerificationKey | None:
    """A public key from one JWKS entry, or None when it is not one we verify with.

    Symmetric (``oct``) entries are ignored: a shared secret comes only from
    ``jwt_secret``, never from a URL.
    """
    kid = jwk.get("kid") if isinstance(jwk.get("kid"), str) else None
    use = jwk.get("use")
    if use not in (None, "sig"):
        return None
    try:
        if jwk.get("kty") == "EC" and jwk.get("crv") == "P-256" and jwk.get("alg") in (None, "ES256"):
            x = int.from_bytes(_b64url(str(jwk["x"])), "big")
            y = int.from_bytes(_b64url(str(jwk["y"])), "big")
            return VerificationKey("ES256", kid, ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key())
        if jwk.get("kty") == "RSA" and jwk.get("alg") in (None, "RS256"):
            n = int.from_bytes(_b64url(str(jwk["n"])), "big")
            e = int.from_bytes(_b64url(str(jwk["e"])), "big")
            public = rsa.RSAPublicNumbers(e, n).public_key()
            if public.key_size < 2048:
                return None
            return VerificationKey("RS256", kid, public)
    except (KeyError, ValueError, TokenError):
        return None
    return None


def secret_key(secret: str) -> VerificationKey:
    """The HS256 key for a configured ``jwt_secret``."""
    return VerificationKey("HS256", None, secret.encode())


def select_key(jwt: Jwt, keys: Sequence[VerificationKey]) -> VerificationKey:
    """The configured key this token must verify with; :class:`NeedsKey` when none is known.

    A token whose algorithm no key of ours uses is refused outright (never
    treated as "unknown key"), so an attacker cannot steer it to the provider
    path by picking an odd algorithm.
    """
    if jwt.alg not in ("ES256", "RS256", "HS256"):
        raise TokenError("unsupported_algorithm", f"algorithm {jwt.alg} is not accepted")
    candidates = [key for key in keys if key.alg == jwt.alg]
    kid = jwt.kid
    if kid is not None:
        for key in candidates:
            if key.kid == kid:
                return key
        # a shared secret has no kid: legacy Supabase HS256 tokens carry one anyway
        for key in candidates:
            if key.kid is None and key.alg == "HS256":
                return key
        raise NeedsKey(f"no key with kid {kid!r}")
    if len(candidates) == 1:
        return candidates[0]
    raise NeedsKey(f"no single {jwt.alg} key for a token without kid")


def verify_signature(jwt: Jwt, key: VerificationKey) -> None:
    """Raise :class:`TokenError` unless ``key`` signed ``jwt`` with the key's own algorithm."""
    if jwt.alg != key.alg:
        raise TokenError("unsupported_algorithm", f"a {key.alg} key cannot verify {jwt.alg}")
    try:
        if isinstance(key.key, bytes):
            mac = hmac.HMAC(key.key, hashes.SHA256())
            mac.update(jwt.signing_input)
            mac.verify(jwt.signature)  # constant-time comparison
        elif isinstance(key.key, ec.EllipticCurvePublicKey):
            if len(jwt.signature) != 64:
                raise InvalidSignature
            r = int.from_bytes(jwt.signature[:32], "big")
            s = int.from_bytes(jwt.signature[32:], "big")
            key.key.verify(encode_dss_signature(r, s), jwt.signing_input, ec.ECDSA(hashes.SHA256()))
        else:
            key.key.verify(jwt.signature, jwt.signing_input, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise TokenError("invalid_signature", "the token's signature does not verify") from None


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenError("malformed", f"claim {name} must be a number")
    return float(value)


def check_claims(claims: Mapping[str, Any], now: float, *, audience: str | None, issuer: str | None,
                 leeway: float = 10.0) -> None:
    """Raise :class:`TokenError` unless the claims hold at ``now`` (seconds since the epoch)."""
    exp = _number(claims, "exp")
    if exp is None:
        raise TokenError("malformed", "the token has no exp claim")
    if now > exp + leeway:
        raise TokenError("expired", "the token has expired")
    nbf = _number(claims, "nbf")
    if nbf is not None and now + leeway < nbf:
        raise TokenError("not_yet_valid", "the token is not valid yet (nbf)")
    iat = _number(claims, "iat")
    if iat is not None and now + leeway < iat:
        raise TokenError("not_yet_valid", "the token was issued in the future (iat)")
    if audience is not None:
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if audience not in audiences:
            raise TokenError("invalid_audience", f"the token is not meant for audience {audience!r}")
    if issuer is not None and claims.get("iss") != issuer:
        raise TokenError("invalid_issuer", "the token comes from another issuer")


def unverified_claims(token: str) -> Mapping[str, Any]:
    """The claims of a JWT without checking anything: only for a token the provider has vouched for."""
    if not looks_like_jwt(token):
        return {}
    try:
        return parse_jwt(token).claims
    except TokenError:
        return {}


# -- where tokens come from ---------------------------------------------------------------------


def bearer(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value, or None."""
    if value is None or value[:7].lower() != "bearer ":
        return None
    token = value[7:].strip()
    return token or None


def parse_cookies(values: Sequence[str]) -> dict[str, str]:
    """``Cookie`` header values as name -> raw value (first occurrence wins, as browsers send the most specific)."""
    cookies: dict[str, str] = {}
    for header in values:
        for pair in header.split(";"):
            name, sep, value = pair.strip().partition("=")
            if sep and name and name not in cookies:
                cookies[name] = value.strip().strip('"')
    return cookies


def cookie_session(cookies: Mapping[str, str], name: str) -> str | None:
    """The joined value of the auth cookie ``name``, plain or in chunks ``name.0``, ``name.1``, ..."""
    if name in cookies:
        value = cookies[name]
    else:
        chunks = []
        for index in range(MAX_COOKIE_CHUNKS + 1):
            chunk = cookies.get(f"{name}.{index}")
            if chunk is None:
                break
            if index == MAX_COOKIE_CHUNKS:
                raise TokenError("oversized", f"the session cookie has more than {MAX_COOKIE_CHUNKS} chunks")
            chunks.append(chunk)
        if not chunks:
            return None
        value = "".join(chunks)
    if len(value) > MAX_TOKEN_BYTES:
        raise TokenError("oversized", "the session cookie is too large")
    return value


def cookie_access_token(value: str) -> str:
    """The ``access_token`` held in a Supabase auth cookie value (JSON, maybe ``base64-`` prefixed)."""
    text = unquote(value)
    if text.startswith("base64-"):
        try:
            text = _b64url(text.removeprefix("base64-")).decode("utf-8")
        except UnicodeDecodeError:
            raise TokenError("malformed", "the session cookie is not base64url JSON") from None
    try:
        session = json.loads(text)
    except ValueError:
        raise TokenError("malformed", "the session cookie is not JSON") from None
    # older auth-helpers stored [access_token, refresh_token, ...]
    token = session.get("access_token") if isinstance(session, dict) else (
        session[0] if isinstance(session, list) and session else None)
    if not isinstance(token, str) or not token:
        raise TokenError("malformed", "the session cookie holds no access_token")
    return token


def request_token(authorization: str | None, cookie_headers: Sequence[str], cookie_name: str | None) -> str | None:
    """The request's session token: the Bearer header wins over the cookie; None when it has neither."""
    token = bearer_token(authorization)
    if token is not None:
        return token
    return cookie_token(cookie_headers, cookie_name)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` value, refused when oversized; None without one."""
    token = bearer(authorization)
    if token is not None and len(token) > MAX_TOKEN_BYTES:
        raise TokenError("oversized", "the bearer token is too large")
    return token


def cookie_token(cookie_headers: Sequence[str], cookie_name: str | None) -> str | None:
    """The access token in the auth cookie ``cookie_name`` (Supabase SSR), or None."""
    if cookie_name is None or not cookie_headers:
        return None
    value = cookie_session(parse_cookies(cookie_headers), cookie_name)
    return None if value is None else cookie_access_token(value)


def supabase_cookie_name(url: str) -> str:
    """``sb-<project-ref>-auth-token``, the ref being the URL's first host label (as supabase-js names it)."""
    host = url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    return f"sb-{host.split('.', 1)[0]}-auth-token"


def claim(claims: Mapping[str, Any], path: str) -> Any:
    """A dotted claim path (``app_metadata.tenant``) or None."""
    value: Any = claims
    for step in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(step)
    return value
