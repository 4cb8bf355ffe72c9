"""`edgeway serve` before traffic: the startup block, --require-store, --help defaults; store URL options."""

from __future__ import annotations

import logging
import shutil
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from edgeway.gateway import cli
from edgeway.middleware.store import Get, Set, StoreConfigurationError, connect_store
from edgeway.middleware.store.redis import RedisAddress
from tests.servers import free_port

POLICY = """\
version: 1
name: shop
store:
  url: {url}
upstreams:
  api: {{ url: "http://127.0.0.1:9001" }}
routes:
  - match: {{ path: /api/*, methods: [GET, POST] }}
    upstream: api
    limits: [{{ rate: 10/minute }}, {{ rate: 100/day, key: "header:X-Api-Key" }}]
  - match: {{ path: /* }}
    upstream: api
"""


@pytest.fixture
def no_uvicorn(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    import uvicorn

    runs: list[dict[str, object]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: runs.append(kwargs))
    return runs


def policy_file(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(POLICY.format(url=url))
    return path


def test_startup_block_names_policy_address_stores_and_routes(
    tmp_path: Path, redis_url: str, no_uvicorn: list[dict[str, object]], caplog: pytest.LogCaptureFixture
) -> None:
    path = policy_file(tmp_path, redis_url)
    with caplog.at_level(logging.INFO, logger="edgeway"):
        assert cli.main(["serve", "--policy", str(path), "--port", "8099"]) == 0
    (block,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("starting")]
    lines = block.splitlines()
    assert lines[1].startswith(f"policy {path} (version ") and lines[1].endswith(", name shop)")
    assert lines[2:] == [
        "  listening on http://127.0.0.1:8099 (1 worker)",
        "  store chain (key prefix edgeway:shop:):",
        f"    primary {redis_url}: reachable",
        "    fallback memory://: reachable",
        "  routes (2):",
        "    GET,POST /api/* -> api [id /api/*@GET,POST]: limits 10/minute by ip, 100/day by header:x-api-key",
        "    * /* -> api [id /*]: no policies",
    ]
    assert len(no_uvicorn) == 1 and no_uvicorn[0]["port"] == 8099


def test_an_unreachable_primary_is_shown_and_require_store_refuses_to_start(
    tmp_path: Path, no_uvicorn: list[dict[str, object]], caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()  # nothing listens there
    path = policy_file(tmp_path, f"redis://127.0.0.1:{port}")
    with caplog.at_level(logging.INFO, logger="edgeway"):
        assert cli.main(["serve", "--policy", str(path)]) == 0
    assert f"    primary redis://127.0.0.1:{port}/0: UNREACHABLE: cannot connect to Redis" in caplog.text
    assert cli.main(["serve", "--policy", str(path), "--require-store"]) == 1
    assert capsys.readouterr().err.startswith(
        f"edgeway serve: --require-store: the primary store redis://127.0.0.1:{port}/0 cannot be reached (")
    assert len(no_uvicorn) == 1  # only the run without --require-store started


def test_serve_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 127.0.0.1)", "(default: 8080)", "(default: 1)", "(default: info)",
                  "--require-store refuse to start"):
        assert shown in text


@pytest.mark.parametrize(
    ("url", "fields"),
    [
        ("redis://h:6380/2", {"host": "h", "port": 6380, "db": 2, "tls": False}),
        ("redis://h?db=3&username=app&password=s%21", {"db": 3, "username": "app", "password": "s!"}),
        ("redis://app:pw@h", {"username": "app", "password": "pw"}),
        ("rediss://h?ssl_cert_reqs=none", {"tls": True, "cert_reqs": "none"}),
        ("rediss://h?ssl_ca_certs=/etc/ca.pem", {"tls": True, "cert_reqs": "required", "ca_file": "/etc/ca.pem"}),
        ("unix:///run/redis.sock?db=1", {"socket": "/run/redis.sock", "db": 1}),
    ],
)
def test_store_url_options(url: str, fields: dict[str, object]) -> None:
    address = RedisAddress.parse(url)
    assert {name: getattr(address, name) for name in fields} == fields


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://h?timeout=3", "unknown option(s) timeout in store URL 'redis://h?timeout=3': supported are db, "
                                "username, password, ssl_cert_reqs, ssl_ca_certs"),
        ("redis://h?ssl_cert_reqs=none", "ssl_* options need a rediss:// URL"),
        ("rediss://h?ssl_cert_reqs=maybe", "bad ssl_cert_reqs 'maybe'"),
        ("unix://", "a unix:// URL needs a socket path"),
        ("redis://:hunter2@h?x=1", "'redis://:***@h?x=1'"),
    ],
)
def test_bad_store_url_options_are_refused(url: str, message: str) -> None:
    with pytest.raises(StoreConfigurationError) as caught:
        RedisAddress.parse(url)
    assert message in str(caught.value) and "hunter2" not in str(caught.value)


def test_tls_verification_follows_the_url() -> None:
    strict = RedisAddress.parse("rediss://h").ssl_context()
    assert strict is not None and strict.verify_mode == ssl.CERT_REQUIRED and strict.check_hostname
    loose = RedisAddress.parse("rediss://h?ssl_cert_reqs=none").ssl_context()
    assert loose is not None and loose.verify_mode == ssl.CERT_NONE and not loose.check_hostname
    assert RedisAddress.parse("redis://h").ssl_context() is None


async def test_a_unix_socket_store_talks_to_a_real_redis() -> None:
    executable = shutil.which("redis-server")
    assert executable is not None, "redis-server is needed (scripts/test installs it)"
    folder = Path(tempfile.mkdtemp(prefix="edgeway-unix-"))
    socket = folder / "redis.sock"
    process = subprocess.Popen([executable, "--port", "0", "--unixsocket", str(socket), "--save", "",
                                "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not socket.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        store = connect_store(f"unix://{socket}?db=1", timeout=2.0)
        assert store.describe() == f"unix://{socket}?db=1"
        await store.execute([Set("edgeway:t:k", "v", 10_000)])
        assert await store.execute([Get("edgeway:t:k")]) == ["v"]
        await store.close()
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)
