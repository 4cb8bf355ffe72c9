"""One socket write for a response's head and its first body chunk.

uvicorn writes a response's status line and headers at ``http.response.start``
and its body at the next ``http.response.body``: two ``send`` syscalls (and
often two TCP segments) for a small cached answer, where the second usually
follows within the same event-loop turn. :class:`CoalescingWriter` sits
between uvicorn's request cycle and the socket transport: it holds a small
write and sends it together with the next one, and never later than the next
loop turn (``loop.call_soon``), so a head whose body comes later (an SSE
stream, a slow upstream) or never (HEAD, 204, 304) is not delayed. Closing,
aborting and the protocol's own writes (:meth:`flush`) send what is held first.
"""

from __future__ import annotations

import asyncio
from typing import Any

# Heads are a few hundred bytes; a bigger write is not held, and one joined to a held write is
# sent separately when big, so coalescing never copies a large body
HOLD_LIMIT = 16 * 1024


class CoalescingWriter:
    """A transport for uvicorn's request cycle: ``write`` holds a small chunk until the next write or
    loop turn; every other transport call sends what is held first, then goes to the real transport."""

    __slots__ = ("_handle", "_held", "_loop", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._handle: asyncio.Handle | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` with what is held, or hold it (when small) until the next write or loop turn."""
        held = self._held
        if held is not None:
            self._held = None
            if len(data) <= HOLD_LIMIT:
                self.transport.write(held + bytes(data))
            else:
                self.transport.write(held)
                self.transport.write(data)
        elif len(data) <= HOLD_LIMIT and not self.transport.is_closing():
            self._held = bytes(data)
            if self._handle is None:
                self._handle = self._loop.call_soon(self._flush_soon)
        else:
            self.transport.write(data)

    def writelines(self, chunks: Any) -> None:
        """Send what is held, then ``chunks``."""
        self.flush()
        self.transport.writelines(chunks)

    def _flush_soon(self) -> None:
        self._handle = None
        self.flush()

    def flush(self) -> None:
        """Send what is held now (before anything else is written, closed or decided on the connection)."""
        held = self._held
        if held is not None:
            self._held = None  # first: the write may call pause_writing, which flushes again
            self.transport.write(held)

    def discard(self) -> None:
        """Forget what is held (the connection is gone)."""
        self._held = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def close(self) -> None:
        """Send what is held, then close the transport (which still sends its buffer)."""
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        """Drop what is held and abort the transport, as an abort drops its buffer."""
        self.discard()
        self.transport.abort()

    def is_closing(self) -> bool:
        """Whether the transport is closing."""
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        # anything else uvicorn may ask a transport for (get_extra_info, buffer sizes, ...) sees
        # the held bytes sent first
        self.flush()
        return getattr(self.transport, name)
