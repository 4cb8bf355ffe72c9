"""Reload: under load with zero failed requests, --watch, and one SIGHUP reloading every worker of
``edgeway serve --workers 2``; an invalid policy is refused with its problems and the old one keeps serving."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgeway import gateway
from tests.gateway.conftest import EchoApp, marker, wait_until
from tests.gateway.test_metrics import scrape, total
from tests.servers import UvicornThread, free_port

TOKEN = "reload-admin-token"


def policy(echo_port: int, rate: str = "100000/minute") -> str:
    return f"""
version: 1
upstreams:
  echo: {{ url: "http://127.0.0.1:{echo_port}" }}
routes:
  - match: {{ path: /api/* }}
    upstream: echo
    limits: [{{ rate: {rate}, key: ip }}]
admin:
  token: "{TOKEN}"
"""


class Load:
    """Requests sent back to back from a thread until stopped; every status that is not 200 is kept."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    status = client.get(f"{self.url}/api/{marker()}").status_code
                except httpx.HTTPError as error:
                    self.failures.append(repr(error))
                    continue
                self.sent += 1
                if status != 200:
                    self.failures.append(str(status))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def policy_file(tmp_path: Path, echo: EchoApp) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(policy(echo.port))  # type: ignore[attr-defined]
    return path


@pytest.fixture
def watched(policy_file: Path) -> Iterator[tuple[gateway.Gateway, str]]:
    app = gateway.create_app(policy_file, watch=0.02)
    with UvicornThread(app, http="httptools", proxy_headers=False) as server:
        yield app, server.url


def test_reloads_under_load_fail_no_request(policy_file: Path, echo: EchoApp) -> None:
    app = gateway.create_app(policy_file)
    versions = set()
    with UvicornThread(app, http="httptools", proxy_headers=False) as server, Load(server.url) as load:
        for n in range(8):
            policy_file.write_text(policy(echo.port, rate=f"{100000 + n}/minute"))  # type: ignore[attr-defined]
            answer = httpx.post(f"{server.url}/_edgeway/reload", headers={"authorization": f"Bearer {TOKEN}"})
            assert answer.status_code == 200
            versions.add(answer.json()["version"])
            enough = 5 * (n + 1)
            assert wait_until(lambda: load.sent > enough)  # noqa: B023 - called before the loop moves on
    assert len(versions) == 8 and app.loaded.version in versions
    assert load.sent > 40 and load.failures == []


def test_watch_applies_a_changed_file_and_refuses_an_invalid_one(watched: tuple[gateway.Gateway, str],
                                                                  policy_file: Path, echo: EchoApp,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    app, url = watched
    first = app.loaded.version
    policy_file.write_text(policy(echo.port, rate="7/minute"))  # type: ignore[attr-defined]
    assert wait_until(lambda: app.loaded.version != first)
    changed = app.loaded.version
    assert app.loaded.policy.routes[0].limits[0].rate.quota == 7
    policy_file.write_text(policy(echo.port, rate="7/fortnight"))  # type: ignore[attr-defined]
    assert wait_until(lambda: "policy reload failed" in caplog.text)
    assert f"{policy_file}:8:" in caplog.text
    assert app.loaded.version == changed
    assert httpx.get(f"{url}/api/{marker()}").status_code == 200


def test_one_sighup_reloads_every_worker(tmp_path: Path, policy_file: Path, echo: EchoApp) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out, err = (tmp_path / "out.log").open("w"), (tmp_path / "err.log").open("w")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "edgeway.gateway.cli", "serve", "--policy", str(policy_file), "--port", str(port),
         "--workers", "2", "--access-log", "off"], env=env, stdout=out, stderr=err)
    try:
        first = gateway.load_policy(policy_file).version

        def serving(version: str) -> bool:
            try:
                return total(scrape(url), "edgeway_policy_version", version=version) == 2
            except httpx.HTTPError:
                return False

        assert wait_until(lambda: serving(first), timeout=30)
        policy_file.write_text(policy(echo.port, rate="99999/minute"))  # type: ignore[attr-defined]
        second = gateway.load_policy(policy_file).version
        with Load(url) as load:
            assert wait_until(lambda: load.sent > 10)
            process.send_signal(signal.SIGHUP)
            assert wait_until(lambda: serving(second), timeout=15), "not every worker reloaded"
            sent = load.sent
            assert wait_until(lambda: load.sent > sent + 10)
        assert load.failures == []
        assert total(scrape(url), "edgeway_policy_version", version=first) == 0
        assert total(scrape(url), "edgeway_policy_reloads_total", outcome="ok") == 2

        policy_file.write_text(policy(echo.port, rate="5/fortnight"))  # type: ignore[attr-defined]
        process.send_signal(signal.SIGHUP)
        log = tmp_path / "err.log"
        assert wait_until(lambda: log.read_text().count(f"{policy_file}:8:") == 2, timeout=15)
        assert serving(second)
        assert httpx.get(f"{url}/api/{marker()}").status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        out.close()
        err.close()
    assert process.returncode == 0
