"""The policy protocol as the pipeline drives it: body reading, waits, answers, response hooks, deferred writes.

Small policies written for the test exercise each step; the store is the memory store behind a wrapper that
counts round trips, so "one batch per request" is asserted, not assumed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from edgeway.middleware.context import SCOPE_KEY, RequestContext
from edgeway.middleware.pipeline import PolicyPipeline
from edgeway.middleware.policy import Answer, BasePolicy, Completed, Pending, Prepared
from edgeway.middleware.responses import ErrorResponse, Message, Response
from edgeway.middleware.store import Command, Get, Set, Store
from edgeway.middleware.store.memory import MemoryStore
from tests.garbage import contexts_left
from tests.servers import read_body


class CountingStore(Store):
    """The memory store, counting ``execute`` calls (round trips) and the commands in each."""

    kind = "memory"

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.batches: list[list[Command]] = []

    async def execute(self, commands: Sequence[Command], *, timeout: float | None = None) -> list[object]:
        self.batches.append(list(commands))
        return await self.inner.execute(commands, timeout=timeout)

    async def ping(self) -> None:
        await self.inner.ping()


class Recorder(BasePolicy):
    """Reads one key per request and records what it saw."""

    def __init__(self, name: str, *, body: int = 0) -> None:
        self.name = name
        self.request_body_limit = body
        self.seen: list[tuple[str, object]] = []

    def prepare(self, ctx: RequestContext) -> Prepared | Answer | Pending:
        self.seen.append(("prepare", ctx.user))
        if self.request_body_limit:
            self.seen.append(("body", ctx.body if not ctx.body_too_large else "too large"))
        return Prepared((Get(f"k:{self.name}"),))

    def decide(self, ctx: RequestContext, prepared: Prepared, results: Sequence[object]) -> Answer | Pending | None:
        self.seen.append(("decide", list(results)))
        return None


def http_scope(method: str = "GET", path: str = "/x", headers: Sequence[tuple[bytes, bytes]] = ()) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "query_string": b"", "headers": list(headers),
            "client": ("10.0.0.1", 1234), "server": ("gw", 80), "scheme": "http", "http_version": "1.1"}


async def run(app: Any, scope: dict[str, Any], bodies: Sequence[Message] = ()) -> list[Message]:
    """Call ``app`` once; ``bodies`` are the request messages, then the client waits (no disconnect)."""
    queue = list(bodies) or [{"type": "http.request", "body": b"", "more_body": False}]
    sent: list[Message] = []

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def echo_app(received: list[bytes]) -> Any:
    """An app that reads the whole request body, then answers 200 with it in two chunks."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = await read_body(receive)
        received.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body[:3], "more_body": True})
        await send({"type": "http.response.body", "body": body[3:]})

    return app


def body_messages(*chunks: bytes) -> list[Message]:
    return [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]


# -- one round trip ------------------------------------------------------------------------------------------------


async def test_every_policys_commands_go_out_in_one_batch() -> None:
    store = CountingStore()
    first, second = Recorder("a"), Recorder("b")
    app = PolicyPipeline(echo_app([]), policies=[first, second], store=store)
    await run(app, http_scope())
    assert store.batches == [[Get("k:a"), Get("k:b")]]
    assert first.seen[-1] == ("decide", [None]) and second.seen[-1] == ("decide", [None])


async def test_the_context_is_shared_during_the_request_and_unlinked_by_whoever_made_it() -> None:
    seen: list[object] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if not seen:
            seen.append(scope.get(SCOPE_KEY))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    store = CountingStore()
    inner = PolicyPipeline(app, policies=[Recorder("b")], store=store)
    outer = PolicyPipeline(inner, policies=[Recorder("a")], store=store)
    scope = http_scope()
    await run(outer, scope)
    assert isinstance(seen[0], RequestContext) and seen[0].scope is scope  # the app saw the one context
    assert SCOPE_KEY not in scope  # made by the outer pipeline, unlinked when it finished
    seen.clear()

    async def one_request() -> None:
        await run(outer, http_scope())

    assert await contexts_left(one_request, 20) <= 1  # each went with its scope, without the cyclic collector


