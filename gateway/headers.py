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
# the body is then sent upstream at once, so the upstream has nothing to expect. nginx drops it too.
# ``Content-Length`` is set again by the proxy from the body it sends (normalised: "5 " is 5)
_REQUEST_DROP = HOP_BY_HOP | {"expect", "host", "content-length"}
# forwarding fields: re-added with this hop appended; from an untrusted peer the client's own are dropped
_DROP_TRUSTED = frozenset(name.encode() for name in _REQUEST_DROP | {"x-forwarded-for", "forwarded"})
_DROP_UNTRUSTED = frozenset(name.encode() for name in _REQUEST_DROP | _FORWARDING)
_HOP_BY_HOP_BYTES = frozenset(name.encode() for name in HOP_BY_HOP)
# control characters h11 lets through in field values: header bytes go upstream as they came, and a CR or
# LF there would end the field (or the head) early
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 3986 host (IP-literal, or reg-name which covers IPv4) with an optional port; no userinfo, no spaces,
# no '/', '?', '#', '"': anything else could smuggle data into X-Forwarded-Host and Forwarded
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?")
# Host values that passed _HOST: a client's few hosts are checked once (bounded; past it, every time)
_VALID_HOSTS: set[bytes] = set()
_VALID_HOSTS_KEPT = 1024
# RFC 9110 token characters: a Forwarded parameter value that is not a token must be a quoted-string
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def connection_named(values: Iterable[str]) -> set[str]:
    """Field names listed in ``Connection`` values (lower case)."""
    return {token.strip().lower() for value in values for token in value.split(",") if token.strip()}


def forwarded_value(value: str, *, quote: bool = False) -> str:
    """An RFC 7239 parameter value: a token as is (unless ``quote``), anything else as a quoted-string with
    ``"`` and ``\\`` escaped, so no value can close its quotes and add parameters or elements of its own."""
    if not quote and _TOKEN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _for_node(address: str) -> str:
    return forwarded_value(f"[{address}]" if ":" in address else address)


def upstream_request_headers(ctx: RequestContext, *, drop_underscores: bool = True) -> tuple[
        list[tuple[bytes, bytes]], int]:
    """Headers to send upstream, as the client's bytes, and how many names with ``_`` were dropped.

    Client headers minus hop-by-hop/identity, plus forwarding fields. Names
    with ``_`` are dropped when ``drop_underscores``: CGI/WSGI upstreams map
    ``X_Edgeway_User`` and ``X-Edgeway-User`` to the same variable.

    ``Host`` is dropped: the upstream is addressed by its own name (like
    nginx's ``proxy_set_header Host $proxy_host``); the client's host goes in
    ``X-Forwarded-Host`` and ``Forwarded``. One pass over the raw header list
    (ASGI names are lower case): this runs for every proxied request. Values
    are never decoded, so any byte a client may send (obs-text too) goes on unchanged.
    """
    peer = ctx.peer
    trusted = peer in ctx.trusted
    drop = _DROP_TRUSTED if trusted else _DROP_UNTRUSTED
    out: list[tuple[bytes, bytes]] = []
    host = ""
    connection: list[bytes] = []
    prior_xff: list[bytes] = []
    prior_forwarded: list[bytes] = []
    has_proto = has_host = False
    dropped = 0
    for pair in ctx.scope["headers"]:
        name = pair[0]
        if drop_underscores and b"_" in name:
            dropped += 1
            continue
        if name in drop:
            if name == b"host":
                host = host or pair[1].decode("latin-1")
            elif name == b"connection":
                connection.append(pair[1])
            elif name == b"x-forwarded-for":
                prior_xff.append(pair[1])
            elif name == b"forwarded":
                prior_forwarded.append(pair[1])
            continue
        if name.startswith(b"x-edgeway-"):
            continue
        if trusted:
            has_proto = has_proto or name == b"x-forwarded-proto"
            has_host = has_host or name == b"x-forwarded-host"
        out.append(pair)
    if connection:
        named = {name.encode("latin-1") for name in connection_named(value.decode("latin-1") for value in connection)}
        out = [pair for pair in out if pair[0] not in named]
    out.extend(ctx.identity)  # the session policy's own X-Edgeway-* fields
    proto = ctx.scope.get("scheme", "http")
    address = peer.encode("latin-1")
    xff = b", ".join(prior_xff) if trusted else b""
    out.append((b"x-forwarded-for", xff + b", " + address if xff else address))
    if not has_proto:
        out.append((b"x-forwarded-proto", proto.encode("latin-1")))
    if host and not has_host:
        out.append((b"x-forwarded-host", host.encode("latin-1")))
    element = f"for={_for_node(peer)};proto={forwarded_value(proto)}" + (
        f";host={forwarded_value(host, quote=True)}" if host else "")
    prior = b", ".join(prior_forwarded) if trusted else b""
    out.append((b"forwarded", prior + b", " + element.encode("latin-1") if prior else element.encode("latin-1")))
    return out, dropped


