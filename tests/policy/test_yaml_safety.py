"""Hostile and surprising YAML: alias bombs, deep nesting, YAML 1.1 booleans, size caps, syntax errors.

Every one ends in ``FILE:LINE:COL: message`` lines from ``edgeway check`` (exit 1), never a traceback,
a MemoryError or a stall.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edgeway.gateway import app as gateway_app
from edgeway.gateway.app import create_app
from edgeway.gateway.errors import PolicyError
from edgeway.gateway.loader import MAX_BYTES, MAX_DEPTH, load_policy, load_text

FIXTURES = Path(__file__).parent / "fixtures"

BASE = """\
version: 1
upstreams:
  api: { url: "http://127.0.0.1:9001" }
routes:
  - match: { path: /api/* }
    upstream: api
"""


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_text(text, "p.yaml", {})
    return str(caught.value).splitlines()


def check(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeway.gateway.cli", "check", str(path)],
                          capture_output=True, text=True, timeout=60, env=env)


def alias_bomb() -> str:
    """Nine levels of nine aliases: 9**9 leaves once expanded (the 617-byte policy of the report)."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 9):
        refs = ", ".join([f"*a{level - 1}"] * 9)
        lines.append(f"a{level}: &a{level} [{refs}]")
    return BASE + "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_at_its_first_anchor(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    result = check(path)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{path}:7:5: anchors (&name) are not allowed in a policy: write the value out"]
    assert "Traceback" not in result.stderr


def test_recursive_alias_is_a_positioned_problem() -> None:
    assert problems("x: &r [*r]\n") == ["p.yaml:1:4: anchors (&name) are not allowed in a policy: write the value out"]


def test_alias_without_anchor_is_refused() -> None:
    assert problems("version: *v\n") == ["p.yaml:1:10: aliases (*name) are not allowed in a policy: write the "
                                         "value out"]


@pytest.mark.parametrize("opener,closer", [("[", "]"), ("{a: ", "}")], ids=["sequences", "mappings"])
def test_ten_thousand_nested_levels_give_one_problem(tmp_path: Path, opener: str, closer: str) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("x: " + opener * 10_000 + "1" + closer * 10_000 + "\n")
    result = check(path)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{path}:1:")
    assert lines[0].endswith(f"nesting deeper than {MAX_DEPTH} levels is not allowed in a policy")
    assert "RecursionError" not in result.stdout + result.stderr


def test_tags_are_refused() -> None:
    assert problems("version: !!int 1\n") == ["p.yaml:1:10: YAML tags (!!int) are not allowed: policies are plain "
                                              "YAML"]
    assert problems("x: !!python/object:os.system ls\n")[0].startswith("p.yaml:1:4: YAML tags (!!python/object")


def test_tilde_only_document_says_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "null.yaml"
    path.write_text("~\n")
    result = check(path)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{path}:1:1: the policy holds only null (~): it must be a mapping with version and routes"]


def test_file_over_one_megabyte_is_refused_without_parsing(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    route = "  - match: { path: /r/* }\n    upstream: api\n"
    path.write_text(BASE + route * (MAX_BYTES // len(route) + 1))
    result = check(path)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [f"{path}:1:1: the policy file is over 1000000 bytes (1 MB), the limit "
                                          "for a policy"]
    assert problems(BASE + "#" * MAX_BYTES) == [f"p.yaml:1:1: the policy file is {len(BASE) + MAX_BYTES} bytes; "
                                                "the limit is 1000000 (1 MB)"]


def test_bad_indentation_is_file_line_col(tmp_path: Path) -> None:
    path = tmp_path / "indent.yaml"
    path.write_text("version: 1\nupstreams:\n  api:\n    url: http://127.0.0.1:9001\n   bad: 1\n")
    result = check(path)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{path}:5:4: invalid YAML: expected <block end>, but found '<block mapping start>' while parsing a "
        "block mapping; check the indentation"]


@pytest.mark.parametrize(
    "word,value",
    [("on", "on"), ("off", "off"), ("yes", "yes"), ("no", "no"), ("y", "y"), ("n", "n"), ("On", "On"),
     ("true", True), ("false", False), ("True", True), ("FALSE", False), ("~", None), ("null", None),
     ("12", 12), ("0o17", 15), ("0x1f", 31), ("1.5", 1.5), ("017", 17), ("1_000", "1_000"),
     ("2024-01-01", "2024-01-01"), ("'true'", "true")],
)
def test_scalars_follow_yaml_1_2_core_schema(word: str, value: object) -> None:
    from edgeway.gateway.loader import parse_yaml

    data, built = parse_yaml(f"k: {word}\n", {})
    assert built.problems == []
    assert data == {"k": value}
    assert type(data["k"]) is type(value)


def test_yaml_1_1_booleans_are_words_not_booleans() -> None:
    assert problems(BASE.replace("version: 1", "version: yes")) == ["p.yaml:1:10: version: Input should be 1"]
    data_keys = load_text(BASE, "p.yaml", {})  # sanity: the base policy loads
    assert data_keys.policy.version == 1


def test_spec_example_checks_clean_with_its_variables_set() -> None:
    """SPEC.md's policy example, verbatim (tests/policy/fixtures/spec_example.yaml), with its variables set."""
    env = {"PATH": "/usr/bin:/bin", "SUPABASE_URL": "https://ref.supabase.co",
           "SUPABASE_SERVICE_ROLE_KEY": "service-role-key", "SUPABASE_ANON_KEY": "anon-key"}
    result = check(FIXTURES / "spec_example.yaml", env)
    assert "Traceback" not in result.stderr
    problems_found = result.stdout.splitlines() if result.returncode else []
    # while the cache, breaker and session policies are being built, `check` may refuse their keys as not
    # yet supported; nothing else (no YAML 1.1 booleans such as the key 'True' for `on:`) may be reported
    assert [line for line in problems_found if "not yet supported" not in line] == []
    assert all("True" not in line and "boolean" not in line for line in problems_found)
    if result.returncode == 0:
        assert "spec_example.yaml: ok" in result.stdout


def test_spec_example_keeps_on_and_off_as_words() -> None:
    text = (FIXTURES / "spec_example.yaml").read_text()
    from edgeway.gateway.loader import parse_yaml

    data, built = parse_yaml(text, {"SUPABASE_URL": "https://ref.supabase.co", "SUPABASE_SERVICE_ROLE_KEY": "k"})
    assert built.problems == []
    assert data["upstreams"]["api"]["breaker"]["on"] == [502, 503, 504, "timeout", "connect"]
    assert data["routes"][0]["session"] == "required"


async def test_reload_of_an_alias_bomb_keeps_serving_and_runs_off_the_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(BASE)
    gateway = create_app(path)
    before = gateway.loaded.version
    path.write_text(alias_bomb())
    assert await gateway.reload() is False
    assert gateway.loaded.version == before

    # a load that takes a while (a large policy on a slow disk) runs in a worker thread: the loop keeps turning
    release = threading.Event()
    real_load = load_policy

    def slow_load(*args: object, **options: object) -> object:
        release.wait(5)
        return real_load(*args, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(gateway_app, "load_policy", slow_load)
    path.write_text(BASE.replace("/api/*", "/v2/*"))
    reload = asyncio.ensure_future(gateway.reload())
    for _ in range(3):
        await asyncio.sleep(0)  # the loop is free while the policy loads
    assert not reload.done()
    release.set()
    assert await reload is True
    assert gateway.loaded.policy.routes[0].match.path == "/v2/*"
    await gateway.close()


async def test_admin_reload_of_an_alias_bomb_is_a_422_and_health_keeps_answering(tmp_path: Path) -> None:
    import httpx

    path = tmp_path / "policy.yaml"
    path.write_text(BASE + 'admin: { token: "t0ken" }\n')
    gateway = create_app(path)
    path.write_text(alias_bomb() + 'admin: { token: "t0ken" }\n')
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gw") as client:
        reload = asyncio.ensure_future(client.post("/_edgeway/reload", headers={"Authorization": "Bearer t0ken"}))
        health = await client.get("/_edgeway/healthz")
        response = await reload
    assert health.status_code == 200
    assert response.status_code == 422
    assert response.json()["reloaded"] is False
    await gateway.close()
