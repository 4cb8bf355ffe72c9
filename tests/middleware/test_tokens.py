"""Token rules as tables: JWT parsing, key selection, signatures, claims, and where tokens come from."""

from __future__ import annotations

import base64
import json
import time
from typing import Any
from urllib.parse import quote

import pytest

from edgeway.middleware.tokens import (
    NeedsKey,
    TokenError,
    check_claims,
    key_from_jwk,
    parse_jwt,
    request_token,
    secret_key,
    select_key,
    supabase_cookie_name,
    verify_signature,
)
from tests.auth_server import HS_SECRET, KEYS, b64url, sign

NOW = 1_800_000_000.0
ISS = "https://ref.supabase.co/auth/v1"
ES1 = key_from_jwk(KEYS.ec_jwk(KEYS.es, "es1"))
RS1 = key_from_jwk(KEYS.rsa_jwk("rs1"))
HS = secret_key(HS_SECRET)
ALL_KEYS = tuple(k for k in (ES1, RS1, HS) if k is not None)


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "u1", "aud": "authenticated", "iss": ISS, "iat": NOW - 10, "exp": NOW + 3600}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def segment(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value).encode())


# -- parsing -----------------------------------------------------------------------------------------------

MALFORMED = [
    ("one segment", "abc", "malformed"),
    ("two segments", "abc.def", "malformed"),
    ("four segments", "a.b.c.d", "malformed"),
    ("empty header", ".e30.sig", "malformed"),
    ("bad base64", "!!!.e30.c2ln", "malformed"),
    ("header not JSON", f"{b64url(b'not json')}.e30.c2ln", "malformed"),
    ("claims a list", f"{segment({'alg': 'ES256'})}.{b64url(b'[1]')}.c2ln", "malformed"),
    ("alg none", f"{segment({'alg': 'none'})}.{segment(claims())}.", "unsupported_algorithm"),
    ("alg NONE", f"{segment({'alg': 'NONE'})}.{segment(claims())}.", "unsupported_algorithm"),
    ("alg missing", f"{segment({'typ': 'JWT'})}.{segment(claims())}.c2ln", "unsupported_algorithm"),
    ("jku elsewhere", sign(claims(), header={"jku": "https://evil.test/jwks.json"}), "untrusted_key"),
    ("x5u elsewhere", sign(claims(), header={"x5u": "https://evil.test/cert.pem"}), "untrusted_key"),
    ("embedded jwk", sign(claims(), header={"jwk": KEYS.ec_jwk(KEYS.es_later, "x")}), "untrusted_key"),
    ("x5c chain", sign(claims(), header={"x5c": ["MIIB"]}), "untrusted_key"),
    ("crit extension", sign(claims(), header={"crit": ["exp"]}), "malformed"),
    ("oversized", "a" * 20_000 + ".b.c", "malformed"),
]