# -- reading a bounded request body ----------------------------------------------------------------------------------

LENGTH_5 = [(b"content-length", b"5")]


async def test_the_body_is_read_once_and_replayed_byte_for_byte() -> None:
    received: list[bytes] = []
    policy = Recorder("a", body=10)
    app = PolicyPipeline(echo_app(received), policies=[policy], store=CountingStore())
    sent = await run(app, http_scope("POST", headers=LENGTH_5), body_messages(b"he", b"llo"))
    assert ("body", b"hello") in policy.seen
    assert received == [b"hello"]
    assert b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body") == b"hello"


async def test_a_body_over_the_limit_is_not_kept_but_streams_on_whole() -> None:
    received: list[bytes] = []
    policy = Recorder("a", body=4)
    app = PolicyPipeline(echo_app(received), policies=[policy], store=CountingStore())
    chunks = [b"abc", b"def", b"ghi", b"jkl"]
    await run(app, http_scope("POST", headers=[(b"content-length", b"12")]), body_messages(*chunks))
    assert ("body", "too large") in policy.seen
    assert received == [b"abcdefghijkl"]


async def test_requests_without_a_body_are_not_read() -> None:
    policy = Recorder("a", body=10)
    app = PolicyPipeline(echo_app([]), policies=[policy], store=CountingStore())
    await run(app, http_scope("GET"))
    assert ("body", None) in policy.seen


async def test_a_stalled_body_gets_408_with_the_json_error() -> None:
    app = PolicyPipeline(echo_app([]), policies=[Recorder("a", body=10)], store=CountingStore(),
                            body_timeout=0.05)
    sent = await run(app, http_scope("POST", headers=LENGTH_5), [{"type": "http.request", "body": b"h",
                                                                  "more_body": True}])
    assert sent[0]["status"] == 408
    assert (b"edgeway-error", b"request_timeout") in sent[0]["headers"]


async def test_a_client_that_leaves_during_the_body_gets_nothing_and_costs_nothing() -> None:
    store = CountingStore()
    app = PolicyPipeline(echo_app([]), policies=[Recorder("a", body=10)], store=store)
    sent = await run(app, http_scope("POST", headers=LENGTH_5),
                     [{"type": "http.request", "body": b"h", "more_body": True}, {"type": "http.disconnect"}])
    assert sent == [] and store.batches == []


# -- waiting --------------------------------------------------------------------------------------------------------


class SlowIdentity(BasePolicy):
    """Finds the user only after a wait (as a provider call would), then adds its own command."""

    name = "identity"

    def prepare(self, ctx: RequestContext) -> Prepared | Answer | Pending:
        async def lookup() -> Prepared | Answer | None:
            await asyncio.sleep(0)
            if ctx.header("authorization") is None:
                return ErrorResponse(401, "unauthorized")
            ctx.user = "u1"
            return Prepared((Get("revoked:u1"),))

        return Pending(lookup())

    def decide(self, ctx: RequestContext, prepared: Prepared, results: Sequence[object]) -> Answer | Pending | None:
        return None


async def test_a_pending_prepare_is_awaited_before_the_next_policy_and_still_one_batch() -> None:
    store = CountingStore()
    after = Recorder("limits")
    app = PolicyPipeline(echo_app([]), policies=[SlowIdentity(), after], store=store)
    await run(app, http_scope(headers=[(b"authorization", b"Bearer t")]))
    assert after.seen[0] == ("prepare", "u1")
    assert store.batches == [[Get("revoked:u1"), Get("k:limits")]]


async def test_a_pending_prepare_may_answer_and_then_nothing_else_runs() -> None:
    store = CountingStore()
    after = Recorder("limits")
    app = PolicyPipeline(echo_app([]), policies=[SlowIdentity(), after], store=store)
    sent = await run(app, http_scope())
    assert sent[0]["status"] == 401
    assert after.seen == [] and store.batches == []


