"""The cache-hit reference: a plain Starlette app returning the same 1 KB JSON body itself.

``bench/run.py`` serves it (target ``starlette-json``) with ``edgeway serve``'s uvicorn settings and
compares ``edgeway-cache-hit`` (the gateway answering that body from its cache) against it: a hit
should cost no more than an app that has the answer in hand.
"""

from __future__ import annotations

import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

JSON_PATH = "/1k.json"


def _json_body(size: int = 1024) -> bytes:
    """A chat-completion-shaped JSON document of exactly ``size`` bytes."""
    head = {"id": "chatcmpl-bench", "object": "chat.completion", "model": "bench",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}}]}
    empty = len(json.dumps(head, separators=(",", ":")).encode())
    head["choices"][0]["message"]["content"] = "y" * (size - empty)  # type: ignore[index]
    return json.dumps(head, separators=(",", ":")).encode()


JSON_BODY = _json_body()


async def answer(request: Request) -> Response:
    return Response(JSON_BODY, media_type="application/json")


app = Starlette(routes=[Route(JSON_PATH, answer)])
