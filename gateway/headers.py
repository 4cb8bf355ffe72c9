"""Pure header logic for the proxy: hop-by-hop removal, forwarding fields, request sanity.

RFC 9110 §7.6.1: an intermediary drops the fields named in ``Connection``,
then ``Connection`` itself, ``Proxy-Connection``, ``Keep-Alive``, ``TE``,
``Transfer-Encoding`` and ``Upgrade``, in both directions. Forwarding fields
(``X-Forwarded-For/-Proto/-Host``, RFC 7239 ``Forwarded``) are appended to
when the peer is a trusted proxy and replaced otherwise, so a client can
never inject its own. ``X-Edgeway-*`` identity fields are only ever set by
Edgeway: a client's are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from edgeway.middleware.context import RequestContext, Scope

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "trailer",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
_FORWARDING = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip"})
# ``Expect: 100-continue`` is answered on the client's hop (the server sends 100 once the body is read);
# passed on, aiohttp would hold the body until the upstream sent its own 100, stalling (until the read
# timeout) on an upstream that just waits for the body, as RFC 9110 §10.1.1 allows. nginx drops it too.
_REQUEST_DROP = HOP_BY_HOP | {"expect", "host"}
# forwarding fields: re-added with this hop appended; from an untrusted peer the client's own are dropped
_DROP_TRUSTED = frozenset(name.encode() for name in _REQUEST_DROP | {"x-forwarded-for", "forwarded"})
_DROP_UNTRUSTED = frozenset(name.encode() for name in _REQUEST_DROP | _FORWARDING)
_HOP_BY_HOP_BYTES = frozenset(name.encode() for name in HOP_BY_HOP)
# control characters h11 lets through in field values but aiohttp refuses to send (ValueError -> a bare 500)
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _text(value: bytes) -> str:
    """A request field value for aiohttp, which encodes values as UTF-8: valid UTF-8 goes on byte-exact
    (Latin-1 decoding would double-encode it); other bytes can only go as Latin-1 (re-encoded)."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def connection_named(values: Iterable[str]) -> set[str]:
    """Field names listed in ``Connection`` values (lower case)."""
    return {token.strip().lower() for value in values for token in value.split(",") if token.strip()}


def _for_token(address: str) -> str:
    return f'"[{address}]"' if ":" in address else address


def upstream_request_headers(ctx: RequestContext) -> list[tuple[str, str]]:
    """Headers to send upstream: client headers minus hop-by-hop/identity, plus forwarding fields.

    ``Host`` is dropped: the upstream is addressed by its own name (like
    nginx's ``proxy_set_header Host $proxy_host``); the client's host goes in
    ``X-Forwarded-Host`` and ``Forwarded``. One pass over the raw header list
    (ASGI names are lower case): this runs for every proxied request.
    """
    peer = ctx.peer
    trusted = peer in ctx.trusted
    drop = _DROP_TRUSTED if trusted else _DROP_UNTRUSTED
    out: list[tuple[str, str]] = []
    host = ""
    connection: list[bytes] = []
    prior_xff: list[str] = []
    prior_forwarded: list[str] = []
    has_proto = has_host = False
    for name, value in ctx.scope["headers"]:
        if name in drop:
            if name == b"host":
                host = host or value.decode("latin-1")
            elif name == b"connection":
                connection.append(value)
            elif name == b"x-forwarded-for":
                prior_xff.append(value.decode("latin-1"))
            elif name == b"forwarded":
                prior_forwarded.append(value.decode("latin-1"))
            continue
        if name.startswith(b"x-edgeway-"):
            continue
        if trusted:
            has_proto = has_proto or name == b"x-forwarded-proto"
            has_host = has_host or name == b"x-forwarded-host"
        out.append((name.decode("latin-1"), _text(value)))
    if connection:
        named = connection_named(value.decode("latin-1") for value in connection)
        out = [pair for pair in out if pair[0] not in named]
    for name, value in ctx.identity:  # the session policy's own X-Edgeway-* fields
        out.append((name.decode("latin-1"), value.decode("latin-1")))
    proto = ctx.scope.get("scheme", "http")
    xff = ", ".join(prior_xff) if trusted else ""
    out.append(("x-forwarded-for", f"{xff}, {peer}" if xff else peer))
    if not has_proto:
        out.append(("x-forwarded-proto", proto))
    if host and not has_host:
        out.append(("x-forwarded-host", host))
    element = f"for={_for_token(peer)};proto={proto}" + (f';host="{host}"' if host else "")
    prior = ", ".join(prior_forwarded) if trusted else ""
    out.append(("forwarded", f"{prior}, {element}" if prior else element))
    return out


def request_has_body(scope: Scope) -> bool:
    """Whether a request body follows (``Content-Length`` > 0 or ``Transfer-Encoding``; never both, see
    :func:`request_problem`)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
        if name == b"transfer-encoding":
            return True
    return False


def downstream_response_headers(raw: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers minus hop-by-hop fields; repeated fields (Set-Cookie) kept.

    Names keep the upstream's case (the ASGI server lowercases them on the way out).
    """
    out = []
    named: list[bytes] = []
    for pair in raw:
        lower = pair[0].lower()
        if lower in _HOP_BY_HOP_BYTES:
            if lower == b"connection":
                named.extend(token.strip().lower() for token in pair[1].split(b","))
            continue
        out.append(pair)
    if named:
        out = [pair for pair in out if pair[0].lower() not in named]
    return out


def request_problem(scope: Scope) -> str | None:
    """Why this request must be refused with 400 before anything else happens, or None.

    - an absolute-form target (``GET http://other-host/x``): the upstream comes
      only from the policy, never from the request (no open proxy, no SSRF);
    - ``Content-Length`` together with ``Transfer-Encoding`` (request smuggling);
    - a missing (HTTP/1.1) or repeated ``Host``;
    - control characters in a field value (h11 accepts them; they cannot be forwarded);
    - ``.``/``..`` path segments, which would let ``/public/../admin`` match a
      different route than the one the upstream serves.
    """
    path: str = scope["path"]
    raw_path: bytes | None = scope.get("raw_path")
    if path[:1] != "/" or (raw_path is not None and raw_path[:1] != b"/"):
        return "absolute-form or malformed request target: send a path such as /api/x"
    hosts = 0
    length = encoding = False
    values = []
    for name, value in scope["headers"]:
        values.append(value)
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            length = True
        elif name == b"transfer-encoding":
            encoding = True
    if length and encoding:
        return "Content-Length together with Transfer-Encoding is not allowed"
    if hosts > 1:
        return "more than one Host header"
    if not hosts and scope.get("http_version") == "1.1":
        return "missing Host header"
    if _CONTROL.search(b"\t".join(values)):
        return "control characters are not allowed in header values"
    if "/." in path and any(segment in (".", "..") for segment in path.split("/")):
        return "'.' and '..' path segments are not allowed"
    return None
