"""POST /_edgeway/reload?all=1 across two gateway processes sharing a real Redis: every instance re-reads its
own file, and status lists the version each serves."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from edgeway import gateway
from tests.gateway.conftest import EchoApp, wait_until
from tests.gateway.test_metrics import serve, stop
from tests.servers import RedisServer, free_port, wait_for_port

TOKEN = "broadcast-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def policy(redis_url: str, echo_port: int, rate: str) -> str:
    return f"""
version: 1
store: {{ url: "{redis_url}", key_prefix: "bcast:", timeout: 1s }}
upstreams:
  echo: {{ url: "http://127.0.0.1:{echo_port}" }}
routes:
  - match: {{ path: /api/* }}
    upstream: echo
    limits: [{{ rate: {rate}, key: ip }}]
admin:
  token: "{TOKEN}"
"""


@dataclass
class Instance:
    file: Path
    url: str
    process: subprocess.Popen[str]

    def status(self) -> dict[str, object]:
        answer: dict[str, object] = httpx.get(f"{self.url}/_edgeway/status", headers=AUTH, timeout=10).json()
        return answer


@pytest.fixture
def instances(tmp_path: Path, echo: EchoApp, redis_server: RedisServer) -> Iterator[list[Instance]]:
    started: list[Instance] = []
    with ExitStack() as stack:
        for name in ("a", "b"):
            folder = tmp_path / name
            folder.mkdir()
            file = folder / "policy.yaml"
            file.write_text(policy(redis_server.url, echo.port, "100/minute"))  # type: ignore[attr-defined]
            port = free_port()
            process = serve(file, port, folder, "--access-log", "off")
            stack.callback(stop, process)
            wait_for_port(port, timeout=30)
            started.append(Instance(file, f"http://127.0.0.1:{port}", process))
        for instance in started:  # a first request starts each one's heartbeat: they learn of each other
            httpx.get(f"{instance.url}/api/x")
        yield started


def test_broadcast_reload_reaches_every_instance(instances: list[Instance], echo: EchoApp,
                                                 redis_server: RedisServer) -> None:
    a, b = instances
    ids = {a.status()["instance"]["id"], b.status()["instance"]["id"]}  # type: ignore[index]
    assert wait_until(lambda: {i["id"] for i in a.status()["instances"]} == ids, timeout=15)  # type: ignore[attr-defined]

    for instance in instances:
        instance.file.write_text(policy(redis_server.url, echo.port, "200/minute"))  # type: ignore[attr-defined]
    new = gateway.load_policy(a.file).version
    answer = httpx.post(f"{a.url}/_edgeway/reload?all=1", headers=AUTH, timeout=10)
    assert answer.status_code == 200
    body = answer.json()
    assert body["broadcast"] is True and body["version"] == new
    assert {(i["id"], i["version"], i["reloaded"]) for i in body["instances"]} == {(i, new, True) for i in ids}
    assert {i["id"]: i["version"] for i in b.status()["instances"]} == dict.fromkeys(ids, new)  # type: ignore[attr-defined]


def test_broadcast_reports_an_instance_whose_file_is_invalid(instances: list[Instance], echo: EchoApp,
                                                             redis_server: RedisServer) -> None:
    a, b = instances
    old_b = b.status()["policy"]["version"]  # type: ignore[index]
    a.file.write_text(policy(redis_server.url, echo.port, "300/minute"))  # type: ignore[attr-defined]
    b.file.write_text(policy(redis_server.url, echo.port, "300/fortnight"))  # type: ignore[attr-defined]
    body = httpx.post(f"{a.url}/_edgeway/reload?all=1", headers=AUTH, timeout=10).json()
    (other,) = [i for i in body["instances"] if i["id"] == b.status()["instance"]["id"]]  # type: ignore[index]
    assert other["reloaded"] is False and other["version"] == old_b
    assert other["problems"][0].startswith(f"{b.file}:9:22: routes.0.limits.0.rate: bad rate")
    assert b.status()["policy"]["version"] == old_b  # type: ignore[index]