class Filled(BasePolicy):
    """Answers from a key another 'instance' fills while this request waits; else lets it through."""

    name = "cache"

    def prepare(self, ctx: RequestContext) -> Prepared | Answer | Pending:
        return Prepared((Get("entry"),))

    def decide(self, ctx: RequestContext, prepared: Prepared, results: Sequence[object]) -> Answer | Pending | None:
        if results[0] is not None:
            return Response(200, [(b"x-from", b"cache")], [str(results[0]).encode()])

        async def wait_for_fill() -> Answer | None:
            for _ in range(50):
                await asyncio.sleep(0.001)
                value = self.peek()
                if value is not None:
                    return Response(200, [(b"x-from", b"fill")], [b"data: 1\n\n", b"data: 2\n\n"])
            return None

        return Pending(wait_for_fill())

    def peek(self) -> str | None:
        return None


async def test_a_pending_decide_resolves_to_a_non_error_answer_sent_chunk_by_chunk_with_the_policy_headers() -> None:
    class FilledSoon(Filled):
        def peek(self) -> str | None:
            return "x"

    class Header(Recorder):
        def decide(self, ctx: RequestContext, prepared: Prepared, results: Sequence[object]) -> Answer | None:
            ctx.response_headers.append((b"ratelimit", b'"minute";r=9'))
            return None

    app = PolicyPipeline(echo_app([]), policies=[Header("limits"), FilledSoon()], store=CountingStore())
    sent = await run(app, http_scope())
    assert sent[0]["status"] == 200
    assert (b"x-from", b"fill") in sent[0]["headers"] and (b"ratelimit", b'"minute";r=9') in sent[0]["headers"]
    assert [m["body"] for m in sent[1:]] == [b"data: 1\n\n", b"data: 2\n\n"]
    assert [m.get("more_body", False) for m in sent[1:]] == [True, False]


async def test_an_answer_is_never_changed_so_one_can_serve_many_requests() -> None:
    """A hot cache entry's answer is handed to every hit of a second: the headers other policies add go on a
    copy, once per request, on the ASGI path and on the server's fast path alike."""
    shared = Response(200, [(b"x-from", b"cache")], [b"hit"])

    class Same(BasePolicy):
        name = "cache"
        decides_from_memory = True

        def prepare(self, ctx: RequestContext) -> Prepared | Answer | Pending:
            return Prepared()

        def decide(self, ctx: RequestContext, prepared: Prepared, results: Sequence[object]) -> Answer | None:
            return shared

    app = PolicyPipeline(echo_app([]), policies=[Headers(), Same()], store=CountingStore())
    for _ in range(3):
        sent = await run(app, http_scope())
        assert sent[0]["headers"] == [(b"x-from", b"cache"), (b"x-added", b"1")]
    alone = PolicyPipeline(echo_app([]), policies=[Same()], store=CountingStore())
    scope = http_scope()
    ctx = scope[SCOPE_KEY] = RequestContext(scope, alone.trusted)
    ctx.response_headers.append((b"x-late", b"1"))
    answer = alone.answer_now(ctx)
    assert answer is not None and answer is not shared and answer.headers[-1] == (b"x-late", b"1")
    assert shared.headers == [(b"x-from", b"cache")]


async def test_a_pending_decide_resolving_to_none_lets_the_request_through() -> None:
    received: list[bytes] = []
    app = PolicyPipeline(echo_app(received), policies=[Filled()], store=CountingStore())
    sent = await run(app, http_scope())
    assert sent[0]["status"] == 200 and (b"x-from", b"fill") not in sent[0]["headers"]
    assert received == [b""]


async def test_a_stored_answer_to_head_sends_headers_only() -> None:
    store = CountingStore()
    await store.inner.execute([Set("entry", "cached", 60_000)])
    sent = await run(PolicyPipeline(echo_app([]), policies=[Filled()], store=store), http_scope("HEAD"))
    assert sent[0]["status"] == 200 and [m["body"] for m in sent[1:]] == [b""]


# -- response hooks and deferred writes ------------------------------------------------------------------------------


