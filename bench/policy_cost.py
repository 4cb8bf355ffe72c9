"""What a route's policies cost the gateway per request, timed in-process, away from wrk's noise.

    .venv/bin/python bench/policy_cost.py --redis redis://127.0.0.1:PORT POLICY.yaml [POLICY.yaml ...]
                                          [--requests 20000] [--rounds 7]

Each policy file (``bench/run.py`` passes the ones it wrote for edgeway-2-limits, breaker-closed and
session-warm) becomes a :class:`~edgeway.gateway.app.Gateway` on the given Redis, with every route's
upstream replaced by an app that answers a 1 KB body at once. Requests (``GET /1k.txt``, with the bench's
bearer token) go through ``Gateway.__call__`` from 16 tasks; the figure is the process' CPU time
(``time.process_time``) per request, the median over ``rounds`` rounds run in turn, so what differs
between two files is what their policies cost: the closed breaker, the warm session check. Prints one
JSON object: file stem -> microseconds. Point ``--redis`` at a private server (bench/run.py uses the
edgeway-2-limits target's own): the requests write rate-limit counters there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

TASKS = 16
BODY = b"x" * 1024


async def _instant(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"1024")]})
    await send({"type": "http.response.body", "body": BODY})


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: dict[str, Any]) -> None:
    return None


def _gateway(path: Path, redis_url: str) -> Any:
    from edgeway.gateway.app import Gateway
    from edgeway.gateway.loader import load_text
    from edgeway.middleware.pipeline import PolicyPipeline

    policy = json.loads(path.read_text())
    policy["store"] = {"url": redis_url}
    gateway = Gateway(load_text(json.dumps(policy), str(path)))
    for route in gateway._active.routes.routes:
        if isinstance(route.app, PolicyPipeline):
            route.app.app = _instant
    return gateway


async def _drive(gateway: Any, requests: int, authorization: bytes) -> None:
    def scope() -> dict[str, Any]:
        return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                "scheme": "http", "path": "/1k.txt", "raw_path": b"/1k.txt", "query_string": b"",
                "root_path": "", "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8080),
                "headers": [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"wrk"), (b"accept", b"*/*"),
                            (b"authorization", authorization)]}

    async def worker(count: int) -> None:
        for _ in range(count):
            await gateway(scope(), _receive, _send)

    await asyncio.gather(*(worker(requests // TASKS) for _ in range(TASKS)))


async def measure(paths: list[Path], redis_url: str, requests: int, rounds: int, authorization: bytes
                  ) -> dict[str, float]:
    """Median CPU microseconds per request of each policy file's gateway."""
    gateways = {path.stem: _gateway(path, redis_url) for path in paths}
    for gateway in gateways.values():
        await _drive(gateway, 2000, authorization)  # warm: connections, scripts, caches
    spent: dict[str, list[float]] = {name: [] for name in gateways}
    for _ in range(rounds):
        for name, gateway in gateways.items():
            started = time.process_time()
            await _drive(gateway, requests, authorization)
            spent[name].append((time.process_time() - started) / requests * 1e6)
    for gateway in gateways.values():
        await gateway.close()
    return {name: statistics.median(values) for name, values in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policies", nargs="+", type=Path)
    parser.add_argument("--redis", required=True, help="a private Redis the requests may write to")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--authorization", default="", help="the Authorization value every request sends")
    args = parser.parse_args()
    import uvloop

    costs = uvloop.run(measure(args.policies, args.redis, args.requests, args.rounds,
                               args.authorization.encode("latin-1")))
    print(json.dumps(costs))


if __name__ == "__main__":
    main()
