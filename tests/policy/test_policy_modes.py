"""In-app and gateway policies, the policy's identity in store keys, config traps and warnings."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest

from edgeway.gateway.app import create_app
from edgeway.gateway.cli import main
from edgeway.gateway.embed import Edgeway
from edgeway.gateway.errors import PolicyError
from edgeway.gateway.loader import load_text
from edgeway.middleware.store import Command, RateLimit, StoreConfigurationError
from edgeway.middleware.store.memory import MemoryStore

IN_APP = """\
version: 1
routes:
  - match: { path: /api/*, methods: POST }
    limits: [{ rate: 10/minute }]
"""

GATEWAY = """\
version: 1
upstreams:
  api: { url: "http://127.0.0.1:9001" }
routes:
  - match: { path: /api/* }
    upstream: api
    limits: [{ rate: 10/minute }]
"""


def problems(text: str, environ: dict[str, str] | None = None, **options: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_text(textwrap.dedent(text), "p.yaml", environ or {}, **options)  # type: ignore[arg-type]
    return str(caught.value).splitlines()


# -- 2. in-app policies need no upstreams -------------------------------------------------------------


def test_a_policy_without_upstreams_is_an_in_app_policy() -> None:
    loaded = load_text(IN_APP, "p.yaml", {})
    assert loaded.mode == "in-app" and loaded.policy.upstreams == {}
    assert load_text(GATEWAY, "p.yaml", {}).mode == "gateway"


def test_check_validates_in_app_policies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "app.yaml"
    path.write_text(IN_APP)
    assert main(["check", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: ok (version {load_text(IN_APP).version}): in-app policy, 1 route(s), " \
                                      "1 limit(s), store memory://\n"
    gateway = tmp_path / "gateway.yaml"
    gateway.write_text(GATEWAY)
    assert main(["check", "--in-app", str(gateway)]) == 0
    assert "in-app policy" in capsys.readouterr().out


def test_a_gateway_needs_an_upstream_on_every_route(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mixed = GATEWAY + "  - match: { path: /other }\n"
    assert problems(mixed) == [
        "p.yaml:8:5: this route has no upstream: the gateway proxies every route to one (only in-app policies may "
        "leave it out)"
    ]
    path = tmp_path / "app.yaml"
    path.write_text(IN_APP)
    assert main(["serve", "--policy", str(path)]) == 1
    assert f"{path}:3:5: this route has no upstream" in capsys.readouterr().err
    with pytest.raises(PolicyError, match="this route has no upstream"):
        create_app(str(path))


# -- 4. the policy's identity in every key; routes by id, never by position ------------------------------


class RecordingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.keys: list[str] = []

    async def execute(self, commands: Sequence[Command], *, timeout: float | None = None) -> list[object]:
        self.keys.extend(check.key for command in commands if isinstance(command, RateLimit)
                         for check in command.checks)
        return await super().execute(commands, timeout=timeout)


async def keys_for(text: str, path: str = "/api/chat") -> list[str]:
    store = RecordingStore()

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    wrapped = Edgeway(load_text(textwrap.dedent(text), "p.yaml", {}), store=store).wrap(app)
    transport = httpx.ASGITransport(app=wrapped, client=("198.51.100.1", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        await http.post(path)
    return store.keys


async def test_keys_hold_the_policy_name_and_the_route_id_not_its_position() -> None:
    (key,) = await keys_for(IN_APP.replace("version: 1", "version: 1\nname: shop"))
    assert key.startswith("edgeway:shop:rl:") and "/api/*@POST" in key and "0:/api" not in key
    inserted_above = IN_APP.replace("version: 1", "version: 1\nname: shop").replace(
        "routes:\n", "routes:\n  - match: { path: /health }\n    limits: [{ rate: 5/second }]\n")
    assert await keys_for(inserted_above) == [key]  # a new route above does not reset this one's counters
    (other_app,) = await keys_for(IN_APP.replace("version: 1", "version: 1\nname: blog"))
    assert other_app != key and other_app.startswith("edgeway:blog:rl:")


async def test_an_explicit_route_id_names_the_counters() -> None:
    text = IN_APP.replace("  - match: { path: /api/*, methods: POST }",
                          "  - match: { path: /api/*, methods: POST }\n    id: chat")
    (key,) = await keys_for(text)
    assert key.startswith("edgeway:default:rl:") and "chat" in key and "/api/*" not in key


def test_route_ids_must_be_unique() -> None:
    text = IN_APP + "  - match: { path: /other }\n    id: /api/*@POST\n"
    assert problems(text) == [
        "p.yaml:6:9: duplicate route id '/api/*@POST': routes[0] has it too (give one of them its own id:)"
    ]


async def test_the_heartbeat_set_holds_the_policy_name(redis_url: str) -> None:
    import redis

    text = IN_APP.replace("version: 1", f"version: 1\nname: hb-shop\nstore: {{ url: '{redis_url}' }}")
    edgeway = Edgeway(load_text(text, "p.yaml", {}))

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=edgeway.wrap(app)), base_url="http://t") as http:
        assert (await http.post("/api/x")).status_code == 200
    client = redis.Redis.from_url(redis_url)
    try:
        instance = edgeway.store.instance_id  # type: ignore[attr-defined]
        for _ in range(100):  # the heartbeat task runs right after the first request; bounded wait
            if instance.encode() in client.zrange("edgeway:hb-shop:instances", 0, -1):
                break
            await asyncio.sleep(0.05)
        assert client.zrange("edgeway:hb-shop:instances", 0, -1) == [instance.encode()]
    finally:
        client.close()
        await edgeway.store.close()


# -- 5. store mistakes before traffic -------------------------------------------------------------------


def test_upstash_without_its_environment_is_a_positioned_problem() -> None:
    text = GATEWAY.replace("version: 1", "version: 1\nstore: { url: 'upstash://' }")
    assert problems(text) == [
        "p.yaml:2:15: Upstash needs a URL and token: set UPSTASH_REDIS_REST_URL and UPSTASH_REDIS_REST_TOKEN, "
        "or use upstash+https://TOKEN@your-db.upstash.io"
    ]
    env = {"UPSTASH_REDIS_REST_URL": "https://eu1.upstash.io", "UPSTASH_REDIS_REST_TOKEN": "t"}
    assert load_text(text, "p.yaml", env).policy.store.url == "upstash://"


def test_unknown_store_url_options_are_refused() -> None:
    text = GATEWAY.replace("version: 1", "version: 1\nstore: { url: 'rediss://h:6380?ssl_cert_req=none' }")
    assert problems(text) == [
        "p.yaml:2:15: unknown option(s) ssl_cert_req in store URL 'rediss://h:6380?ssl_cert_req=none': supported "
        "are db, username, password, ssl_cert_reqs, ssl_ca_certs"
    ]


# -- 7. config traps ------------------------------------------------------------------------------------


def test_a_single_method_needs_no_list() -> None:
    loaded = load_text(GATEWAY.replace("{ path: /api/* }", "{ path: /api/*, methods: post }"), "p.yaml", {})
    assert loaded.policy.routes[0].match.methods == ("POST",)


def test_a_duration_without_unit_is_a_positioned_problem_with_a_suggestion() -> None:
    text = GATEWAY.replace("version: 1", "version: 1\nstore: { timeout: 50 }")
    assert problems(text) == ["p.yaml:2:19: store.timeout: 50 has no unit: add one, e.g. 50ms or 50s"]


# -- warnings -----------------------------------------------------------------------------------------


def test_check_warns_when_nothing_can_supply_the_user(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(GATEWAY.replace("rate: 10/minute }", "rate: 10/minute, key: user }"))
    assert main(["check", str(path)]) == 0
    warning, ok = capsys.readouterr().out.splitlines()
    assert warning == (f"{path}:7:38: warning: this limit is keyed by user, but nothing on this route supplies one "
                       "(no session:, no user_from:), so on_missing (ip) decides every request")
    assert ok.startswith(f"{path}: ok")
    path.write_text(GATEWAY.replace("rate: 10/minute }", "rate: 10/minute, key: user }").replace(
        "version: 1", "version: 1\nuser_from: header:X-User-Id\ntrusted_proxies: [10.0.0.0/8]"))
    assert main(["check", str(path)]) == 0
    assert "warning" not in capsys.readouterr().out


def test_check_warns_about_a_shared_store_without_a_name() -> None:
    text = GATEWAY.replace("version: 1", "version: 1\nstore: { url: 'redis://127.0.0.1:6390' }")
    (warning,) = load_text(text, "p.yaml", {}).warnings
    assert warning.message.startswith("warning: no name: set;")
    assert load_text(text.replace("version: 1", "version: 1\nname: shop"), "p.yaml", {}).warnings == ()


def test_user_from_without_trusted_proxies_is_a_warning() -> None:
    (warning,) = load_text(IN_APP.replace("version: 1", "version: 1\nuser_from: header:X-User-Id"), "p.yaml",
                           {}).warnings
    assert (warning.line, warning.col) == (2, 12) and "believed only from trusted_proxies" in warning.message


# -- 8. extras with an exact message -----------------------------------------------------------------------


def test_the_postgres_fallback_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # as if the extra were not installed
    text = GATEWAY.replace("version: 1", "version: 1\nstore:\n  fallback:\n    - postgres: { dsn: 'postgres://x' }")
    assert problems(text) == [
        "p.yaml:4:17: the postgres fallback needs asyncpg, which is not installed: pip install 'edgeway[postgres]'"
    ]
    from edgeway.middleware.store.postgres import PostgresStore

    with pytest.raises(StoreConfigurationError, match=r"pip install 'edgeway\[postgres\]'"):
        PostgresStore("postgres://x")


def test_the_upstash_bridge_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delitem(sys.modules, "edgeway.gateway.upstash_bridge", raising=False)
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    assert main(["upstash-bridge"]) == 1
    assert "pip install 'edgeway[bridge]'" in capsys.readouterr().err



def test_server_settings_in_an_in_app_policy_are_a_warning() -> None:
    (warning,) = load_text(IN_APP.replace("version: 1", "version: 1\nserver: { header_timeout: 5s }"), "p.yaml",
                           {}).warnings
    assert (warning.line, warning.col) == (2, 1)
    assert warning.message.startswith("warning: server: configures the connections `edgeway serve` accepts")
