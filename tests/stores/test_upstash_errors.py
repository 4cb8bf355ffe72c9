"""UpstashStore against a misbehaving Upstash: every failure is a StoreError, never a hang.

UpstashStore speaks aiohttp, which respx cannot mock, so a small Starlette app
under uvicorn plays the server: ``/{mode}/pipeline`` answers the way ``mode``
says, and the store's REST URL picks the mode (``http://host:port/{mode}``).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from edgeway.middleware.store import (
    Algorithm,
    CommandError,
    Get,
    LimitCheck,
    RateLimit,
    Set,
    StoreConfigurationError,
    StoreError,
    StoreTimeout,
    connect_store,
)
from edgeway.middleware.store.redis_protocol import SCRIPTS
from edgeway.middleware.store.upstash import UpstashStore, upstash_location
from tests.servers import HOST, UvicornThread, free_port

TOKEN = "secret-token"


def _entries(body: list[object], error_at: int | None = None) -> list[dict[str, object]]:
    return [{"error": "ERR boom"} if i == error_at else {"result": "OK"} for i in range(len(body))]


async def _pipeline(request: Request) -> Response:
    mode = request.path_params["mode"]
    body = json.loads(await request.body())
    request.app.state.seen.append((mode, dict(request.headers), body))
    answers: dict[str, Response] = {
        "unauthorized": JSONResponse({"error": "Unauthorized"}, 401),
        "status500": PlainTextResponse("internal trouble", 500),
        "status503": JSONResponse({"error": "Service Unavailable: try later"}, 503),
        "badjson": PlainTextResponse("this is not json", 200),
        "short": JSONResponse(_entries(body)[:-1]),
        "long": JSONResponse([*_entries(body), {"result": "extra"}]),
        "object": JSONResponse({"result": "OK"}),
        "entry-error": JSONResponse(_entries(body, error_at=len(body) - 1)),
        "odd-entry": JSONResponse([{"neither": 1} for _ in body]),
        "ok": JSONResponse([{"result": None} for _ in body]),
    }
    return answers[mode]


def _app() -> Starlette:
    app = Starlette(routes=[Route("/{mode}/pipeline", _pipeline, methods=["POST"])])
    app.state.seen = []
    return app


@pytest.fixture(scope="module")
def fake_upstash() -> Iterator[UvicornThread]:
    with UvicornThread(_app()) as server:
        yield server


@pytest.fixture
async def store_for(fake_upstash: UvicornThread) -> AsyncIterator[object]:
    stores: list[UpstashStore] = []

    def make(mode: str, *, timeout: float = 2.0) -> UpstashStore:
        store = UpstashStore(f"{fake_upstash.url}/{mode}", token=TOKEN, timeout=timeout)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


BATCH = [Set("k", "v", 1_000), Get("k")]


async def test_request_shape(store_for, fake_upstash: UvicornThread) -> None:
    store = store_for("ok")
    check = LimitCheck("rl", Algorithm.FIXED_WINDOW, 5, 1_000)
    results = await store.execute([Set("k", "v", 1_000), Get("k")])
    assert results == [None, None]
    seen = fake_upstash.server.config.app.state.seen
    mode, headers, body = seen[-1]
    assert mode == "ok"
    assert headers["authorization"] == f"Bearer {TOKEN}"
    assert headers["content-type"] == "application/json"
    assert headers["upstash-encoding"] == "base64"
    loads = [["SCRIPT", "LOAD", script.source] for script in SCRIPTS]
    assert body == [*loads, ["SET", "k", "v", "PX", 1000], ["GET", "k"]]  # the first pipeline loads the scripts
    await asyncio.gather(store.execute([Get("a")]), store.execute([Get("b"), Get("c")]))
    assert seen[-1][2] == [["GET", "a"], ["GET", "b"], ["GET", "c"]]  # one request for both batches
    with pytest.raises(StoreError, match="rate-limit reply"):
        await store.execute([RateLimit((check,))])  # {"result": null} is no rate-limit answer


async def test_unauthorized_mentions_the_token(store_for) -> None:
    with pytest.raises(StoreError, match="token") as caught:
        await store_for("unauthorized").execute(BATCH)
    assert "401" in str(caught.value)
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize(("mode", "status", "text"), [
    ("status500", "500", "internal trouble"),
    ("status503", "503", "Service Unavailable: try later"),
])
async def test_server_errors_carry_the_status(store_for, mode: str, status: str, text: str) -> None:
    with pytest.raises(StoreError) as caught:
        await store_for(mode).execute(BATCH)
    assert not isinstance(caught.value, StoreTimeout)
    assert f"HTTP {status}" in str(caught.value) and text in str(caught.value)


async def test_invalid_json(store_for) -> None:
    with pytest.raises(StoreError, match="invalid JSON"):
        await store_for("badjson").execute(BATCH)


SENT = len(SCRIPTS) + len(BATCH)  # a store's first pipeline loads the scripts ahead of the batch


@pytest.mark.parametrize(
    ("mode", "found"), [("short", f"{SENT - 1} entries"), ("long", f"{SENT + 1} entries"), ("object", "no entries")]
)
async def test_wrong_number_of_entries(store_for, mode: str, found: str) -> None:
    with pytest.raises(StoreError, match=f"{found} for {SENT} commands"):
        await store_for(mode).execute(BATCH)


async def test_error_entry_is_that_commands_result_only(store_for) -> None:
    store = store_for("entry-error")
    results = await store.execute(BATCH)
    assert any(isinstance(r, CommandError) and "ERR boom" in str(r) for r in results)
    # two batches share one HTTP request; only the command that failed gets the error, as its result
    first, second = await asyncio.gather(store.execute([Set("a", "1", 1_000)]), store.execute([Get("b")]))
    assert first == [None]
    assert isinstance(second[0], CommandError) and "Get" in str(second[0])


async def test_unexpected_entry_shape(store_for) -> None:
    with pytest.raises(StoreError, match="unexpected Upstash pipeline entry"):
        await store_for("odd-entry").execute(BATCH)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose listener never accepts: connections open (backlog), answers never come."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        sock.listen(16)
        yield sock.getsockname()[1]


async def test_server_that_never_answers_times_out(silent_port: int) -> None:
    store = UpstashStore(f"http://{HOST}:{silent_port}", token=TOKEN, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(StoreTimeout, match="200 ms"):
        await store.execute(BATCH)
    assert time.monotonic() - started < 1.0
    with pytest.raises(StoreTimeout):
        await store.execute(BATCH, timeout=0.05)
    patient = asyncio.ensure_future(store.execute(BATCH, timeout=None))  # would wait for ever
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await store.close()  # requests still in flight fail now, they are not waited for
    assert time.monotonic() - started < 1.0
    with pytest.raises(StoreError, match="closed"):
        await patient


async def test_connection_refused() -> None:
    store = UpstashStore(f"http://{HOST}:{free_port()}", token=TOKEN, timeout=2.0)
    try:
        with pytest.raises(StoreError, match="Upstash request failed") as caught:
            await store.execute([Get("k")])
        assert not isinstance(caught.value, StoreTimeout)
    finally:
        await store.close()


# -- upstash_location: URL and environment parsing -------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("UPSTASH_REDIS_REST_URL", raising=False)
    monkeypatch.delenv("UPSTASH_REDIS_REST_TOKEN", raising=False)
    return monkeypatch


@pytest.mark.parametrize("url", [None, "upstash://", "upstash+https://"])
def test_location_from_the_environment(clean_env: pytest.MonkeyPatch, url: str | None) -> None:
    clean_env.setenv("UPSTASH_REDIS_REST_URL", "https://eu1-example.upstash.io")
    clean_env.setenv("UPSTASH_REDIS_REST_TOKEN", "env-token")
    assert upstash_location(url) == ("https://eu1-example.upstash.io", "env-token")


@pytest.mark.parametrize("missing", ["UPSTASH_REDIS_REST_URL", "UPSTASH_REDIS_REST_TOKEN"])
def test_location_environment_incomplete(clean_env: pytest.MonkeyPatch, missing: str) -> None:
    clean_env.setenv("UPSTASH_REDIS_REST_URL", "https://eu1-example.upstash.io")
    clean_env.setenv("UPSTASH_REDIS_REST_TOKEN", "env-token")
    clean_env.delenv(missing)
    with pytest.raises(StoreConfigurationError, match="UPSTASH_REDIS_REST_URL and UPSTASH_REDIS_REST_TOKEN"):
        upstash_location(None)


HOSTED = "https://eu1-example.upstash.io"


@pytest.mark.parametrize(("url", "expected"), [
    ("upstash+https://TOKEN@eu1-example.upstash.io", (HOSTED, "TOKEN")),
    ("upstash+https://default:TOKEN@eu1-example.upstash.io", (HOSTED, "TOKEN")),
    ("upstash+http://TOKEN@127.0.0.1:8079", ("http://127.0.0.1:8079", "TOKEN")),
    ("upstash+https://TOKEN@proxy.example.com:8443/up", ("https://proxy.example.com:8443/up", "TOKEN")),
    # base64 tokens may hold "/" and "+": a "/" must be percent-encoded in a URL, and is decoded
    ("upstash+https://AYNg%2Fab+c%3D@eu1-example.upstash.io", (HOSTED, "AYNg/ab+c=")),
])
def test_location_from_the_url(clean_env: pytest.MonkeyPatch, url: str, expected: tuple[str, str]) -> None:
    clean_env.setenv("UPSTASH_REDIS_REST_TOKEN", "env-token-not-used")
    assert upstash_location(url) == expected


def test_location_token_from_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("UPSTASH_REDIS_REST_TOKEN", "env-token")
    assert upstash_location("upstash+https://eu1-example.upstash.io") == (HOSTED, "env-token")


def test_location_without_any_token(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(StoreConfigurationError, match=r"no Upstash token for eu1-example\.upstash\.io"):
        upstash_location("upstash+https://eu1-example.upstash.io")


def test_connect_store_hides_the_token(clean_env: pytest.MonkeyPatch) -> None:
    store = connect_store("upstash+https://SECRET@eu1-example.upstash.io")
    assert isinstance(store, UpstashStore)
    assert "SECRET" not in store.describe()
    assert store.describe() == "upstash+https://eu1-example.upstash.io"
