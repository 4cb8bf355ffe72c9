"""The admin API: token checks, the operation table, the OpenAPI document (validated), status and reload."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate

from edgeway import gateway
from edgeway.gateway import admin_api
from edgeway.gateway.admin_api import AdminError, AdminRequest, Operation
from tests.gateway.conftest import EchoApp, Served, marker
from tests.servers import UvicornThread

TOKEN = "adm-4c1b9f0e27d3-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}

SPEC_ENDPOINTS = {
    ("get", "/_edgeway/healthz"), ("get", "/_edgeway/readyz"), ("get", "/_edgeway/metrics"),
    ("get", "/_edgeway/openapi.json"), ("get", "/_edgeway/status"), ("post", "/_edgeway/reload"),
    ("post", "/_edgeway/cache/purge"), ("post", "/_edgeway/breakers/{upstream}/reset"),
    ("post", "/_edgeway/sessions/revoke"),
}


def policy(echo_port: int, token: str = TOKEN, rate: str = "5/minute") -> str:
    return f"""
version: 1
upstreams:
  echo: {{ url: "http://user:secret-pass@127.0.0.1:{echo_port}", breaker: {{ failures: 3, open_for: 10s }} }}
routes:
  - match: {{ path: /api/*, methods: [GET] }}
    upstream: echo
    limits: [{{ rate: {rate}, key: ip }}]
admin:
  token: "{token}"
"""


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory, echo: EchoApp) -> Path:
    path = tmp_path_factory.mktemp("admin") / "policy.yaml"
    path.write_text(policy(echo.port))  # type: ignore[attr-defined]
    return path


@pytest.fixture(scope="module")
def admin(policy_file: Path) -> Iterator[Served]:
    app = gateway.create_app(policy_file)
    with UvicornThread(app, http="httptools", proxy_headers=False) as server:
        yield Served(app, server, "httptools")


@pytest.mark.parametrize(("headers", "why"), [
    ({}, "missing"),
    ({"authorization": "Bearer wrong-token"}, "wrong"),
    ({"authorization": f"Bearer {TOKEN[:-1]}"}, "prefix of the token"),
    ({"authorization": f"Bearer {TOKEN}x"}, "token plus a suffix"),
    ({"authorization": f"Bearer x{TOKEN}"}, "token after a prefix"),
    ({"authorization": f"Basic {TOKEN}"}, "other scheme"),
    ({"authorization": "Bearer"}, "no credentials"),
    ({"x-admin-token": TOKEN}, "token in another header"),
])
def test_refused_without_the_right_token(admin: Served, headers: dict[str, str], why: str) -> None:
    response = httpx.get(f"{admin.url}/_edgeway/status", headers=headers)
    assert response.status_code == 401, why
    assert response.headers["edgeway-error"] == "unauthorized"
    assert response.json()["error"] == "unauthorized"
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_two_authorization_headers_are_refused(admin: Served) -> None:
    response = httpx.get(f"{admin.url}/_edgeway/status",
                         headers=[("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")])
    assert response.status_code == 401


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_right_token_in_any_scheme_case(admin: Served, scheme: str) -> None:
    response = httpx.get(f"{admin.url}/_edgeway/status", headers={"authorization": f"{scheme} {TOKEN}"})
    assert response.status_code == 200


def test_admin_is_off_without_a_token(echo: EchoApp) -> None:
    app = gateway.create_app(gateway.load_text(policy(echo.port, token="")))  # type: ignore[attr-defined]
    with UvicornThread(app, proxy_headers=False) as server:
        response = httpx.post(f"{server.url}/_edgeway/reload", headers={"authorization": "Bearer x"})
        public = httpx.get(f"{server.url}/_edgeway/openapi.json")
    assert response.status_code == 404
    assert response.headers["edgeway-error"] == "admin_disabled"
    assert public.status_code == 200


def test_openapi_document_is_valid_and_names_every_spec_endpoint(admin: Served) -> None:
    document = httpx.get(f"{admin.url}/_edgeway/openapi.json").json()
    validate(document)
    served = {(method, path) for path, item in document["paths"].items() for method in item}
    assert served == SPEC_ENDPOINTS
    purge = document["paths"]["/_edgeway/cache/purge"]["post"]
    assert purge["security"] == [{"adminToken": []}]
    bodies = purge["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert {tuple(body["required"]) for body in bodies} == {("all",), ("route",), ("tag",), ("url",)}
    assert document["paths"]["/_edgeway/healthz"]["get"]["security"] == []


def schema_of(method: str, path: str) -> dict[str, Any]:
    return admin_api.OPERATIONS[(method, path)].response


def test_status_shows_policy_store_upstreams_and_routes(admin: Served) -> None:
    payload = httpx.get(f"{admin.url}/_edgeway/status", headers=AUTH).json()
    jsonschema.validate(payload, schema_of("GET", "status"))
    assert payload["policy"]["version"] == admin.app.loaded.version
    assert payload["instance"]["version"] == admin.app.loaded.version and payload["instance"]["id"]
    assert payload["store"]["chain"] == [{"kind": "memory", "location": "memory://", "healthy": True}]
    echo = payload["upstreams"]["echo"]
    assert "secret-pass" not in echo["url"] and echo["url"].startswith("http://127.0.0.1:")
    assert echo["breaker"]["failures"] == 3
    (route,) = payload["routes"]
    assert route["name"] == "/api/*@GET" and route["upstream"] == "echo"
    assert route["limits"][0]["key"] == ["ip"]
    (me,) = payload["instances"]  # a memory store is never shared: this instance alone
    assert (me["id"], me["version"]) == (payload["instance"]["id"], admin.app.loaded.version)
    assert TOKEN not in str(payload)


def test_reload_applies_a_valid_file_and_refuses_an_invalid_one(admin: Served, policy_file: Path,
                                                                 echo: EchoApp) -> None:
    before = admin.app.loaded.version
    policy_file.write_text(policy(echo.port, rate="6/minute"))  # type: ignore[attr-defined]
    response = httpx.post(f"{admin.url}/_edgeway/reload", headers=AUTH)
    assert response.status_code == 200
    jsonschema.validate(response.json(), schema_of("POST", "reload"))
    assert response.json()["previous"] == before and response.json()["version"] != before
    applied = admin.app.loaded.version
    everywhere = httpx.post(f"{admin.url}/_edgeway/reload?all=1", headers=AUTH)
    jsonschema.validate(everywhere.json(), schema_of("POST", "reload"))
    assert everywhere.json()["broadcast"] is True
    assert [i["version"] for i in everywhere.json()["instances"]] == [applied]

    policy_file.write_text(policy(echo.port, rate="6/fortnight"))  # type: ignore[attr-defined]
    refused = httpx.post(f"{admin.url}/_edgeway/reload", headers=AUTH)
    assert refused.status_code == 422
    assert refused.headers["edgeway-error"] == "invalid_policy"
    (problem,) = refused.json()["problems"]
    assert problem.startswith(f"{policy_file}:8:") and "fortnight" in problem
    assert admin.app.loaded.version == applied  # the old one keeps serving
    assert httpx.get(f"{admin.url}/api/{marker()}").status_code == 200


def test_wrong_method_and_unknown_endpoint(admin: Served) -> None:
    wrong = httpx.get(f"{admin.url}/_edgeway/reload", headers=AUTH)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.headers["edgeway-error"] == "method_not_allowed"
    unknown = httpx.get(f"{admin.url}/_edgeway/nothing-here", headers=AUTH)
    assert unknown.status_code == 404 and unknown.headers["edgeway-error"] == "no_route"


@pytest.fixture
def extra_operation(monkeypatch: pytest.MonkeyPatch) -> Operation:
    """An operation added to the table for one test, as another module would add one."""
    operation = Operation("POST", "things/{name}/poke", "pokeThing", "Poke a thing.",
                          {"type": "object"}, body={"type": "object"})
    monkeypatch.setitem(admin_api.OPERATIONS, ("POST", operation.path), operation)
    return operation


def test_a_described_operation_without_handler_answers_501(admin: Served, extra_operation: Operation) -> None:
    response = httpx.post(f"{admin.url}/_edgeway/things/a/poke", headers=AUTH, json={})
    assert response.status_code == 501 and response.headers["edgeway-error"] == "not_implemented"
    document = httpx.get(f"{admin.url}/_edgeway/openapi.json").json()
    validate(document)
    assert document["paths"]["/_edgeway/things/{name}/poke"]["post"]["parameters"][0]["name"] == "name"


def test_registered_handler_gets_params_query_and_body(admin: Served, extra_operation: Operation) -> None:
    seen: list[AdminRequest] = []

    @admin_api.handler("POST", "things/{name}/poke")
    async def poke(request: AdminRequest) -> tuple[int, dict[str, Any]]:
        seen.append(request)
        if request.body == {"fail": True}:
            raise AdminError(409, "conflict", "cannot poke")
        return 200, {"poked": request.params["name"]}

    ok = httpx.post(f"{admin.url}/_edgeway/things/bolt/poke?all=1", headers=AUTH, json={"hard": True})
    assert ok.json() == {"poked": "bolt"}
    assert seen[0].query == {"all": "1"} and seen[0].body == {"hard": True}
    refused = httpx.post(f"{admin.url}/_edgeway/things/bolt/poke", headers=AUTH, json={"fail": True})
    assert refused.status_code == 409 and refused.headers["edgeway-error"] == "conflict"
    for bad in (b"not json", b"[1, 2]", b""):
        answer = httpx.post(f"{admin.url}/_edgeway/things/bolt/poke", headers=AUTH, content=bad)
        assert answer.status_code == 400 and answer.headers["edgeway-error"] == "bad_request"
    unauthorized = httpx.post(f"{admin.url}/_edgeway/things/bolt/poke", json={})
    assert unauthorized.status_code == 401 and len(seen) == 2


def test_handlers_only_for_described_operations() -> None:
    async def orphan(request: AdminRequest) -> tuple[int, dict[str, Any]]:
        return 200, {}

    with pytest.raises(KeyError, match="no admin operation"):
        admin_api.handler("POST", "not/described")(orphan)