class Watcher(BasePolicy):
    """Marks every response start, swaps 502s for a held answer, and records what ``finish`` saw."""

    name = "watcher"
    wants_respond = True
    wants_finish = True
    response_body_limit = 1024

    def __init__(self) -> None:
        self.finished: list[Completed] = []

    def prepare(self, ctx: RequestContext) -> Prepared | Answer | Pending:
        return Prepared()

    def decide(self, ctx: RequestContext, prepared: Prepared, results: Sequence[object]) -> Answer | Pending | None:
        return None

    def respond(self, ctx: RequestContext, prepared: Prepared, start: Message) -> Answer | None:
        if start["status"] == 502:
            return Response(200, [(b"cache-status", b"edgeway; hit; stale")], [b"old"])
        start["headers"].append((b"cache-status", b"edgeway; fwd=miss; stored"))
        return None

    def finish(self, ctx: RequestContext, prepared: Prepared, response: Completed) -> Sequence[Command]:
        self.finished.append(response)
        return (Set("filled", response.body.decode() if response.body is not None else "-", 60_000),)


def failing_upstream(status: int) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"upstream said no"})

    return app


async def test_respond_edits_headers_and_finish_sees_the_body_chunks_and_writes_after() -> None:
    store = CountingStore()
    watcher = Watcher()
    app = PolicyPipeline(echo_app([]), policies=[watcher], store=store)
    sent = await run(app, http_scope("POST", headers=LENGTH_5), body_messages(b"hello"))
    assert (b"cache-status", b"edgeway; fwd=miss; stored") in sent[0]["headers"]
    done = watcher.finished[0]
    assert done.complete and done.status == 200 and done.chunks == [b"hel", b"lo"] and done.elapsed >= 0
    await asyncio.sleep(0.01)
    assert store.batches[-1] == [Set("filled", "hello", 60_000)]


async def test_respond_may_replace_the_response_and_the_apps_body_is_dropped() -> None:
    watcher = Watcher()
    sent = await run(PolicyPipeline(failing_upstream(502), policies=[watcher], store=CountingStore()),
                     http_scope())
    assert sent[0]["status"] == 200 and [m["body"] for m in sent[1:]] == [b"old"]
    assert watcher.finished[0].status == 502 and watcher.finished[0].chunks is None


async def test_finish_runs_for_a_response_cut_short_and_says_so() -> None:
    watcher = Watcher()

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"par", "more_body": True})
        raise ConnectionResetError("client left")

    with pytest.raises(ConnectionResetError):
        await run(PolicyPipeline(broken, policies=[watcher], store=CountingStore()), http_scope())
    assert watcher.finished[0].status == 200 and not watcher.finished[0].complete
    assert watcher.finished[0].chunks is None


async def test_finish_runs_when_the_app_never_started_a_response() -> None:
    watcher = Watcher()

    async def crashed(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await run(PolicyPipeline(crashed, policies=[watcher], store=CountingStore()), http_scope())
    assert watcher.finished[0].status == 0 and not watcher.finished[0].complete


class Headers(BasePolicy):
    """Adds a response header (as rate limits do); nothing to watch."""

    name = "headers"

    def prepare(self, ctx: RequestContext) -> Prepared | Answer | Pending:
        ctx.response_headers.append((b"x-added", b"1"))
        return Prepared()

    def decide(self, ctx: RequestContext, prepared: Prepared, results: Sequence[object]) -> Answer | Pending | None:
        return None


@pytest.mark.parametrize("policy", [Watcher, Headers], ids=["watched", "headers-added"])
async def test_the_response_goes_out_through_the_servers_own_awaitables(policy: type[BasePolicy]) -> None:
    """The pipeline looks at each message on its way but adds no coroutine level of its own (they cost on
    every message): the app awaits exactly what the server's send returned."""
    returned: list[object] = []
    handed: list[object] = []

    def send(message: Message) -> asyncio.Future[None]:
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        returned.append(done)
        return done

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for message in ({"type": "http.response.start", "status": 200, "headers": []},
                        {"type": "http.response.body", "body": b"ok"}):
            awaitable = send(message)
            handed.append(awaitable)
            await awaitable

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    await PolicyPipeline(app, policies=[policy()], store=CountingStore())(http_scope(), receive, send)
    assert handed == returned and len(returned) == 2
