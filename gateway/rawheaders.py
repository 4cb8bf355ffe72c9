"""Byte-exact request header values on the way upstream.

aiohttp writes header values as UTF-8 text, so a value that is not valid
UTF-8 (``caf\\xe9\\xff``, legal obs-text in HTTP/1.1) could only be sent
re-encoded (``caf\\xc3\\xa9\\xc3\\xbf``): the upstream would see other bytes than
the client sent. For such a request (rare: the proxy marks it), every value is
the client's bytes decoded as Latin-1 and is written back as Latin-1, byte for
byte. Every other request keeps aiohttp's own (C) serialiser.

This needs one hook into aiohttp: its module-level header serialiser is
wrapped once, and only headers of the marked type take the other path.
``tests/gateway/test_edge_holds.py`` proves the bytes on the upstream's socket,
so an aiohttp upgrade that moves the hook fails a test rather than silently
re-encoding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import http_writer
from multidict import CIMultiDict

# set by headers.upstream_request_headers on a request carrying non-UTF-8 values; a client's own X-Edgeway-*
# fields never get this far (they are dropped), so only the proxy can set it
RAW_MARK = "x-edgeway-raw-header-bytes"


class Latin1Headers(CIMultiDict[str]):
    """Header values that are the client's bytes decoded as Latin-1; serialised back as the same bytes."""


class ByteExactRequest(aiohttp.ClientRequest):
    """An aiohttp request whose headers switch to :class:`Latin1Headers` when the proxy marked them."""

    def update_headers(self, headers: Any) -> None:
        super().update_headers(headers)
        if RAW_MARK in self.headers:
            del self.headers[RAW_MARK]
            self.headers = Latin1Headers(self.headers)


_original: Callable[[str, Any], bytes] | None = None


def _serialize_headers(status_line: str, headers: Any) -> bytes:
    if type(headers) is Latin1Headers:
        lines = [status_line, *(f"{name}: {value}" for name, value in headers.items()), "", ""]
        return "\r\n".join(lines).encode("latin-1")
    assert _original is not None
    return _original(status_line, headers)


def install() -> None:
    """Wrap aiohttp's header serialiser (once per process)."""
    global _original
    if _original is None:
        _original = http_writer._serialize_headers
        http_writer._serialize_headers = _serialize_headers
