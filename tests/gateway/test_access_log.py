"""The access log: one line per request with the policies' outcomes, request ids passed through or generated
and forwarded, and never a token, cookie, API key, query value or body."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeway import gateway
from edgeway.gateway import accesslog
from edgeway.gateway.accesslog import AccessLog, BatchedStreamHandler, user_hash
from edgeway.gateway.asgi import app_from_env
from edgeway.middleware.clientip import TrustedProxies
from edgeway.middleware.context import RequestContext
from tests.gateway.conftest import EchoApp, marker, wait_until
from tests.gateway.test_metrics import serve, stop
from tests.servers import UvicornThread, free_port, wait_for_port

SECRETS = {
    "token": "tok-5f1c2a9e-bearer-secret",
    "cookie": "sb-ref-auth-token=cookie-7d3e-secret",
    "apikey": "key-0b9d44-api-secret",
    "query": "q-value-91aa-secret",
    "body": "body-c0ffee-secret",
}


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@dataclass
class Logged:
    url: str
    lines: list[str]

    def entry(self, path: str) -> dict[str, Any]:
        """The line of the request to ``path`` (written just after its response went out)."""
        assert wait_until(lambda: any(json.loads(line)["path"] == path for line in self.lines)), path
        (entry,) = [json.loads(line) for line in self.lines if json.loads(line)["path"] == path]
        return entry  # type: ignore[no-any-return]


def policy(echo_port: int) -> str:
    return f"""
version: 1
upstreams:
  echo: {{ url: "http://127.0.0.1:{echo_port}" }}
