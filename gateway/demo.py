"""``edgeway demo``: a sample upstream, the gateway on the memory store, and traffic through it.

Needs nothing but the package. Everything runs in this process on free
loopback ports; the summary shows what each policy did.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from .app import create_app

DEMO_POLICY = """\
version: 1
store: {{ url: "memory://" }}
upstreams:
  sample: {{ url: "http://127.0.0.1:{upstream_port}", timeout: {{ connect: 1s, read: 5s }} }}
  flaky:
    url: "http://127.0.0.1:{flaky_port}"
    breaker: {{ failures: 3, open_for: 1s }}
routes:
  - match: {{ path: /api/ai/*, methods: [POST] }}     # expensive: 5 a minute per client, 20 a day
    upstream: sample
    limits:
      - {{ rate: 5/minute, key: ip }}
      - {{ rate: 20/day, key: ip }}
  - match: {{ path: /api/search }}                   # per API key; keyless callers share their IP's quota
    upstream: sample
    limits:
      - {{ rate: 8/minute, key: header:X-Api-Key, on_missing: ip, algorithm: token-bucket }}
  - match: {{ path: /api/me }}                       # signed-in users only (Supabase Auth session)
    upstream: sample
    session: required
  - match: {{ path: /api/ask, methods: [POST] }}      # an AI answer: computed once, then served from the cache
    upstream: sample
    cache: {{ ttl: 1h, key: [method, path, body], body_exclude: [user] }}
  - match: {{ path: /flaky/* }}                      # its upstream fails; the breaker steps in
    upstream: flaky
  - match: {{ path: /* }}
    upstream: sample
sessions:
  url: "http://127.0.0.1:{upstream_port}"            # the sample also plays Supabase Auth (/auth/v1/user)
  anon_key: demo-anon-key
"""

UPSTREAM_CALLS: Counter[str] = Counter()
"""Requests the sample upstream served, by path (the cache demo shows how few reached it)."""


async def sample_upstream(scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                          send: Callable[[Any], Awaitable[None]]) -> None:
    """A tiny JSON API standing in for the user's service."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    UPSTREAM_CALLS[scope["path"]] += 1
    body = b'{"answer": 42, "path": "' + scope["path"].encode() + b'"}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class _SampleAuth:
    """The sample's stand-in for Supabase Auth: ``/auth/v1/user`` knows one opaque session token."""

    token = "demo-session-token"

    def __init__(self, app: Any) -> None:
        self.app = app
        self.user_calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/auth/v1/"):
            if scope["type"] == "http" and scope["path"] == "/api/me":
                user = dict(scope["headers"]).get(b"x-edgeway-user", b"")
                body = b'{"you are": "' + user + b'"}'
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/auth/v1/user":
            self.user_calls += 1
        known = dict(scope["headers"]).get(b"authorization") == f"Bearer {self.token}".encode()
        status, body = (200, b'{"id": "demo-user", "role": "authenticated"}') if known else (403, b'{"msg": "bad_jwt"}')
        if scope["path"] != "/auth/v1/user":
            status, body = 200, b'{"keys": []}'
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


async def _demo_sessions(client: httpx.AsyncClient, auth: _SampleAuth, requests: int, out: Any) -> int:
    """Step 6: a protected route; returns the number of problems seen."""
    out.write("\n6. GET /api/me (session: required; the token is validated by the auth provider, then cached)\n")
    anonymous = await client.get("/api/me")
    out.write(f"  without a token: {anonymous.status_code} {anonymous.json().get('error')} "
              f"(WWW-Authenticate: {anonymous.headers.get('www-authenticate', '')})\n")
    bearer = {"authorization": f"Bearer {auth.token}"}
    statuses = Counter([(await client.get("/api/me", headers=bearer)).status_code for _ in range(requests)])
    out.write(f"  with a token: {statuses.get(200, 0)} allowed of {requests}; "
              f"the auth provider was called {auth.user_calls} time(s)\n")
    return int(anonymous.status_code != 401) + int(statuses.get(200, 0) != requests) + int(auth.user_calls != 1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Step:
    title: str
    method: str
    path: str
    requests: int
    headers: Callable[[int], dict[str, str]] = lambda i: {}
    group: Callable[[int], str] = lambda i: "all"
    limited: bool = True
    missing_fields: int = 0
    outcomes: dict[str, Counter[int]] = field(default_factory=dict)
    last_headers: dict[str, str] = field(default_factory=dict)


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / max(1, total))
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


async def _drive(client: httpx.AsyncClient, step: Step, out: Any) -> None:
    for i in range(step.requests):
        response = await client.request(step.method, step.path, headers=step.headers(i))
        step.outcomes.setdefault(step.group(i), Counter())[response.status_code] += 1
        expected = ("retry-after", "ratelimit") if response.status_code == 429 else ("ratelimit", "ratelimit-policy")
        if step.limited and not all(name in response.headers for name in expected):
            step.missing_fields += 1
        if response.status_code == 429:
            step.last_headers = {"retry-after": response.headers.get("retry-after", ""),
                                 "error": response.json().get("error", "")}
        elif "ratelimit" in response.headers:
            step.last_headers = {"ratelimit": response.headers["ratelimit"],
                                 "ratelimit-policy": response.headers.get("ratelimit-policy", "")}
        if out.isatty():
            out.write(f"\r  {_bar(i + 1, step.requests)}")
            out.flush()
    if out.isatty():
        out.write("\r" + " " * 60 + "\r")


async def _cache_demo(client: httpx.AsyncClient, out: Any) -> bool:
    """The same AI question asked five times (keys reordered, another user): one upstream call."""
    out.write("\n4. POST /api/ask: one question, asked 5 times (JSON keys reordered, `user` excluded from the key)\n")
    before = UPSTREAM_CALLS["/api/ask"]
    questions = [b'{"model": "m", "messages": [{"role": "user", "content": "What is 6 x 7?"}], "user": "ann"}',
                 b'{"messages":[{"content":"What is 6 x 7?","role":"user"}],"model":"m","user":"bob"}']
    for i in range(5):
        response = await client.post("/api/ask", content=questions[i % 2],
                                     headers={"content-type": "application/json"})
        out.write(f"  ask {i + 1}: {response.status_code}  Cache-Status: {response.headers.get('cache-status')}\n")
    calls = UPSTREAM_CALLS["/api/ask"] - before
    out.write(f"  the upstream answered {calls} of 5 asks; the cache answered the rest\n")
    return calls == 1


def _report(step: Step, out: Any) -> None:
    out.write(f"\n{step.title}\n")
    for group, counts in step.outcomes.items():
        allowed, limited = counts.get(200, 0), counts.get(429, 0)
        other = sum(n for status, n in counts.items() if status not in (200, 429))
        label = f"  {group:<26}" if group != "all" else "  "
        extra = f"  {other} other" if other else ""
        out.write(f"{label}{allowed:>3} allowed  {limited:>3} rate limited (429){extra}\n")
    for name, value in step.last_headers.items():
        out.write(f"    {name}: {value}\n")


async def _run(requests: int, out: Any) -> int:
    upstream_port, gateway_port, flaky_port = _free_port(), _free_port(), _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        policy_path = Path(tmp) / "demo.yaml"
        policy_path.write_text(DEMO_POLICY.format(upstream_port=upstream_port, flaky_port=flaky_port))
        gateway = create_app(policy_path)
        auth = _SampleAuth(sample_upstream)
        servers = [
            uvicorn.Server(uvicorn.Config(auth, port=upstream_port, log_level="error", lifespan="on",
                                          interface="asgi3")),
            uvicorn.Server(uvicorn.Config(gateway, port=gateway_port, log_level="error", lifespan="on",
                                          proxy_headers=False)),
        ]
        tasks = [asyncio.create_task(server.serve()) for server in servers]
        try:
            deadline = time.monotonic() + 10
            while not all(server.started for server in servers):
                if time.monotonic() > deadline or any(task.done() for task in tasks):
                    out.write("edgeway demo: the sample servers did not start\n")
                    return 1
                await asyncio.sleep(0.02)
            out.write(f"Edgeway demo: sample upstream on :{upstream_port}, gateway on :{gateway_port} "
                      "(memory store)\n")
            out.write(f"Policy:\n{policy_path.read_text()}\n")
            steps = [
                Step("1. POST /api/ai/chat from one client (limits 5/minute and 20/day by ip, checked together)",
                     "POST", "/api/ai/chat", requests // 4),
                Step("2. GET /api/search with two API keys and none (8/minute token bucket per X-Api-Key)",
                     "GET", "/api/search", requests,
                     headers=lambda i: {"x-api-key": "key-a"} if i % 3 == 0 else
                     ({"x-api-key": "key-b"} if i % 3 == 1 else {}),
                     group=lambda i: "X-Api-Key: key-a" if i % 3 == 0 else
                     ("X-Api-Key: key-b" if i % 3 == 1 else "no key (falls back to ip)")),
                Step("3. GET /docs (no policies: passed straight through)", "GET", "/docs", requests // 4,
                     limited=False),
            ]
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway_port}", timeout=5) as client:
                for step in steps:
                    await _drive(client, step, out)
                    _report(step, out)
                cached = await _cache_demo(client, out)
                breaker_ok = await _breaker_demo(client, flaky_port, out)
                session_problems = await _demo_sessions(client, auth, requests // 4, out)
                ready = (await client.get("/_edgeway/readyz")).json()
            out.write(f"\nreadyz: status={ready['status']} store={ready['store']['kind']} "
                      f"policy version={ready['policy']['version']}\n")
            if not cached:
                out.write("PROBLEM: the repeated question reached the upstream more than once\n")
                return 1
            if not breaker_ok:
                out.write("PROBLEM: the breaker did not open, short-circuit, probe and close as expected\n")
                return 1
            missing = sum(step.missing_fields for step in steps)
            if session_problems:
                out.write("PROBLEM: the protected route did not answer 401 / 200 with one provider call\n")
                return 1
            if missing:
                out.write(f"PROBLEM: {missing} limited response(s) lacked their RateLimit/Retry-After fields\n")
                return 1
            out.write("Every limited response carried RateLimit-Policy/RateLimit fields; every 429 carried "
                      "Retry-After and a JSON body with error=rate_limited.\n")
            return 0
        finally:
            for server in servers:
                server.should_exit = True
            await asyncio.gather(*tasks, return_exceptions=True)


class _FlakyUpstream:
    """The demo's failing upstream: answers 503 while ``failing``, counting the calls it gets."""

    def __init__(self) -> None:
        self.failing = True
        self.calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await sample_upstream(scope, receive, send)
            return
        self.calls += 1
        status, body = (503, b"down") if self.failing else (200, b"back")
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


async def _breaker_demo(client: httpx.AsyncClient, port: int, out: Any) -> bool:
    """Step 5: a failing upstream behind a breaker; True when it opened, short-circuited, probed and closed."""
    flaky = _FlakyUpstream()
    server = uvicorn.Server(uvicorn.Config(flaky, port=port, log_level="error", lifespan="on"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        out.write("\n5. GET /flaky/x while its upstream fails (breaker: failures 3, open_for 1s)\n")
        failing = [await client.get("/flaky/x") for _ in range(6)]
        opened = [r for r in failing if r.headers.get("edgeway-error") == "upstream_unavailable"]
        out.write(f"  {flaky.calls} reached the upstream (503), then the breaker opened: {len(opened)} answered by "
                  f"Edgeway without calling it (503 upstream_unavailable, Retry-After: "
                  f"{opened[0].headers.get('retry-after') if opened else '-'})\n")
        flaky.failing = False
        await asyncio.sleep(1.1)
        calls = flaky.calls
        probe = await client.get("/flaky/x")
        after = [await client.get("/flaky/x") for _ in range(3)]
        out.write(f"  upstream back; after open_for one probe went through ({probe.status_code}) and closed the "
                  f"breaker: the next {len(after)} requests got {', '.join(str(r.status_code) for r in after)}\n")
        return (calls, len(opened), probe.status_code, flaky.calls - calls) == (3, 3, 200, 4)
    finally:
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)


def run_demo(requests: int = 60, out: Any = None) -> int:
    """Run the demo and print its summary; returns the process exit code."""
    for name in ("edgeway", "httpx", "uvicorn"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return asyncio.run(_run(max(8, requests), out or sys.stdout))
