"""The Dockerfile and vercel.json, checked by reading them (no Docker engine runs here) and by importing the entry."""

from __future__ import annotations

import importlib.util
import json
import shlex
import tomllib
from pathlib import Path

import pytest

from edgeway.gateway.app import Gateway

ROOT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            rows.append((keyword.upper(), rest.strip()))
    return rows


def final_stage() -> list[tuple[str, str]]:
    rows = instructions()
    last_from = max(i for i, (keyword, _) in enumerate(rows) if keyword == "FROM")
    return rows[last_from:]


def test_images_are_python_311() -> None:
    bases = [rest.split()[0] for keyword, rest in instructions() if keyword == "FROM"]
    assert bases and all(base.startswith("python:3.11") for base in bases)


def test_every_copied_path_exists() -> None:
    for keyword, rest in instructions():
        if keyword == "COPY" and not rest.startswith("--from"):
            *sources, _ = shlex.split(rest)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_runs_as_non_root() -> None:
    users = [rest for keyword, rest in final_stage() if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_installs_the_project_and_starts_edgeway_serve_on_the_exposed_port() -> None:
    rows = instructions()
    assert any(keyword == "RUN" and "pip install" in rest and rest.rstrip().endswith(" .") for keyword, rest in rows)
    stage = dict((keyword, rest) for keyword, rest in final_stage())
    assert json.loads(stage["ENTRYPOINT"]) == ["edgeway"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "edgeway" in scripts
    command = json.loads(stage["CMD"])
    assert command[0] == "serve"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == stage["EXPOSE"]
    assert "/_edgeway/healthz" in stage["HEALTHCHECK"] and f":{stage['EXPOSE']}/" in stage["HEALTHCHECK"]


def test_default_policy_in_the_image_is_a_valid_policy() -> None:
    env = " ".join(rest for keyword, rest in instructions() if keyword == "ENV")
    assert "EDGEWAY_POLICY=/etc/edgeway/policy.yaml" in env
    copy = [rest for keyword, rest in instructions() if keyword == "RUN" and "/etc/edgeway/policy.yaml" in rest]
    assert copy and "policies/gateway.yaml" in copy[0]
    assert (ROOT / "policies" / "gateway.yaml").exists()


def test_dockerignore_keeps_the_venv_out() -> None:
    assert ".venv" in (ROOT / ".dockerignore").read_text().split()


def test_vercel_routes_everything_to_the_asgi_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    config = json.loads((ROOT / "vercel.json").read_text())
    assert config["routes"] == [{"src": "/(.*)", "dest": "api/index.py"}]
    assert (ROOT / config["env"]["EDGEWAY_POLICY"]).exists()
    monkeypatch.setenv("EDGEWAY_POLICY", str(ROOT / "policies" / "gateway.yaml"))
    spec = importlib.util.spec_from_file_location("vercel_entry", ROOT / "api" / "index.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert isinstance(module.app, Gateway)


def test_code_imports_only_the_edgeway_namespace() -> None:
    # A top-level `gateway`/`middleware` import would load a second copy of the module in the repository
    # and fail once installed from the wheel, which carries only `edgeway`.
    offenders = []
    for path in [*ROOT.glob("gateway/*.py"), *ROOT.glob("middleware/**/*.py"), *ROOT.glob("tests/**/*.py"),
                 *ROOT.glob("bench/*.py"), ROOT / "api" / "index.py"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith(("from gateway", "from middleware", "import gateway", "import middleware")):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {stripped}")
    assert not offenders, "\n".join(offenders)