def request_body_length(scope: Scope) -> int | None:
    """The request body's length: 0 for none, the ``Content-Length`` (validated by :func:`request_problem`),
    or None when it is chunked (``Transfer-Encoding``; never both, see :func:`request_problem`)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value.strip(b" \t"))
        if name == b"transfer-encoding":
            return None
    return 0


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


def request_problem(scope: Scope, *, reject_underscores: bool = False) -> str | None:
    """Why this request must be refused with 400 before anything else happens, or None.

    - an absolute-form target (``GET http://other-host/x``): the upstream comes
      only from the policy, never from the request (no open proxy, no SSRF);
    - ``Content-Length`` together with ``Transfer-Encoding`` (request smuggling);
    - a missing (HTTP/1.1), repeated or malformed ``Host`` (RFC 3986 host and port only);
    - a ``Content-Length`` that is not one decimal number (whitespace around it is fine);
    - header names with ``_`` when ``reject_underscores``;
    - control characters in a field value (h11 accepts them; they cannot be forwarded);
    - ``.``/``..`` path segments, which would let ``/public/../admin`` match a
      different route than the one the upstream serves.
    """
    path: str = scope["path"]
    raw_path: bytes | None = scope.get("raw_path")
    if path[:1] != "/" or (raw_path is not None and raw_path[:1] != b"/"):
        return "absolute-form or malformed request target: send a path such as /api/x"
    hosts = 0
    host = b""
    lengths: set[bytes] = set()
    encoding = underscore = False
    values = []
    for name, value in scope["headers"]:
        values.append(value)
        if name == b"host":
            hosts += 1
            host = value
        elif name == b"content-length":
            lengths.add(value.strip(b" \t"))
        elif name == b"transfer-encoding":
            encoding = True
        elif b"_" in name:
            underscore = True
    if lengths and encoding:
        return "Content-Length together with Transfer-Encoding is not allowed"
    if lengths and (len(lengths) > 1 or not next(iter(lengths)).isdigit()):
        return "Content-Length must be one decimal number"
    if hosts > 1:
        return "more than one Host header"
    if not hosts and scope.get("http_version") == "1.1":
        return "missing Host header"
    if hosts and host not in _VALID_HOSTS:
        if not _HOST.fullmatch(host):
            return "invalid Host header: expected host[:port] (a name, an IPv4 address or an [IPv6] literal)"
        if len(_VALID_HOSTS) < _VALID_HOSTS_KEPT:
            _VALID_HOSTS.add(host)
    if underscore and reject_underscores:
        return "header names with '_' are not allowed (headers_with_underscores: reject)"
    if _CONTROL.search(b"\t".join(values)):
        return "control characters are not allowed in header values"
    if "/." in path and any(segment in (".", "..") for segment in path.split("/")):
        return "'.' and '..' path segments are not allowed"
    return None
