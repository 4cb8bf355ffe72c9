"""A stored response as one binary store value: status, fields, body chunks, times, compressed when it pays.

Layout (network byte order), after one format byte (``0x10`` plain, ``0x11``
zlib-compressed rest)::

    kind u8 (0 response, 1 vary marker, 2 hit-for-miss) | status u16 | stored_at f64 | fresh f32 | swr f32 | sie f32
    field count u16, then per field: name length u16, value length u32, name, value
    chunk count u32, then per chunk: length u32, bytes

Chunk boundaries are kept so a stored event stream replays event by event.
A vary marker holds no body: its fields are the header names the response
varies on (values empty); the response itself is stored under the secondary
key. Anything that does not decode is treated as a miss, never an error.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

RESPONSE, VARY, PASS = 0, 1, 2
"""Entry kinds: a response; a vary marker; "hit-for-miss" (the last answer was not storable, so misses
go upstream at once instead of waiting for a fill that will not come)."""
_PLAIN, _ZLIB = 0x10, 0x11
_HEAD = struct.Struct("!BHdfff")
_FIELD = struct.Struct("!HI")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
COMPRESS_FROM = 256
"""Smaller entries are stored plain: compressing them saves too little to pay for the inflate on each hit."""


@dataclass(slots=True)
class Entry:
    """One stored response (or vary marker) with its freshness windows."""

    status: int
    headers: list[tuple[bytes, bytes]]
    chunks: list[bytes]
    stored_at: float
    fresh: float
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    kind: int = RESPONSE
    vary: tuple[str, ...] = field(default=())

    def age(self, now: float) -> float:
        return max(0.0, now - self.stored_at)

    def ttl(self, now: float) -> float:
        """Seconds of freshness left (negative once stale)."""
        return self.fresh - self.age(now)

    @property
    def size(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)


def encode(entry: Entry) -> bytes:
    """The entry as one store value."""
    headers = [(name.encode(), b"") for name in entry.vary] if entry.kind == VARY else entry.headers
    parts = [
        _HEAD.pack(entry.kind, entry.status, entry.stored_at, entry.fresh, entry.stale_while_revalidate,
                   entry.stale_if_error),
        _U16.pack(len(headers)),
    ]
    for name, value in headers:
        parts.append(_FIELD.pack(len(name), len(value)))
        parts.append(name)
        parts.append(value)
    parts.append(_U32.pack(len(entry.chunks)))
    for chunk in entry.chunks:
        parts.append(_U32.pack(len(chunk)))
        parts.append(chunk)
    payload = b"".join(parts)
    if len(payload) >= COMPRESS_FROM:
        packed = zlib.compress(payload, 1)
        if len(packed) < len(payload) * 0.9:
            return bytes((_ZLIB,)) + packed
    return bytes((_PLAIN,)) + payload


def decode(value: bytes | None) -> Entry | None:
    """The entry a store value holds, or None (absent, or not an entry this version can read)."""
    if not value:
        return None
    try:
        if value[0] == _ZLIB:
            payload = memoryview(zlib.decompress(value[1:]))
        elif value[0] == _PLAIN:
            payload = memoryview(value)[1:]
        else:
            return None
        kind, status, stored_at, fresh, swr, sie = _HEAD.unpack_from(payload, 0)
        offset = _HEAD.size
        (count,) = _U16.unpack_from(payload, offset)
        offset += 2
        headers: list[tuple[bytes, bytes]] = []
        for _ in range(count):
            name_length, value_length = _FIELD.unpack_from(payload, offset)
            offset += _FIELD.size
            name = bytes(payload[offset : offset + name_length])
            offset += name_length
            headers.append((name, bytes(payload[offset : offset + value_length])))
            offset += value_length
        (count,) = _U32.unpack_from(payload, offset)
        offset += 4
        chunks: list[bytes] = []
        for _ in range(count):
            (length,) = _U32.unpack_from(payload, offset)
            offset += 4
            chunks.append(bytes(payload[offset : offset + length]))
            offset += length
        if offset != len(payload):
            return None
    except (struct.error, zlib.error, IndexError):
        return None
    if kind == VARY:
        return Entry(status, [], [], stored_at, fresh, swr, sie, VARY, tuple(name.decode() for name, _ in headers))
    return Entry(status, headers, chunks, stored_at, fresh, swr, sie, kind)


def vary_marker(names: Sequence[str], stored_at: float, keep: float) -> Entry:
    """The entry under the primary key of a response that varies on ``names``."""
    return Entry(0, [], [], stored_at, keep, kind=VARY, vary=tuple(names))
