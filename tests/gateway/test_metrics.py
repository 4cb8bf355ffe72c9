"""/_edgeway/metrics: every family is scraped, and they move as requests flow, in one process and under
``edgeway serve --workers 2`` (multiprocess mode: one scrape sums every worker, nothing counted twice)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgeway import gateway
from edgeway.middleware import metrics
from tests.gateway.conftest import EchoApp, Served, marker, serve_gateway, wait_until
from tests.servers import RedisServer, free_port


def scrape(url: str) -> dict[str, float]:
    """Samples of one scrape as ``name{label="value",...}`` (labels sorted) -> value; families as ``#name``."""
    response = httpx.get(f"{url}/_edgeway/metrics", timeout=10)
    assert response.status_code == 200, response.text
    text = response.text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        samples["#" + family.name] = 0.0
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(value for key, value in samples.items()
               if key.startswith(name + "{") and all(part in key for part in wanted))


def policy(echo_port: int, redis_url: str) -> str:
    return f"""
version: 1
store: {{ url: "{redis_url}", timeout: 1s }}
upstreams:
  echo: {{ url: "http://127.0.0.1:{echo_port}" }}
routes:
  - match: {{ path: /api/* }}
    upstream: echo
    limits: [{{ rate: 1000/minute, key: ip }}]
"""


@pytest.fixture(scope="module")
def redis_gw(echo: EchoApp, redis_server: RedisServer) -> Iterator[Served]:
    with serve_gateway(policy(echo.port, redis_server.url)) as served:  # type: ignore[attr-defined]
        yield served


def test_every_family_is_in_the_scrape(redis_gw: Served) -> None:
    samples = scrape(redis_gw.url)
    for family in metrics.FAMILIES:
        for described in family.describe():
            assert "#" + described.name in samples, described.name


def test_request_upstream_limit_and_store_families_move(redis_gw: Served) -> None:
    before = scrape(redis_gw.url)
    with httpx.Client() as client:
        for _ in range(5):
            assert client.get(f"{redis_gw.url}/api/{marker()}").status_code == 200
        assert client.get(f"{redis_gw.url}/nowhere").status_code == 404
    after = scrape(redis_gw.url)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("edgeway_requests_total", route="/api/*", method="GET", status="200") == 5
    assert moved("edgeway_requests_total", route="none", status="404") == 1
    assert moved("edgeway_request_duration_seconds_count", route="/api/*") == 5
    assert moved("edgeway_upstream_duration_seconds_count", upstream="echo") == 5
    assert moved("edgeway_ratelimit_decisions_total", route="/api/*", outcome="allowed") == 5
    assert moved("edgeway_store_commands_total", store="redis", kind="ratelimit") == 5
    assert moved("edgeway_store_call_duration_seconds_count", store="redis") >= 5
    assert total(after, "edgeway_store_mode", mode="redis") == 1
    assert total(after, "edgeway_policy_version", version=redis_gw.app.loaded.version) == 1


def test_store_memory_is_sampled_in_the_background(redis_gw: Served) -> None:
    assert wait_until(lambda: total(scrape(redis_gw.url), "edgeway_store_memory_used_bytes", store="redis") > 0)
    assert "edgeway_store_memory_max_bytes{store=\"redis\"}" in scrape(redis_gw.url)


async def test_reloads_are_counted_by_outcome(tmp_path: Path, echo: EchoApp) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(policy(echo.port, "memory://"))  # type: ignore[attr-defined]
    app = gateway.create_app(path)
    ok = metrics.POLICY_RELOADS.labels("ok")._value.get()
    failed = metrics.POLICY_RELOADS.labels("failed")._value.get()
    path.write_text("version: 1\nroutes: [}")
    assert not await app.reload()
    path.write_text(policy(echo.port, "memory://").replace("1000/minute", "999/minute"))  # type: ignore[attr-defined]
    assert await app.reload()
    assert metrics.POLICY_RELOADS.labels("ok")._value.get() == ok + 1
    assert metrics.POLICY_RELOADS.labels("failed")._value.get() == failed + 1
    assert metrics.POLICY_VERSION.labels(app.loaded.version)._value.get() == 1
    await app.close()


def test_exported_names_cover_suffixes() -> None:
    names = metrics.exported_names()
    assert {"edgeway_requests_total", "edgeway_upstream_duration_seconds_bucket",
            "edgeway_breaker_state", "edgeway_cache_stored_bytes_total"} <= names


# --------------------------------------------------------------------------- edgeway serve --workers 2


def serve(policy_file: Path, port: int, tmp: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TMPDIR": str(tmp)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return subprocess.Popen(
        [sys.executable, "-m", "edgeway.gateway.cli", "serve", "--policy", str(policy_file), "--port", str(port),
         *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def stop(process: subprocess.Popen[str]) -> tuple[str, str]:
    process.send_signal(signal.SIGINT)
    try:
        return process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()


def test_workers_2_one_scrape_counts_every_worker_once(tmp_path: Path, echo: EchoApp,
                                                       redis_server: RedisServer) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(policy(echo.port, redis_server.url))  # type: ignore[attr-defined]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = serve(policy_file, port, tmp_path, "--workers", "2", "--access-log", "off")
    try:
        version = gateway.load_policy(policy_file).version

        def both_workers_up() -> bool:
            try:
                return total(scrape(url), "edgeway_policy_version", version=version) == 2
            except httpx.HTTPError:
                return False

        assert wait_until(both_workers_up, timeout=30), "two workers never reported"
        assert len(list(tmp_path.glob("edgeway-metrics-*"))) == 1
        requests = 40
        for _ in range(requests):  # a new connection each time, so both workers answer some
            assert httpx.get(f"{url}/api/{marker()}").status_code == 200
        scrapes = [scrape(url) for _ in range(6)]  # whichever worker answers, the sums are the same
        for samples in scrapes:
            assert total(samples, "edgeway_requests_total", route="/api/*", status="200") == requests
            assert total(samples, "edgeway_ratelimit_decisions_total", outcome="allowed") == requests
            assert total(samples, "edgeway_store_commands_total", store="redis", kind="ratelimit") == requests
            assert total(samples, "edgeway_upstream_duration_seconds_count", upstream="echo") == requests
            assert total(samples, "edgeway_store_mode", mode="redis") == 2
            for family in metrics.FAMILIES:  # even families no worker has recorded yet
                for described in family.describe():
                    assert "#" + described.name in samples, described.name
    finally:
        out, err = stop(process)
    assert process.returncode == 0, err
    assert not out.strip(), "--access-log off wrote access lines"
    assert not list(tmp_path.glob("edgeway-metrics-*")), "the private metrics directory was left behind"
