"""Commands per request on real Redis (README's table), and the month's budget use in readyz."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
import redis

from edgeway import gateway
from edgeway.middleware.cache import HOT_FOR
from tests.gateway.conftest import EchoApp
from tests.servers import RedisServer, UvicornThread


def gateway_policy(redis_url: str, echo_port: int, prefix: str, budget: str = "") -> str:
    return f"""
version: 1
store: {{ url: "{redis_url}", key_prefix: "{prefix}", timeout: 1s, instances: 1{budget} }}
upstreams:
  echo: {{ url: "http://127.0.0.1:{echo_port}" }}
routes:
  - match: {{ path: /api/* }}
    upstream: echo
    limits: [{{ rate: 1000/minute, key: ip }}, {{ rate: 10000/day, key: ip }}]
"""


class Monitor:
    """Commands clients send to Redis, seen with MONITOR (commands a script runs inside Redis are left out)."""

    def __init__(self, url: str) -> None:
        self._watcher = redis.Redis.from_url(url)
        self._client = redis.Redis.from_url(url)
        self._client.ping()  # its connection's handshake happens before the monitor starts
        self._monitor = self._watcher.monitor().__enter__()
        self._mark = f"edgeway-test-mark-{uuid.uuid4().hex}"

    def sent(self) -> list[str]:
        """Every command sent since start (by anyone but this monitor), up to now."""
        self._client.echo(self._mark)
        commands = []
        while True:
            seen = self._monitor.next_command()
            if self._mark in seen["command"]:
                break
            if seen["client_type"] != "lua":
                commands.append(seen["command"].split(" ", 1)[0].upper())
        self._monitor.__exit__()
        self._client.close()
        self._watcher.close()
        return commands


@pytest.mark.parametrize(("budget", "expected"), [("", 20), (", budget: 500000/month", 20)],
                         ids=["limits", "limits+budget"])
def test_commands_per_request_on_real_redis(redis_server: RedisServer, echo: EchoApp, budget: str,
                                            expected: int) -> None:
    """What README's table says: a route's limits cost one command per request; the budget adds one increment
    with an instance's first batch (the warm-up request here), then one per 500 commands (500000 // 1000) or 5
    minutes, folded into a batch: never a command of its own."""
    url = redis_server.url
    prefix = f"cpr-{uuid.uuid4().hex[:8]}:"
    app = gateway.create_app(gateway.load_text(gateway_policy(url, echo.port, prefix, budget)))  # type: ignore[attr-defined]
    with UvicornThread(app, proxy_headers=False) as served:
        assert httpx.get(f"{served.url}/api/warm-up").status_code == 200  # connects and loads its scripts
        monitor = Monitor(url)
        for n in range(20):
            assert httpx.get(f"{served.url}/api/{n}").status_code == 200
        sent = monitor.sent()
        assert len(sent) == expected, " ".join(sent)
        if budget:
            ready = httpx.get(f"{served.url}/_edgeway/readyz").json()
            assert ready["store"]["budget"]["used"] == 2 and ready["store"]["budget"]["limit"] == 500_000
            assert ready["store"]["budget"]["pending"] == 20


def policy_of_each(redis_url: str, echo_port: int, prefix: str) -> str:
    return f"""
version: 1
store: {{ url: "{redis_url}", key_prefix: "{prefix}", timeout: 1s, instances: 1 }}
upstreams:
  echo: {{ url: "http://127.0.0.1:{echo_port}" }}
  guarded:
    url: "http://127.0.0.1:{echo_port}"
    breaker: {{ failures: 3, open_for: 30s }}
routes:
  - match: {{ path: /cached/* }}
    upstream: echo
    cache: {{ ttl: 1h }}
  - match: {{ path: /guarded/* }}
    upstream: guarded
"""


def test_commands_per_request_of_the_cache_and_a_closed_breaker(redis_server: RedisServer, echo: EchoApp) -> None:
    """README's table: a cache hit is one GET (none while the entry is hot in memory); a miss that is stored
    costs its lookup, its fill lock and the fill; a closed breaker costs nothing per request."""
    url = redis_server.url
    prefix = f"cpr-{uuid.uuid4().hex[:8]}:"
    app = gateway.create_app(gateway.load_text(policy_of_each(url, echo.port, prefix)))  # type: ignore[attr-defined]
    with UvicornThread(app, proxy_headers=False) as served:
        assert httpx.get(f"{served.url}/cached/warm-up").status_code == 200
        assert httpx.get(f"{served.url}/guarded/warm-up").status_code == 200
        monitor = Monitor(url)
        for _ in range(20):
            assert httpx.get(f"{served.url}/guarded/x").status_code == 200
        assert monitor.sent() == []

        monitor = Monitor(url)
        miss = httpx.get(f"{served.url}/cached/new")
        assert miss.headers["cache-status"] == "edgeway; fwd=miss; stored"
        time.sleep(0.3)  # the fill is a deferred write: let it reach Redis before the mark
        missed = monitor.sent()

        monitor = Monitor(url)
        started = time.monotonic()
        for _ in range(10):
            assert httpx.get(f"{served.url}/cached/new").headers["cache-status"].startswith("edgeway; hit")
        elapsed = time.monotonic() - started
        hits = monitor.sent()
        # the first hit reads the entry; the next ones within HOT_FOR are answered from this instance's memory
        assert set(hits) == {"GET"} and 1 <= len(hits) <= 1 + int(elapsed / HOT_FOR), hits
    print("cache miss, stored:", " ".join(missed))
    assert missed[0] == "GET" and "SET" in missed