routes:
  - match: {{ path: /limited/* }}
    upstream: echo
    limits: [{{ rate: 1/minute, key: header:x-client }}]
  - match: {{ path: /api/* }}
    upstream: echo
"""


@pytest.fixture(scope="module")
def logged(echo: EchoApp) -> Iterator[Logged]:
    handler = Lines()
    logger = logging.getLogger("tests.access")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    app = gateway.create_app(gateway.load_text(policy(echo.port)),  # type: ignore[attr-defined]
                             access_log=AccessLog("json", logger=logger))
    with UvicornThread(app, http="httptools", proxy_headers=False) as server:
        yield Logged(server.url, handler.lines)
    logger.removeHandler(handler)


def test_one_json_line_with_every_field(logged: Logged, echo: EchoApp) -> None:
    token = marker()
    response = httpx.get(f"{logged.url}/api/{token}", params={"page": "2"})
    assert response.status_code == 200
    entry = logged.entry(f"/api/{token}")
    assert set(entry) == {"time", "route", "method", "path", "status", "latency_ms", "upstream", "upstream_ms",
                          "limit", "cache", "breaker", "session", "user", "store", "request_id"}
    assert entry["route"] == "/api/*"
    assert (entry["method"], entry["path"], entry["status"]) == ("GET", f"/api/{token}", 200)
    assert entry["upstream"] == "echo" and entry["store"] == "memory"
    assert 0 <= entry["upstream_ms"] <= entry["latency_ms"]
    assert entry["time"].endswith("Z") and entry["time"][10] == "T"


def test_request_id_is_passed_through(logged: Logged, echo: EchoApp) -> None:
    token = marker()
    httpx.get(f"{logged.url}/api/{token}", headers={"x-request-id": "req-from-client-1"})
    assert logged.entry(f"/api/{token}")["request_id"] == "req-from-client-1"
    (seen,) = echo.find(token)
    assert [v for k, v in seen["headers"] if k == "x-request-id"] == ["req-from-client-1"]


@pytest.mark.parametrize("sent", ["has spaces in it", "x" * 129])
def test_an_unusable_request_id_is_replaced(logged: Logged, echo: EchoApp, sent: str) -> None:
    token = marker()
    httpx.get(f"{logged.url}/api/{token}", headers={"x-request-id": sent})
    generated = logged.entry(f"/api/{token}")["request_id"]
    assert len(generated) == 24
    (seen,) = echo.find(token)
    assert [v for k, v in seen["headers"] if k == "x-request-id"] == [generated]


def test_request_id_is_generated_and_forwarded(logged: Logged, echo: EchoApp) -> None:
    token = marker()
    httpx.get(f"{logged.url}/api/{token}")
    generated = logged.entry(f"/api/{token}")["request_id"]
    assert len(generated) == 24
    (seen,) = echo.find(token)
    assert [v for k, v in seen["headers"] if k == "x-request-id"] == [generated]


def test_limit_decision_is_logged(logged: Logged) -> None:
    client = marker()
    statuses = [httpx.get(f"{logged.url}/limited/{client}/{n}", headers={"x-client": client}).status_code
                for n in range(2)]
    assert statuses == [200, 429]
    first, second = logged.entry(f"/limited/{client}/0"), logged.entry(f"/limited/{client}/1")
    assert (first["limit"], second["limit"]) == ("allowed", "rejected")
    assert second["upstream"] is None and second["upstream_ms"] is None


def test_gateway_answers_and_admin_requests_are_logged(logged: Logged) -> None:
    token = marker()
    httpx.get(f"{logged.url}/nowhere/{token}")
    assert (logged.entry(f"/nowhere/{token}")["status"], logged.entry(f"/nowhere/{token}")["route"]) == (404, None)
    httpx.get(f"{logged.url}/_edgeway/healthz")
    healthz = logged.entry("/_edgeway/healthz")
    assert (healthz["status"], healthz["route"]) == (200, "admin")


def test_no_token_cookie_api_key_query_value_or_body_is_logged(logged: Logged) -> None:
    start = len(logged.lines)
    token = marker()
    httpx.post(
        f"{logged.url}/api/{token}",
        params={"api_key": SECRETS["query"]},
        headers={"authorization": f"Bearer {SECRETS['token']}", "cookie": SECRETS["cookie"],
                 "apikey": SECRETS["apikey"], "x-api-key": SECRETS["apikey"]},
        content=SECRETS["body"],
    )
    assert logged.entry(f"/api/{token}")["status"] == 200
    text = "\n".join(logged.lines[start:])
    for name, secret in SECRETS.items():
        assert secret not in text, name
    assert "api_key" not in text


def test_text_format_is_one_readable_line() -> None:
    handler = Lines()
    logger = logging.getLogger("tests.access.text")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    ctx = RequestContext({"method": "GET", "path": "/api/x", "headers": []}, TrustedProxies(()), "/api/*")
    ctx.upstream, ctx.upstream_seconds, ctx.user, ctx.request_id = "echo", 0.004, "u-1", "r1"
    ctx.outcomes["limit"] = "allowed"
    AccessLog("text", logger=logger).record(ctx, 200, 0.0055, "redis")
    (line,) = handler.lines
    assert '200 GET "/api/x" 5.5ms route=/api/* upstream=echo upstream_ms=4.0 limit=allowed' in line
    assert f"user={user_hash('u-1')}" in line and "u-1 " not in line and "store=redis request_id=r1" in line


def test_app_from_env_follows_the_serve_options(tmp_path: Path, echo: EchoApp,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(policy(echo.port))  # type: ignore[attr-defined]
    monkeypatch.setenv("EDGEWAY_POLICY", str(path))
    monkeypatch.delenv("EDGEWAY_LOG_FORMAT", raising=False)
    monkeypatch.setenv("EDGEWAY_ACCESS_LOG", "off")
    assert app_from_env().access_log is None
    monkeypatch.setenv("EDGEWAY_ACCESS_LOG", "on")
    log = app_from_env().access_log
    assert log is not None and log.format == "json"  # not a terminal


def test_serve_writes_json_lines_to_stdout_and_no_uvicorn_access_log(tmp_path: Path, echo: EchoApp) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(policy(echo.port))  # type: ignore[attr-defined]
    port = free_port()
    process = serve(path, port, tmp_path)
    try:
        wait_for_port(port, timeout=30)
        token = marker()
        assert httpx.get(f"http://127.0.0.1:{port}/api/{token}").status_code == 200
    finally:
        out, err = stop(process)
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [e["path"] for e in entries] == [f"/api/{token}"]
    assert f"/api/{token}" not in err  # uvicorn's own access log stays off


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_queued_lines_go_out_together_in_order_soon_after_the_first() -> None:
    stream = CountingStream()
    handler = BatchedStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(f"edgeway.test-batched-{id(stream)}")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        for n in range(5):
            logger.info("line %d", n)
        await asyncio.sleep(0)
        assert stream.getvalue() == ""  # queued: one write for many lines
        await asyncio.sleep(BatchedStreamHandler.FLUSH_EVERY * 2)
        assert stream.getvalue() == "".join(f"line {n}\n" for n in range(5)) and stream.writes == 1
        logger.info("next")
        await asyncio.sleep(BatchedStreamHandler.FLUSH_EVERY * 2)
        assert stream.getvalue().endswith("line 4\nnext\n") and stream.writes == 2
    finally:
        logger.removeHandler(handler)


async def test_a_full_queue_is_written_at_once() -> None:
    stream = CountingStream()
    handler = BatchedStreamHandler(stream)
    for n in range(BatchedStreamHandler.FLUSH_LINES):
        handler.enqueue(f"line {n}")
    assert stream.writes == 1 and stream.getvalue().count("\n") == BatchedStreamHandler.FLUSH_LINES
    handler.enqueue("after")
    handler.close()  # shutdown writes what is queued
    assert stream.getvalue().endswith("\nafter\n") and stream.writes == 2


def batched_logger(name: str) -> tuple[CountingStream, BatchedStreamHandler, logging.Logger]:
    """A logger of its own writing through a BatchedStreamHandler into a counting stream, as under serve."""
    stream = CountingStream()
    handler = BatchedStreamHandler(stream)
    logger = logging.getLogger(f"edgeway.test-{name}-{id(stream)}")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return stream, handler, logger


@pytest.mark.parametrize("path", ["/plain", '/q"uote', "/back\\slash", "/caf\u00e9/\u2603", "/ctl\x01\x7f", "/tab\t"])
async def test_json_lines_are_valid_json_for_any_path_and_id(path: str) -> None:
    stream, handler, logger = batched_logger("json")
    scope = {"type": "http", "method": "GET", "path": path, "headers": [], "client": ("10.0.0.1", 1)}
    ctx = RequestContext(scope, TrustedProxies([]))
    ctx.route, ctx.request_id, ctx.upstream, ctx.upstream_seconds = 'r"1', 'id\\"x', "origin", 0.0015
    ctx.outcomes.update({"cache": "hit", "quota": 'a"b', "status": "ignored: a fixed field"})
    AccessLog("json", logger=logger).record(ctx, 200, 0.25, "redis")
    handler.flush()
    entry = json.loads(stream.getvalue())
    assert entry["path"] == path and entry["route"] == 'r"1' and entry["request_id"] == 'id\\"x'
    assert entry["status"] == 200 and entry["latency_ms"] == 250.0 and entry["upstream_ms"] == 1.5
    assert entry["cache"] == "hit" and entry["limit"] is None and entry["quota"] == 'a"b'
    assert list(entry)[:15] == ["time", "route", "method", "path", "status", "latency_ms", "upstream", "upstream_ms",
                                "limit", "cache", "breaker", "session", "user", "store", "request_id"]


async def test_the_remembered_field_values_stay_bounded_and_right() -> None:
    stream, handler, logger = batched_logger("bounded")
    log = AccessLog("json", logger=logger)
    paths = [f"/item/{n}" for n in range(accesslog._QUOTED_KEPT + 500)] + ['/q"x', "/item/7"]
    for path in paths:
        ctx = RequestContext({"type": "http", "method": "GET", "path": path, "headers": []}, TrustedProxies([]))
        ctx.request_id = path  # request ids are never remembered
        log.record(ctx, 200, 0.001, "memory")
    handler.flush()
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [entry["path"] for entry in entries] == paths and [entry["request_id"] for entry in entries] == paths
    assert len(accesslog._QUOTED) <= accesslog._QUOTED_KEPT


def test_outside_an_event_loop_a_line_is_written_at_once() -> None:
    stream = CountingStream()
    handler = BatchedStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.handle(logging.LogRecord("edgeway.access", logging.INFO, __file__, 1, "now", None, None))
    assert stream.getvalue() == "now\n"
