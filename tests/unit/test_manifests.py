"""docker-compose.yml, Prometheus, Grafana and Kubernetes files: validated offline against their schemas
(the Compose Specification's JSON schema as vendored by check-jsonschema; Kubernetes' OpenAPI-derived JSON
schemas from kubernetes-validate, strict) and checked against the repository: ports, paths, health checks,
metric names, labels and names that must agree between files."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from mmfuse.server import ServerConfig
from mmfuse.serving import metrics

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "mmfuse.json"
KUBERNETES_VERSION = "1.30.0"

# Triton's per-model and server metrics (Triton 2.51) that the dashboards and the autoscaler may use.
TRITON_METRICS = {
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count", "nv_inference_exec_count",
    "nv_inference_request_duration_us", "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
    "nv_cpu_utilization", "nv_cpu_memory_used_bytes", "nv_inference_pending_request_count",
}
MMFUSE_METRICS = set(metrics.FAMILIES) | {
    f"{name}{suffix}" for name, (_, kind, _) in metrics.FAMILIES.items() if kind == "HISTOGRAM"
    for suffix in ("_bucket", "_sum", "_count")
}
DEFAULTS = ServerConfig()


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:nv|mmfuse)_[a-z0-9_]+)\b", expr))


# -- docker compose ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_schema() -> dict:
    from importlib.resources import files

    return json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())


def compose_errors(document: dict) -> list[str]:
    import jsonschema

    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_follows_the_compose_specification(compose):
    assert compose_errors(compose) == []


def test_the_compose_schema_check_catches_mistakes(compose):
    broken = json.loads(json.dumps(compose))
    broken["services"]["triton"]["helthcheck"] = broken["services"]["triton"].pop("healthcheck")  # a typo
    broken["services"]["grafana"]["depends_on"]["prometheus"]["condition"] = "service_ok"
    errors = compose_errors(broken)
    assert any("helthcheck" in e for e in errors) and any("depends_on" in e for e in errors), errors


def test_compose_services_have_healthchecks_and_ports(compose):
    services = compose["services"]
    assert set(services) == {"triton", "prometheus", "grafana"}
    for name, service in services.items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD" and any(arg.startswith("http://localhost:") for arg in test), name
    triton = services["triton"]
    ports = {int(p.split(":")[1]) for p in triton["ports"]}
    assert ports == {DEFAULTS.http_port, DEFAULTS.grpc_port, DEFAULTS.metrics_port}
    assert f"http://localhost:{DEFAULTS.http_port}/v2/health/ready" in triton["healthcheck"]["test"]
    command = triton["command"]
    for flag, port in (("--http-port", DEFAULTS.http_port), ("--grpc-port", DEFAULTS.grpc_port),
                       ("--metrics-port", DEFAULTS.metrics_port)):
        assert f"{flag}={port}" in command
    # Live reconfiguration needs explicit model control; every model is loaded at start-up.
    assert "--model-control-mode=explicit" in command and "--load-model=*" in command
    assert "9090:9090" in services["prometheus"]["ports"] and "3000:3000" in services["grafana"]["ports"]
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_compose_mounts_exist_in_the_repository(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            assert (ROOT / source).exists(), f"service {name}: {source} does not exist"
    triton = compose["services"]["triton"]
    assert (ROOT / triton["build"]["context"] / triton["build"]["dockerfile"]).is_file()
    repository = [v.split(":")[1] for v in triton["volumes"] if v.startswith("./model_repository:")]
    assert [f"--model-repository={r}" for r in repository] == [
        a for a in triton["command"] if a.startswith("--model-repository=")]


def test_prometheus_scrapes_tritons_metrics_port(compose):
    prometheus = compose["services"]["prometheus"]
    config_arg = [a for a in prometheus["command"] if a.startswith("--config.file=")][0].split("=", 1)[1]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    config = yaml.safe_load((ROOT / mounted[config_arg]).read_text())
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"triton:{DEFAULTS.metrics_port}"]
    assert config["scrape_configs"][0]["metrics_path"] == "/metrics"


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard(compose):
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: ROOT / v.split(":")[0] for v in grafana["volumes"]}
    provisioning = mounts["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasources[0]["url"] == "http://prometheus:9090" and datasources[0]["type"] == "prometheus"
    provider = yaml.safe_load((provisioning / "dashboards" / "mmfuse.yml").read_text())["providers"][0]
    dashboards_dir = mounts[provider["options"]["path"]]
    assert (dashboards_dir / DASHBOARD.name).resolve() == DASHBOARD.resolve()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    uid = datasources[0]["uid"]
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]


def test_dashboard_queries_use_metrics_that_exist():
    dashboard = json.loads(DASHBOARD.read_text())
    used = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, target["expr"]
            used |= names
    assert used - MMFUSE_METRICS - TRITON_METRICS == set()
    # Every mmfuse family and Triton's latency and failure counters are on the dashboard.
    assert {n for n in used if n.startswith("mmfuse_")} >= set(metrics.FAMILIES) - {metrics.DURATION_HISTOGRAM}
    assert f"{metrics.DURATION_HISTOGRAM}_bucket" in used
    assert {"nv_inference_request_failure", "nv_inference_request_duration_us", "nv_inference_queue_duration_us"} <= used
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# -- Kubernetes -------------------------------------------------------------------------------------------------
def k8s_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> dict:
    found = [d for _, d in k8s_documents() if d["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


@pytest.mark.parametrize("name, document", k8s_documents(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_kubernetes_manifest_follows_its_schema(name, document):
    import kubernetes_validate

    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_kubernetes_schema_check_catches_mistakes():
    import kubernetes_validate

    deployment = json.loads(json.dumps(by_kind("Deployment")))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment = json.loads(json.dumps(by_kind("Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_the_kubernetes_set_is_complete():
    assert sorted(d["kind"] for _, d in k8s_documents()) == [
        "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "Service"]


def container() -> dict:
    return by_kind("Deployment")["spec"]["template"]["spec"]["containers"][0]


def test_deployment_runs_triton_on_the_repository_volume_with_explicit_control():
    args = container()["args"]
    assert "--model-control-mode=explicit" in args and "--load-model=*" in args
    assert "--strict-readiness=true" in args
    repository = [a.split("=", 1)[1] for a in args if a.startswith("--model-repository=")]
    mounts = {m["name"]: m for m in container()["volumeMounts"]}
    assert mounts["model-repository"]["mountPath"] == repository[0] and mounts["model-repository"]["readOnly"]
    volumes = {v["name"]: v for v in by_kind("Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model-repository"]["persistentVolumeClaim"]["claimName"] == \
        by_kind("PersistentVolumeClaim")["metadata"]["name"]
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and mounts["dshm"]["mountPath"] == "/dev/shm"


def test_probes_use_tritons_health_endpoints_on_its_http_port():
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports == {"http": DEFAULTS.http_port, "grpc": DEFAULTS.grpc_port, "metrics": DEFAULTS.metrics_port}
    for flag, name in (("--http-port", "http"), ("--grpc-port", "grpc"), ("--metrics-port", "metrics")):
        assert f"{flag}={ports[name]}" in container()["args"]
    assert container()["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container()["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    annotations = by_kind("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])


def test_service_selects_the_deployments_pods_and_names_its_ports():
    deployment, service = by_kind("Deployment"), by_kind("Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in container_ports and port["port"] == container_ports[port["targetPort"]]


def test_autoscaler_scales_the_deployment_on_the_adapters_queue_time_metric():
    hpa, deployment = by_kind("HorizontalPodAutoscaler"), by_kind("Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = yaml.safe_load(by_kind("ConfigMap")["data"]["config.yaml"])["rules"]
    assert [r["name"]["as"] for r in rules] == [metric]
    used = metric_names(rules[0]["seriesQuery"] + rules[0]["metricsQuery"])
    assert used == {"nv_inference_queue_duration_us", "nv_inference_request_success"} <= TRITON_METRICS
    assert "<<.LabelMatchers>>" in rules[0]["metricsQuery"] and "<<.GroupBy>>" in rules[0]["metricsQuery"]