@pytest.mark.parametrize(("case", "token", "reason"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_and_unsafe_tokens_are_refused(case: str, token: str, reason: str) -> None:
    with pytest.raises(TokenError) as caught:
        parse_jwt(token)
    assert caught.value.reason == reason


# -- keys and signatures --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("alg", "kid"), [("ES256", "es1"), ("RS256", "rs1"), ("HS256", None)])
def test_each_algorithm_verifies_with_its_own_key(alg: str, kid: str | None) -> None:
    jwt = parse_jwt(sign(claims(), alg, kid=kid))
    key = select_key(jwt, ALL_KEYS)
    assert key.alg == alg
    verify_signature(jwt, key)


def test_tampered_claims_fail_the_signature() -> None:
    header, _, signature = sign(claims(), "ES256").split(".")
    forged = f"{header}.{segment(claims(sub='admin'))}.{signature}"
    jwt = parse_jwt(forged)
    with pytest.raises(TokenError) as caught:
        verify_signature(jwt, select_key(jwt, ALL_KEYS))
    assert caught.value.reason == "invalid_signature"


def test_a_public_key_never_verifies_an_hmac_token() -> None:
    """Algorithm confusion: an HS256 token 'signed' with the RSA public key must not verify with that key."""
    assert RS1 is not None
    jwt = parse_jwt(sign(claims(), "HS256", kid="rs1"))
    with pytest.raises(NeedsKey):
        select_key(jwt, (RS1,))
    with pytest.raises(TokenError) as caught:
        verify_signature(jwt, RS1)
    assert caught.value.reason == "unsupported_algorithm"


KEY_SELECTION = [
    ("unknown kid", sign(claims(), "ES256", kid="nope"), ALL_KEYS, NeedsKey),
    ("HS256 without a secret", sign(claims(), "HS256", kid=None), (ES1, RS1), NeedsKey),
    ("legacy HS256 with a kid", sign(claims(), "HS256", kid="legacy"), (HS,), None),
    ("ES256 without kid, one key", sign(claims(), "ES256", kid=None), (ES1,), None),
    ("odd algorithm", f"{segment({'alg': 'PS512', 'kid': 'es1'})}.{segment(claims())}.c2ln", ALL_KEYS, TokenError),
]


@pytest.mark.parametrize(("case", "token", "keys", "error"), KEY_SELECTION, ids=[k[0] for k in KEY_SELECTION])
def test_key_selection(case: str, token: str, keys: tuple[Any, ...], error: type[Exception] | None) -> None:
    jwt = parse_jwt(token)
    if error is None:
        verify_signature(jwt, select_key(jwt, keys))
    else:
        with pytest.raises(error):
            select_key(jwt, keys)


JWKS_ENTRIES = [
    ("EC P-256", KEYS.ec_jwk(KEYS.es, "a"), "ES256"),
    ("RSA 2048", KEYS.rsa_jwk("b"), "RS256"),
    ("symmetric oct is never taken from a URL", {"kty": "oct", "k": "c2VjcmV0"}, None),
    ("encryption key", {**KEYS.ec_jwk(KEYS.es, "e"), "use": "enc"}, None),
    ("EC with a foreign alg", {**KEYS.ec_jwk(KEYS.es, "e"), "alg": "ES384"}, None),
    ("small RSA", {"kty": "RSA", "n": b64url((2**1023 + 1).to_bytes(128, "big")), "e": "AQAB"}, None),
    ("EC missing y", {"kty": "EC", "crv": "P-256", "x": "AAAA"}, None),
]


@pytest.mark.parametrize(("case", "jwk", "alg"), JWKS_ENTRIES, ids=[j[0] for j in JWKS_ENTRIES])
def test_jwks_entries(case: str, jwk: dict[str, Any], alg: str | None) -> None:
    key = key_from_jwk(jwk)
    assert (key.alg if key else None) == alg


# -- claims ---------------------------------------------------------------------------------------------------

CLAIMS = [
    ("valid", claims(), None),
    ("expired", claims(exp=NOW - 60), "expired"),
    ("expired within the leeway", claims(exp=NOW - 5), None),
    ("no exp", claims(exp=None), "malformed"),
    ("exp not a number", claims(exp="soon"), "malformed"),
    ("exp a boolean", claims(exp=True), "malformed"),
    ("not yet valid", claims(nbf=NOW + 60), "not_yet_valid"),
    ("nbf within the leeway", claims(nbf=NOW + 5), None),
    ("issued in the future", claims(iat=NOW + 600), "not_yet_valid"),
    ("wrong audience", claims(aud="anon"), "invalid_audience"),
    ("audience in a list", claims(aud=["other", "authenticated"]), None),
    ("no audience", claims(aud=None), "invalid_audience"),
    ("wrong issuer", claims(iss="https://other.supabase.co/auth/v1"), "invalid_issuer"),
]


@pytest.mark.parametrize(("case", "values", "reason"), CLAIMS, ids=[c[0] for c in CLAIMS])
def test_claims(case: str, values: dict[str, Any], reason: str | None) -> None:
    if reason is None:
        check_claims(values, NOW, audience="authenticated", issuer=ISS)
    else:
        with pytest.raises(TokenError) as caught:
            check_claims(values, NOW, audience="authenticated", issuer=ISS)
        assert caught.value.reason == reason


# -- token sources ------------------------------------------------------------------------------------------------

COOKIE = "sb-ref-auth-token"
SESSION = json.dumps({"access_token": "tok-123", "refresh_token": "r", "expires_at": int(time.time()) + 60})
B64 = "base64-" + base64.urlsafe_b64encode(SESSION.encode()).decode().rstrip("=")


def chunked(value: str, size: int) -> str:
    parts = [value[i:i + size] for i in range(0, len(value), size)]
    return "; ".join(f"{COOKIE}.{i}={part}" for i, part in enumerate(parts))


SOURCES: list[tuple[str, str | None, list[str], str | type[Exception] | None]] = [
    ("bearer", "Bearer tok-abc", [], "tok-abc"),
    ("bearer, any case", "bearer tok-abc", [], "tok-abc"),
    ("basic auth is not a session", "Basic dXNlcjpwYXNz", [], None),
    ("nothing", None, [], None),
    ("plain cookie (URL-encoded JSON)", None, [f"{COOKIE}={quote(SESSION)}"], "tok-123"),
    ("base64- cookie", None, [f"other=1; {COOKIE}={B64}"], "tok-123"),
    ("chunked cookie", None, [chunked(quote(SESSION), 20)], "tok-123"),
    ("chunked base64- cookie, chunks out of order", None,
     ["; ".join(reversed(chunked(B64, 30).split("; ")))], "tok-123"),
    ("chunks without .0", None, [f"{COOKIE}.1=abc"], None),
    ("legacy array form", None, [f"{COOKIE}={quote(json.dumps(['tok-9', 'r']))}"], "tok-9"),
    ("bearer wins over the cookie", "Bearer tok-header", [f"{COOKIE}={B64}"], "tok-header"),
    ("another project's cookie", None, [f"sb-other-auth-token={B64}"], None),
    ("cookie not JSON", None, [f"{COOKIE}=hello"], TokenError),
    ("base64- not base64", None, [f"{COOKIE}=base64-!!!"], TokenError),
    ("no access_token", None, [f"{COOKIE}={quote(json.dumps({'user': {}}))}"], TokenError),
    ("oversized cookie", None, [f"{COOKIE}={'a' * 20_000}"], TokenError),
    ("too many chunks", None, [chunked("a" * 900, 100)], TokenError),
    ("oversized bearer", "Bearer " + "a" * 20_000, [], TokenError),
]


@pytest.mark.parametrize(("case", "authorization", "cookies", "expected"), SOURCES, ids=[s[0] for s in SOURCES])
def test_token_sources(case: str, authorization: str | None, cookies: list[str],
                       expected: str | type[Exception] | None) -> None:
    if isinstance(expected, type):
        with pytest.raises(expected):
            request_token(authorization, cookies, COOKIE)
    else:
        assert request_token(authorization, cookies, COOKIE) == expected


def test_supabase_cookie_name_follows_the_project_ref() -> None:
    assert supabase_cookie_name("https://abcdefgh.supabase.co") == "sb-abcdefgh-auth-token"
    assert supabase_cookie_name("http://127.0.0.1:54321") == "sb-127-auth-token"
