"""README.md's snippets, run exactly as printed: every YAML policy loads, every Python block builds an app
that Edgeway limits."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgeway.gateway.loader import load_text
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall((ROOT / "README.md").read_text()) if lang == language]


def policy_files() -> dict[str, str]:
    """The README's YAML blocks that say which file they are (`# policy.yaml: ...`)."""
    named = {}
    for body in blocks("yaml"):
        first = body.splitlines()[0]
        if match := re.match(r"^# ([\w.-]+\.yaml)\b", first):
            named[match.group(1)] = body
    return named


@pytest.mark.parametrize("text", [b for b in blocks("yaml") if "version: 1" in b], ids=lambda b: b.splitlines()[0])
def test_every_readme_policy_loads(text: str) -> None:
    load_text(text, "README.md", {"REDIS_URL": "redis://127.0.0.1:6390", "SUPABASE_URL": "https://x.supabase.co",
                                  "SUPABASE_SERVICE_ROLE_KEY": "k"})


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> Iterator[Path]:
    for name, text in policy_files().items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REDIS_URL", redis_url)  # the private test Redis, never the machine's own
    yield tmp_path


def run_block(index: int) -> object:
    namespace: dict[str, object] = {"__name__": f"readme_block_{index}"}
    exec(compile(blocks("python")[index], f"README.md python block {index}", "exec"), namespace)
    return namespace["app"]


def client(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("198.51.100.7", 1)),  # type: ignore[arg-type]
                             base_url="http://t")


def test_the_readme_has_the_python_blocks_this_test_runs() -> None:
    assert len(blocks("python")) == 6
    assert {"policy.yaml", "users.yaml"} <= set(policy_files())


async def test_fastapi_with_the_policy_file(project: Path) -> None:
    app = run_block(0)
    async with client(app) as http:
        statuses = [(await http.post("/api/ai/chat")).status_code for _ in range(11)]
    assert statuses == [200] * 10 + [429]


async def test_per_user_limits_from_the_apps_authentication(project: Path) -> None:
    app = run_block(1)
    async with client(app) as http:
        alice = await http.get("/api/me", headers={"authorization": "Bearer token-of-alice"})
        nobody = await http.get("/api/me")
    assert alice.status_code == 200 and alice.headers["ratelimit-policy"] == '"hour";q=100;w=3600'
    assert nobody.status_code == 400 and nobody.json()["error"] == "missing_key"


async def test_one_middleware_without_a_file(project: Path) -> None:
    app = run_block(2)
    async with client(app) as http:
        docs = [(await http.get("/openapi.json")).status_code for _ in range(12)]
        items = [(await http.get("/api/items")).status_code for _ in range(11)]
    assert docs == [200] * 12 and items == [200] * 10 + [429]


async def test_the_cache_middleware_answers_a_repeated_question_from_the_store(project: Path) -> None:
    app = run_block(3)
    async with client(app) as http:
        first = await http.post("/api/ai/chat", json={"q": "tides", "stream": False})
        again = await http.post("/api/ai/chat", content=b'{ "stream": true, "q": "tides" }',
                                headers={"content-type": "application/json"})
    assert first.json() == again.json() == {"answer": "about tides"}
    assert first.headers["cache-status"] == "edgeway; fwd=miss; stored"
    assert again.headers["cache-status"].startswith("edgeway; hit")


async def test_a_breaker_around_a_provider_call(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYMENTS_URL", f"http://127.0.0.1:{free_port()}/charge")  # nothing listens: failures
    app = run_block(4)
    statuses = []
    async with client(app) as http:
        for _ in range(7):
            response = await http.post("/api/charge", json={"amount": 1})
            statuses.append(response.status_code)
            await asyncio.sleep(0.05)  # the breaker's write, in the background
    assert statuses == [502] * 5 + [503] * 2
    assert response.headers["retry-after"] in {str(n) for n in range(27, 31)}  # 30s less up to 10% jitter


async def test_the_session_middleware_refuses_a_request_without_a_token(project: Path) -> None:
    app = run_block(5)
    async with client(app) as http:
        forged = await http.get("/me", headers={"x-edgeway-user": "admin"})
    assert forged.status_code == 401 and forged.json()["error"] == "unauthorized"
    assert forged.headers["www-authenticate"].startswith("Bearer")
