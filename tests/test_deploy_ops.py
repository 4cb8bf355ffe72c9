"""deploy/: the Helm chart rendered offline (Helm's Go SDK through helm-python-sdk) and every manifest validated
against the Kubernetes schemas (kubernetes-validate, offline, strict); the Grafana dashboard and alert rules only
query metrics that middleware/metrics.py defines."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from edgeway.gateway import load_text
from edgeway.middleware.metrics import exported_names

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "edgeway"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the chart supports (autoscaling/v2, policy/v1)
METRIC = re.compile(r"\bedgeway_[a-z_]+\b")

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "external redis url and admin token": {"redis": {"url": "redis://:pw@redis.example:6379/0"},
                                           "admin": {"token": "t0k"}},
    "existing secrets": {"redis": {"existingSecret": "redis-creds"}, "admin": {"existingSecret": "admin-creds"}},
    "in-cluster redis": {"redis": {"inCluster": {"enabled": True, "password": "pw"}}},
    "fixed replicas, no hpa or pdb": {"autoscaling": {"enabled": False}, "podDisruptionBudget": {"enabled": False},
                                      "replicaCount": 3},
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values, name="edge", namespace="prod")
    documents = []
    for text in files.values():
        documents += [doc for doc in yaml.safe_load_all(text) if doc]
    return documents


def by_kind(documents: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for document in documents:
        kinds.setdefault(document["kind"], []).append(document)
    return kinds


@pytest.mark.parametrize("values", VARIANTS.values(), ids=VARIANTS.keys())
def test_rendered_manifests_are_valid_kubernetes(values: dict[str, Any]) -> None:
    documents = render(values)
    assert documents
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_chart_lints_clean() -> None:
    report = helm.lint(str(CHART), strict=True, kube_version=f"v{K8S_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_deployment_probes_ports_and_command_match_the_image() -> None:
    kinds = by_kind(render({}))
    (deployment,) = kinds["Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/_edgeway/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/_edgeway/readyz"
    args = container["args"]
    assert args[0] == "serve"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"EXPOSE {args[args.index('--port') + 1]}" in dockerfile
    assert container["ports"][0]["containerPort"] == int(args[args.index("--port") + 1])
    assert 'ENTRYPOINT ["edgeway"]' in dockerfile
    mounted = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert args[args.index("--policy") + 1] == mounted["policy"] + "/policy.yaml"
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "ConfigMap"} <= kinds.keys()
    assert "StatefulSet" not in kinds


def test_the_configmap_policy_is_a_valid_policy() -> None:
    (config,) = by_kind(render({}))["ConfigMap"]
    load_text(config["data"]["policy.yaml"], environ={})


def test_secrets_reach_the_pods_only_through_secret_refs() -> None:
    kinds = by_kind(render(VARIANTS["external redis url and admin token"]))
    (deployment,) = kinds["Deployment"]
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "edge-edgeway", "key": "redis-url"}
    assert env["EDGEWAY_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "edge-edgeway", "key": "admin-token"}
    assert "pw@" not in json.dumps(deployment) and "t0k" not in json.dumps(deployment)
    (secret,) = kinds["Secret"]
    assert secret["stringData"] == {"redis-url": "redis://:pw@redis.example:6379/0", "admin-token": "t0k"}


def test_in_cluster_redis_password_comes_from_a_secret() -> None:
    kinds = by_kind(render(VARIANTS["in-cluster redis"]))
    (statefulset,) = kinds["StatefulSet"]
    (redis,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert redis["env"][0]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
    assert "pw" not in json.dumps(statefulset)
    (deployment,) = kinds["Deployment"]
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@edge-edgeway-redis:6379/0"
    assert {s["metadata"]["name"] for s in kinds["Secret"]} == {"edge-edgeway-redis"}


def test_in_cluster_redis_without_password_is_refused() -> None:
    with pytest.raises(helm.HelmError, match="password"):
        render({"redis": {"inCluster": {"enabled": True}}})


def queried_metrics(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC.findall(expr)}


def test_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "edgeway-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = queried_metrics(exprs)
    assert used - exported_names() == set()
    wanted = {"edgeway_requests_total", "edgeway_cache_requests_total", "edgeway_breaker_state", "edgeway_store_mode",
              "edgeway_request_duration_seconds_bucket", "edgeway_session_provider_calls_total"}
    assert wanted <= used  # request and 429 rates, cache hit ratio, breakers, store mode, latency, provider calls


def test_alert_rules_query_only_metrics_that_exist() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "edgeway-alerts.yaml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert all({"alert", "expr", "labels", "annotations"} <= rule.keys() for rule in alerts)
    assert queried_metrics([rule["expr"] for rule in alerts]) - exported_names() == set()
    names = {rule["alert"] for rule in alerts}
    assert {"EdgewayStoreMemoryHigh", "EdgewayStoreFallbackActive", "EdgewayBreakerOpen", "EdgewayHigh5xxRate"} <= names
