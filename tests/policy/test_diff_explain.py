"""``edgeway diff`` and ``edgeway explain`` on the example policies and variations of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeway.gateway.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "policies" / "gateway.yaml"
FAILOVER = ROOT / "policies" / "failover.yaml"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = main(list(argv))
    return code, capsys.readouterr().out.splitlines()


def variant(tmp_path: Path, *replacements: tuple[str, str], base: Path = EXAMPLE) -> Path:
    text = base.read_text()
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "new.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("policy", [EXAMPLE, FAILOVER])
def test_diff_of_a_policy_with_itself_is_empty(capsys: pytest.CaptureFixture[str], policy: Path) -> None:
    code, lines = run(capsys, "diff", str(policy), str(policy))
    assert code == 0
    assert lines == [f"no changes: {policy} and {policy} describe the same policy"]


def test_diff_ignores_formatting(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    new = variant(tmp_path, ("# A complete example", "# reformatted:"), ("timeout: 50ms", "timeout: 0.05s"))
    assert run(capsys, "diff", str(EXAMPLE), str(new))[0] == 0


def test_diff_limits_upstreams_and_routes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    new = variant(
        tmp_path,
        ("{ rate: 10/minute, key: ip }", "{ rate: 20/minute, key: ip }"),
        ("{ rate: 100/day, key: ip }", "{ rate: 100/day, key: ip, mode: shadow }\n      - { rate: 5/hour, key: ip }"),
        ("read: 30s", "read: 60s"),
        ("  - match: { path: /* }", "  - match: { path: /health }\n    upstream: api\n  - match: { path: /* }"),
    )
    code, lines = run(capsys, "diff", str(EXAMPLE), str(new))
    assert code == 1
    assert lines[1:] == [
        "~ upstream api",
        "    timeout.read: 30 -> 60",
        "~ route /api/ai/*@GET,POST",
        "    + limit hour: 5/hour by ip",
        "    limit day.mode: enforce -> shadow",
        "    limit minute.rate: 10/minute -> 20/minute",
        "+ route /health at routes[2]: upstream api",
    ]


def test_diff_removed_and_reordered_routes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    ai = "  - match: { path: /api/ai/*, methods: [GET, POST] }\n    upstream: api\n    limits:\n" \
         "      - { rate: 10/minute, key: ip }\n      - { rate: 100/day, key: ip }\n"
    assert ai in text
    moved = text.replace(ai, "").replace("  - match: { path: /* }", ai + "  - match: { path: /* }")
    new = tmp_path / "moved.yaml"
    new.write_text(moved)
    code, lines = run(capsys, "diff", str(EXAMPLE), str(new))
    assert code == 1
    assert lines[1:] == ["~ route /api/* (moved: routes[1] -> routes[0]; first match wins)",
                         "~ route /api/ai/*@GET,POST (moved: routes[0] -> routes[1]; first match wins)"]
    gone = tmp_path / "gone.yaml"
    gone.write_text(text.replace(ai, ""))
    assert run(capsys, "diff", str(EXAMPLE), str(gone))[1][1:] == ["- route /api/ai/*@GET,POST (was routes[0])"]


def test_diff_never_prints_secrets(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEWAY_ADMIN_TOKEN", "old-admin-secret")
    old = variant(tmp_path, ("url: ${REDIS_URL:-memory://}", "url: redis://:old-redis-pass@10.0.0.1:6379"))
    old = old.rename(tmp_path / "old.yaml")
    new = variant(tmp_path, ("url: ${REDIS_URL:-memory://}", "url: redis://:new-redis-pass@10.0.0.1:6379"),
                  ("token: ${EDGEWAY_ADMIN_TOKEN:-}", "token: new-admin-secret"))
    code, lines = run(capsys, "diff", str(old), str(new))
    assert code == 1
    text = "\n".join(lines)
    for secret in ("old-admin-secret", "new-admin-secret", "old-redis-pass", "new-redis-pass"):
        assert secret not in text
    assert "    admin.token: (changed)" in lines
    assert "    store.url: redis://***@10.0.0.1:6379 -> redis://***@10.0.0.1:6379" in lines


def test_diff_of_an_invalid_file_lists_its_problems(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = variant(tmp_path, ("10/minute", "10/fortnight"))
    code, lines = run(capsys, "diff", str(EXAMPLE), str(bad))
    assert code == 2
    assert lines and lines[0].startswith(f"{bad}:18:17: routes.0.limits.0.rate: bad rate '10/fortnight'")


def test_explain_limits_with_their_store_keys(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = run(capsys, "explain", str(EXAMPLE), "POST", "/api/ai/chat", "--client-ip", "203.0.113.5")
    assert code == 0
    assert lines == [
        "POST /api/ai/chat",
        "route: routes[0] /api/ai/* (GET, POST), id /api/ai/*@GET,POST -> upstream api (http://127.0.0.1:9001)",
        "client ip: 203.0.113.5",
        "limits:",
        "  10/minute by ip (sliding-window, enforce, cost 1, policy name 'minute')",
        "    store key: edgeway:api-gateway:rl:{/api/ai/*@GET,POST:ip=203.0.113.5}:minute:sw  (+ ':' + window index)",
        "    quota 10 per 60s",
        "  100/day by ip (sliding-window, enforce, cost 1, policy name 'day')",
        "    store key: edgeway:api-gateway:rl:{/api/ai/*@GET,POST:ip=203.0.113.5}:day:sw  (+ ':' + window index)",
        "    quota 100 per 86400s",
        "cache: none",
        "breaker: none on upstream api",
        "session: off",
    ]


def test_explain_header_key_trusted_proxy_and_query(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = run(capsys, "explain", str(EXAMPLE), "GET", "/api/items?page=2", "--header", "X-Api-Key: k-1",
                      "--header", "X-Forwarded-For: 198.51.100.7")
    assert code == 0
    assert "client ip: 198.51.100.7 (peer 127.0.0.1 is a trusted proxy)" in lines
    (key,) = [line for line in lines if "store key" in line]
    assert key.startswith("    store key: edgeway:api-gateway:rl:{/api/*:ip=198.51.100.7|h=")
    assert "k-1" not in key  # header values are digested: they may be secrets
    other = run(capsys, "explain", str(EXAMPLE), "GET", "/api/items", "--header", "X-Api-Key: k-2",
                "--header", "X-Forwarded-For: 198.51.100.7")[1]
    assert [line for line in other if "store key" in line] != [key]


def test_explain_route_rules_and_misses(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    policy = tmp_path / "rules.yaml"
    policy.write_text("""
version: 1
upstreams:
  api: { url: "http://127.0.0.1:9001", breaker: { failures: 3, open_for: 60s } }
routes:
  - match: { path: /cached/*, methods: [GET] }
    upstream: api
    cache: { ttl: 1h, key: [method, path, query] }
    session: optional
sessions: { provider: jwt, jwt_secret: "explain-test-secret-of-32-bytes!!" }
""")
    code, lines = run(capsys, "explain", str(policy), "GET", "/cached/a?x=1")
    assert code == 0
    assert lines[-4:] == [
        "cache: ttl 3600s, bodies up to 2000000 bytes",
        "  key parts: method=GET, path=/cached/a, query=x=1",
        "breaker: upstream api: opens after 3 failures ([502, 503, 504, timeout, connect]), stays open 60s",
        "session: optional (provider jwt)",
    ]
    assert run(capsys, "explain", str(policy), "POST", "/cached/a") == (1, [
        "POST /cached/a", "no route allows POST on /cached/a: 405 method_not_allowed (allowed: GET)"])
    assert run(capsys, "explain", str(policy), "GET", "/elsewhere") == (1, [
        "GET /elsewhere", "no route matches /elsewhere: 404 no_route"])
