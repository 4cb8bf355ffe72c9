"""`edgeway check` and the loader: every kind of mistake, with its exact position and message."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgeway.gateway.cli import main
from edgeway.gateway.errors import PolicyError
from edgeway.gateway.loader import interpolate, load_text
from edgeway.gateway.schema import SCHEMA_PATH, render

ROOT = Path(__file__).resolve().parents[2]

VALID = """\
version: 1
upstreams:
  api: { url: "http://127.0.0.1:9001" }
routes:
  - match: { path: /api/* }
    upstream: api
    limits:
      - { rate: 10/minute, key: ip }
"""


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_text(textwrap.dedent(text), "p.yaml", environ or {})
    return str(caught.value).splitlines()


def test_valid_policy_loads_with_typed_values() -> None:
    loaded = load_text(VALID, "p.yaml", {})
    limit = loaded.policy.routes[0].limits[0]
    assert (limit.rate.quota, limit.rate.window) == (10, 60.0)
    assert loaded.policy.store.url == "memory://" and loaded.policy.store.timeout == 0.05
    assert len(loaded.version) == 12


def test_unknown_key_has_did_you_mean() -> None:
    text = VALID.replace("    upstream: api", "    upstrem: api\n    upstream: api")
    assert problems(text) == ["p.yaml:6:5: unknown key 'upstrem' (did you mean 'upstream'?)"]


def test_unknown_key_without_close_match_lists_the_keys() -> None:
    text = VALID.replace("version: 1", "version: 1\nzzz: 3")
    assert problems(text) == [
        "p.yaml:2:1: unknown key 'zzz'; expected one of: version, name, store, trusted_proxies, user_from, upstreams, "
        "routes, sessions, server, admin"
    ]


def test_unknown_key_inside_a_limit() -> None:
    text = VALID.replace("key: ip }", "key: ip, algoritm: fixed-window }")
    assert problems(text) == ["p.yaml:8:37: unknown key 'algoritm' (did you mean 'algorithm'?)"]


@pytest.mark.parametrize(
    ("rate", "message"),
    [
        ("10/fortnight", "unknown period 'fortnight'"),
        ("ten/minute", "the count must be a whole number >= 1"),
        ("0/minute", "the count must be a whole number >= 1"),
        ("10", "expected a rate such as 10/minute"),
    ],
)
def test_bad_rate(rate: str, message: str) -> None:
    (line,) = problems(VALID.replace("10/minute", rate))
    assert line.startswith("p.yaml:8:17: routes.0.limits.0.rate: ")
    assert message in line


def test_unknown_upstream_with_suggestion() -> None:
    text = VALID.replace("    upstream: api", "    upstream: apii")
    assert problems(text) == ["p.yaml:6:15: unknown upstream 'apii' (did you mean 'api'?)"]


def test_duplicate_route() -> None:
    text = VALID + "  - match: { path: /api/* }\n    upstream: api\n"
    assert problems(text) == [
        "p.yaml:9:12: duplicate route: routes[0] already matches /api/* for the same methods, "
        "so this one can never match"
    ]


def test_unset_variable_without_default_points_at_the_variable() -> None:
    text = VALID.replace('"http://127.0.0.1:9001"', '"http://${API_HOST}:9001"')
    assert problems(text) == [
        "p.yaml:3:23: environment variable API_HOST is not set and has no default "
        "(write ${API_HOST:-default} to give one)"
    ]


def test_variables_and_defaults_are_interpolated() -> None:
    text = VALID.replace('"http://127.0.0.1:9001"', '"http://${API_HOST}:${API_PORT:-9001}"')
    loaded = load_text(text, "p.yaml", {"API_HOST": "10.1.2.3"})
    assert loaded.policy.upstreams["api"].url == "http://10.1.2.3:9001"
    assert interpolate("$${X} ${Y:-d} ${Z:-}", {"Z": ""}) == ("${X} d ", [])


def test_duplicate_yaml_key() -> None:
    text = VALID.replace("version: 1", "version: 1\nversion: 1")
    assert problems(text) == ["p.yaml:2:1: duplicate key 'version'"]


def test_yaml_syntax_error_has_position() -> None:
    (line,) = problems("version: 1\nupstreams: [\n")
    assert line.startswith("p.yaml:3:1: invalid YAML:")


def test_python_tags_are_refused_not_constructed() -> None:
    (line,) = problems(VALID.replace("version: 1", "version: !!python/object/apply:os.system ['echo pwned']"))
    assert line == "p.yaml:1:10: YAML tags (!!python/object/apply:os.system) are not allowed: policies are plain YAML"


def test_missing_required_key() -> None:
    assert problems("version: 1\nupstreams: {}\n") == ["p.yaml:1:1: missing required key 'routes'"]


def test_every_problem_is_reported_in_file_order() -> None:
    text = """\
    version: 1
    store: { url: "${REDIS:-memory://}", timout: 1s }
    upstreams:
      api: { url: "ftp://x" }
    routes:
      - match: { path: api/* }
        upstream: nope
        limits: [{ rate: 5/eon }]
    """
    lines = problems(text)
    assert [line.split(": ", 1)[0] for line in lines] == [
        "p.yaml:2:38", "p.yaml:4:15", "p.yaml:6:20", "p.yaml:7:15", "p.yaml:8:22",
    ]


def test_check_command_exit_codes_and_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(VALID)
    assert main(["check", str(good)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{good}: ok") and "1 route(s), 1 limit(s)" in out and out.count("\n") == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(VALID.replace("10/minute", "10/fortnight").replace("upstream: api", "upstream: apx"))
    assert main(["check", str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[0] for line in out] == [f"{bad}:6:15", f"{bad}:8:17"]


def test_check_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "/nonexistent/p.yaml"]) == 1
    assert capsys.readouterr().out.startswith("/nonexistent/p.yaml:1:1: cannot read the policy file")


def test_console_script_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "edgeway.gateway.cli", "--version"], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0 and result.stdout.startswith("edgeway ")


@pytest.mark.parametrize("path", sorted((ROOT / "policies").glob("*.yaml")), ids=lambda p: p.name)
def test_example_policies_are_valid(path: Path) -> None:
    assert main(["check", str(path)]) == 0


def test_shipped_json_schema_matches_the_models() -> None:
    assert SCHEMA_PATH.read_text() == render(), "run: python -m edgeway.gateway.schema"


SESSIONS = """\
version: 1
upstreams:
  api: { url: "http://127.0.0.1:9001" }
routes:
  - match: { path: /api/* }
    upstream: api
    session: required
    privileged: true
sessions:
  provider: supabase
  ttl: 1h
"""


def test_sessions_without_url_for_supabase() -> None:
    assert problems(SESSIONS) == [
        "p.yaml:10:3: sessions: provider: supabase needs url: (the project URL, e.g. ${SUPABASE_URL})"
    ]


def test_jwt_sessions_without_keys() -> None:
    text = SESSIONS.replace("provider: supabase", "provider: jwt\n  verify: jwt")
    assert problems(text) == ["p.yaml:10:3: sessions: provider: jwt needs jwks_url: or jwt_secret: to verify tokens"]


def test_session_route_without_a_sessions_block() -> None:
    text = SESSIONS.split("sessions:")[0]
    assert problems(text) == [
        "p.yaml:7:14: session: required needs a sessions: block (provider, url) saying how tokens are verified"
    ]


def test_privileged_without_a_session() -> None:
    text = SESSIONS.replace("    session: required\n", "").replace("provider: supabase", "url: https://a.b")
    assert problems(text) == ["p.yaml:7:17: privileged: true applies to routes with session: required or optional"]


def test_valid_sessions_block_is_typed() -> None:
    text = SESSIONS.replace("provider: supabase", "url: https://abc.supabase.co\n  claims: [email]\n"
                            "  headers: { X-Edgeway-Email: email }\n  negative_ttl: 10s")
    sessions = load_text(text, "p.yaml", {}).policy.sessions
    assert sessions is not None
    assert (sessions.ttl, sessions.negative_ttl, sessions.headers) == (3600.0, 10.0, {"x-edgeway-email": "email"})
    assert sessions.effective_issuer == "https://abc.supabase.co/auth/v1"


CACHED = """\
version: 1
upstreams:
  api: { url: "http://127.0.0.1:9001" }
routes:
  - match: { path: /ai/*, methods: [GET] }
    upstream: api
    cache:
      key: [method, path, body]
  - match: { path: /b }
    upstream: api
    cache: { max_body: 0, key: [method, cookie] }
  - match: { path: /c }
    upstream: api
    cache: { ttl: origin, body_include: [model], lock_timeout: soon, tag_header: "Cache Tag" }
"""


def test_cache_problems_are_reported_at_their_positions() -> None:
    assert problems(CACHED) == [
        "p.yaml:8:12: routes.0.cache.key: `body` keys POST answers, but this route's match.methods excludes POST",
        "p.yaml:11:24: routes.1.cache.max_body: must be at least 1 byte",
        "p.yaml:11:32: routes.1.cache.key: unknown cache key part 'cookie': expected method, path, query, body, "
        "user, header:NAME",
        "p.yaml:14:64: routes.2.cache.lock_timeout: expected a duration such as 250ms, 30s, 5m, 1h or 7d, got 'soon'",
        "p.yaml:14:82: routes.2.cache.tag_header: not a header name: 'Cache Tag'",
    ]


def test_a_valid_cache_block_is_typed() -> None:
    text = VALID + "    cache: { ttl: 1h, key: [method, path, query, 'header:X-Team'], stale_if_error: 10m }\n"
    cache = load_text(text, "p.yaml", {}).policy.routes[0].cache
    assert cache is not None and cache.ttl == 3600.0 and cache.stale_if_error == 600.0
    assert cache.key == ("method", "path", "query", "header:x-team")
    assert cache.methods == ("GET", "HEAD")
