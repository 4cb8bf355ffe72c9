"""A local stand-in for Supabase Auth, served by uvicorn: ``/auth/v1/user`` and the JWKS, with tokens tests sign.

The server signs tokens with its own keys (ES256 and RS256 published in the
JWKS, an HS256 "legacy project" secret, and an ES256 key it only publishes when
told), remembers which tokens it issued (its sessions), and answers
``GET /auth/v1/user`` like Supabase: 200 with the user for a live session, 403
``bad_jwt`` otherwise. ``mode`` makes it fail the ways a real provider does
(``down``: 500, ``html``: a 200 that is not JSON, ``slow``: no answer in time).
Every request is counted by path, so tests can say "the provider was called once".
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections import Counter
from typing import Any

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.servers import UvicornThread, lifespan

ANON_KEY = "test-anon-key"
HS_SECRET = "legacy-jwt-secret-with-at-least-32-characters"
USER_PATH = "/auth/v1/user"
JWKS_PATH = "/auth/v1/.well-known/jwks.json"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_bytes(value: int, size: int) -> bytes:
    return value.to_bytes(size, "big")


class Keys:
    """The signing keys, created once per test session (RSA key generation is slow)."""

    def __init__(self) -> None:
        self.es = ec.generate_private_key(ec.SECP256R1())
        self.es_later = ec.generate_private_key(ec.SECP256R1())
        self.rs = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    @staticmethod
    def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, str]:
        numbers = key.public_key().public_numbers()
        return {"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
                "x": b64url(_int_bytes(numbers.x, 32)), "y": b64url(_int_bytes(numbers.y, 32))}

    def rsa_jwk(self, kid: str) -> dict[str, str]:
        numbers = self.rs.public_key().public_numbers()
        return {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
                "n": b64url(_int_bytes(numbers.n, 256)), "e": b64url(_int_bytes(numbers.e, 3))}


KEYS = Keys()


def sign(claims: dict[str, Any], alg: str = "ES256", *, kid: str | None = "es1", header: dict[str, Any] | None = None,
         key: ec.EllipticCurvePrivateKey | None = None) -> str:
    """A compact JWS the way an issuer makes it."""
    head: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        head["kid"] = kid
    head.update(header or {})
    signing_input = f"{b64url(json.dumps(head).encode())}.{b64url(json.dumps(claims).encode())}".encode()
    if alg == "ES256":
        der = (key or KEYS.es).sign(signing_input, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        signature = _int_bytes(r, 32) + _int_bytes(s, 32)
    elif alg == "RS256":
        signature = KEYS.rs.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    elif alg == "HS256":
        mac = hmac.HMAC(HS_SECRET.encode(), hashes.SHA256())
        mac.update(signing_input)
        signature = mac.finalize()
    else:  # "none" and anything else: unsigned
        signature = b""
    return f"{signing_input.decode()}.{b64url(signature)}"


class AuthServer:
    """The Supabase Auth stand-in; ``url`` is the project URL (``{url}/auth/v1/user``)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.mode = "ok"
        self.publish_later = False
        self.sessions: dict[str, dict[str, Any]] = {}
        self._thread = UvicornThread(self.app, interface="asgi3")

    @property
    def url(self) -> str:
        return self._thread.url

    @property
    def issuer(self) -> str:
        return f"{self.url}/auth/v1"

    def __enter__(self) -> AuthServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.stop()

    def claims(self, user: str, *, ttl: float = 3600, **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {"sub": user, "aud": "authenticated", "role": "authenticated", "iss": self.issuer,
                                  "iat": now, "exp": now + int(ttl), "session_id": str(uuid.uuid4()),
                                  "email": f"{user}@example.test"}
        claims.update(extra)
        return claims

    def issue(self, user: str, alg: str = "ES256", *, kid: str | None = None, **extra: Any) -> str:
        """A token for a live session of ``user`` (the server's /user accepts it)."""
        claims = self.claims(user, **extra)
        default_kid = {"ES256": "es1", "RS256": "rs1", "HS256": None}[alg]
        token = sign(claims, alg, kid=kid or default_kid,
                     key=KEYS.es_later if kid == "es-later" else None)
        self.sessions[token] = {"id": user, "aud": "authenticated", "role": "authenticated",
                                "email": claims["email"], "app_metadata": {"provider": "email", "tenant": "acme"}}
        return token

    def jwks(self) -> dict[str, Any]:
        keys = [KEYS.ec_jwk(KEYS.es, "es1"), KEYS.rsa_jwk("rs1"), {"kty": "oct", "k": b64url(b"not-for-us")}]
        if self.publish_later:
            keys.append(KEYS.ec_jwk(KEYS.es_later, "es-later"))
        return {"keys": keys}

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        path = scope["path"]
        self.calls[path] += 1
        headers = {name.decode(): value.decode() for name, value in scope["headers"]}
        if path == JWKS_PATH and self.mode != "down":
            await self._send(send, 200, self.jwks())
        elif path == USER_PATH:
            await self._user(send, headers)
        else:
            await self._send(send, 500 if self.mode == "down" else 404, {"message": "not here"})

    async def _user(self, send: Any, headers: dict[str, str]) -> None:
        if self.mode == "down":
            await self._send(send, 500, {"message": "internal error"})
            return
        if self.mode == "html":
            await self._send(send, 200, None, raw=b"<html>maintenance</html>")
            return
        if self.mode == "slow":
            await asyncio.sleep(5)
        token = headers.get("authorization", "").removeprefix("Bearer ")
        user = self.sessions.get(token)
        if headers.get("apikey") != ANON_KEY:
            await self._send(send, 401, {"message": "Invalid API key"})
        elif user is None:
            await self._send(send, 403, {"code": 403, "error_code": "bad_jwt", "msg": "invalid JWT"})
        else:
            await self._send(send, 200, user)

    @staticmethod
    async def _send(send: Any, status: int, payload: Any, raw: bytes | None = None) -> None:
        body = raw if raw is not None else json.dumps(payload).encode()
        kind = b"text/html" if raw is not None else b"application/json"
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
