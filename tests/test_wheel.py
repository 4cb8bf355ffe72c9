"""The built wheel, installed into a fresh virtualenv, inside a project that has its own `middleware/`
package and `gateway.py`: one top-level import package (`edgeway`), and the app starts and is limited.

pip installs the dependencies from the configured indexes (its cache makes repeats quick); set
EDGEWAY_WHEELHOUSE to a folder of wheels to install with --no-index from it instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import HOST, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "edgeway", "gateway", "middleware")

PROJECT_MAIN = """\
import importlib

from fastapi import FastAPI

from edgeway import EdgewayMiddleware
from edgeway.middleware import Limit, RateLimitMiddleware
from edgeway.middleware.store import open_store

# the project's own modules, with the names Edgeway must not take (imported after edgeway on purpose)
gateway = importlib.import_module("gateway")
middleware = importlib.import_module("middleware")
app = FastAPI()


@app.get("/api/hello")
async def hello() -> dict[str, str]:
    return {"gateway": gateway.NAME, "middleware": middleware.NAME}


app.add_middleware(EdgewayMiddleware, policy="policy.yaml")
app.add_middleware(RateLimitMiddleware, limits=[Limit(rate="100/minute")], store=open_store("memory://"),
                   exclude=["/docs*", "/openapi.json"])
"""

PROJECT_POLICY = """\
version: 1
name: wheel-test
routes:
  - match: { path: /api/*, methods: GET }
    limits: [{ rate: 2/minute }]
"""


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, check=False,
                            timeout=300)
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(the wheel, the fresh virtualenv's python) with the wheel and fastapi installed."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "edgeway-src"  # a copy: the build leaves build/ and *.egg-info behind
    source.mkdir()
    for name in SOURCES:
        origin = ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(origin, source / name)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", work / "dist", source)
    (wheel,) = (work / "dist").glob("edgeway-*.whl")
    run(sys.executable, "-m", "venv", "--without-pip", work / "venv")
    python = work / "venv" / "bin" / "python"
    wheelhouse = os.environ.get("EDGEWAY_WHEELHOUSE")
    offline = ["--no-index", "--find-links", wheelhouse] if wheelhouse else []
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--disable-pip-version-check", *offline,
        wheel, "fastapi")
    yield wheel, python


def test_the_wheel_holds_one_top_level_package_and_optional_extras(built: tuple[Path, Path]) -> None:
    wheel, _ = built
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {name.split("/")[0] for name in names} == {"edgeway", "edgeway-0.1.0.dist-info"}
    assert "edgeway/middleware/store/lua/ratelimit.lua" in names and "edgeway/gateway/policy.schema.json" in names
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    assert [r for r in requires if r.startswith("Requires-Dist: asyncpg")] == [
        "Requires-Dist: asyncpg>=0.29; extra == \"postgres\""]
    assert "License-Expression: Apache-2.0" in metadata


def test_a_fastapi_project_with_its_own_gateway_and_middleware_runs_limited(
    built: tuple[Path, Path], tmp_path: Path
) -> None:
    _, python = built
    project = tmp_path / "project"
    (project / "middleware").mkdir(parents=True)
    (project / "middleware" / "__init__.py").write_text('NAME = "the project\'s middleware"\n')
    (project / "gateway.py").write_text('NAME = "the project\'s gateway"\n')
    (project / "main.py").write_text(PROJECT_MAIN)
    (project / "policy.yaml").write_text(PROJECT_POLICY)

    check = run(python.parent / "edgeway", "check", "policy.yaml", cwd=project)
    assert check.stdout.startswith("policy.yaml: ok") and "in-app policy" in check.stdout

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    server = subprocess.Popen([str(python), "-m", "uvicorn", "main:app", "--host", HOST, "--port", str(port)],
                              cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, timeout=30, alive=lambda: server.poll() is None)
        with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=10) as client:
            answers = [client.get("/api/hello") for _ in range(3)]
            docs = client.get("/openapi.json")
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=15)
    assert [a.status_code for a in answers] == [200, 200, 429], output
    assert answers[0].json() == {"gateway": "the project's gateway", "middleware": "the project's middleware"}
    assert answers[2].json()["error"] == "rate_limited" and answers[2].headers["retry-after"]
    assert docs.status_code == 200
    edgeway_file = run(python, "-c", "import edgeway; print(edgeway.__file__)", cwd=project).stdout.strip()
    assert "site-packages" in edgeway_file and str(ROOT) not in edgeway_file
