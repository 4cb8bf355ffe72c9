"""Responses Edgeway makes itself.

:class:`ErrorResponse` answers with a JSON body and a stable ``error`` code;
every one carries ``Edgeway-Error: <code>`` so clients and ops can tell a
gateway 503 from an upstream 503. :class:`Response` answers with stored bytes
(a cached response, a static fallback), chunk by chunk as they were received.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import Any

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]


class ErrorResponse:
    """An ASGI app answering one error; build it, then ``await response(scope, receive, send)``."""

    __slots__ = ("body", "headers", "status")

    def __init__(
        self,
        status: int,
        error: str,
        message: str | None = None,
        *,
        extra: dict[str, Any] | None = None,
        headers: Iterable[tuple[bytes, bytes]] = (),
        content_type: bytes = b"application/json",
    ) -> None:
        payload: dict[str, Any] = dict(extra or {})
        payload["error"] = error
        if message is not None:
            payload["message"] = message
        self.status = status
        self.body = json.dumps(payload, separators=(",", ":")).encode()
        self.headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(self.body)).encode()),
            (b"edgeway-error", error.encode()),
            (b"cache-control", b"no-store"),
            *headers,
        ]

    @property
    def chunks(self) -> Sequence[bytes]:
        """The body as one chunk (what a server writing the answer itself sends)."""
        return (self.body,)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body if scope.get("method") != "HEAD" else b""})


class Response:
    """An ASGI app sending a response Edgeway holds: status, headers and body chunks.

    Chunks go out as separate body messages, so a stored event stream replays
    with the event boundaries it had. A HEAD request gets the headers only.

    Like every answer, a response is not changed once made (the cache hands the same one to every hit of a
    second): :func:`with_headers` makes a copy with more fields. ``wire`` is where the server keeps the
    response as it writes it on a keep-alive connection (:func:`edgeway.gateway.server.answer_bytes`).
    """

    __slots__ = ("chunks", "headers", "status", "wire")

    def __init__(self, status: int, headers: Iterable[tuple[bytes, bytes]], chunks: Sequence[bytes] = ()) -> None:
        self.status = status
        self.headers = list(headers)
        self.chunks = chunks
        self.wire: bytes | None = None

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        if scope.get("method") == "HEAD" or not self.chunks:
            await send({"type": "http.response.body", "body": b""})
            return
        last = len(self.chunks) - 1
        for index, chunk in enumerate(self.chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": index < last})


def with_headers(answer: Any, extra: Sequence[tuple[bytes, bytes]]) -> Response:
    """A copy of ``answer`` (a :class:`Response` or an :class:`ErrorResponse`) with ``extra`` fields after its own."""
    return Response(answer.status, [*answer.headers, *extra], answer.chunks)


def bad_request(message: str) -> ErrorResponse:
    """400 with ``error: bad_request`` and a human message."""
    return ErrorResponse(400, "bad_request", message, headers=[(b"connection", b"close")])
