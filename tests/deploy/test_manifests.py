"""The deployment files, checked offline: Kubernetes manifests against the Kubernetes JSON
schemas (kubernetes-validate, strict: unknown fields fail), the ServiceMonitor (a CRD the
core schemas do not have) by hand, how the pieces refer to each other, and the compose file
and Dockerfile by reading them (no Docker engine here: nothing is built or started)."""
from __future__ import annotations

import re

import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import DEPLOY, REPO

K8S = DEPLOY / "k8s"
CORE_MANIFESTS = ["deployment.yaml", "service.yaml", "hpa.yaml"]
# the oldest Kubernetes still commonly run, and the newest schemas installed
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
PRESTOP_SLEEP, ENGINE_STOP = 5, 5          # seconds; see deployment.yaml's header


def manifest(name: str) -> dict:
    (doc,) = list(yaml.safe_load_all((K8S / name).read_text()))
    return doc


def flag(args: list[str], name: str) -> str:
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name:
            return args[i + 1]
    raise KeyError(name)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", CORE_MANIFESTS)
def test_core_manifests_validate_against_the_kubernetes_schemas(name, version):
    kubernetes_validate.validate(manifest(name), version, strict=True)


def test_strict_validation_rejects_a_typo():
    bad = manifest("deployment.yaml")
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecnds"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_servicemonitor_by_hand():
    """monitoring.coreos.com/v1 is a CRD (Prometheus Operator), not in the core schemas:
    check the fields the operator needs and that they point at the Service."""
    sm, svc = manifest("servicemonitor.yaml"), manifest("service.yaml")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["kind"] == "ServiceMonitor"
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(sm["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    labels = svc["metadata"]["labels"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert ep["port"] in port_names and ep["path"] == "/metrics"
        assert re.fullmatch(r"\d+s", ep["interval"])
    kinds = {d["kind"] for f in CORE_MANIFESTS + ["servicemonitor.yaml"] for d in [manifest(f)]}
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert {manifest(f)["kind"] for f in kustomization["resources"]} == kinds


def test_deployment_probes_gpu_and_graceful_termination():
    dep, svc = manifest("deployment.yaml"), manifest("service.yaml")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert dep["spec"]["template"]["metadata"]["labels"].items() >= \
        svc["spec"]["selector"].items() and dep["spec"]["selector"]["matchLabels"].items() <= \
        dep["spec"]["template"]["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == int(flag(c["args"], "--port"))
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    # SIGTERM comes after preStop; the server then drains for --graceful-shutdown-timeout
    # and stops the engine: all of it must fit in the grace period or in-flight requests die
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRESTOP_SLEEP)]
    graceful = float(flag(c["args"], "--graceful-shutdown-timeout"))
    assert pod["terminationGracePeriodSeconds"] == PRESTOP_SLEEP + graceful + ENGINE_STOP


def test_hpa_scales_the_deployment_on_waiting_requests():
    hpa, dep = manifest("hpa.yaml"), manifest("deployment.yaml")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    (m,) = hpa["spec"]["metrics"]
    assert m["type"] == "Pods" and m["pods"]["metric"]["name"] == "tpaserve:num_requests_waiting"
    assert m["pods"]["target"]["type"] == "AverageValue"
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == m["pods"]["metric"]["name"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_compose_stack():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"tpaserve", "prometheus", "grafana"}
    tp = services["tpaserve"]
    assert tp["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    (device,) = tp["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    port = flag(tp["command"], "--port")
    grace = float(flag(tp["command"], "--graceful-shutdown-timeout"))
    assert int(tp["stop_grace_period"].removesuffix("s")) > grace
    # every bind mount exists in the repository
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), vol
    # Prometheus scrapes the tpaserve service on its port; Grafana's datasource is that
    # Prometheus; the dashboard provider reads where compose mounts the dashboards
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "tpaserve")
    assert job["static_configs"][0]["targets"] == [f"tpaserve:{port}"]
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert source["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"]
    providers = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/tpaserve.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("."))
    assert mounts["./grafana/dashboards"] == providers["providers"][0]["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert services["grafana"]["image"].startswith("grafana/grafana:11.")


def test_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.startswith("#")]
    base = next(line for line in lines if line.startswith("ARG CUDA_IMAGE="))
    assert base.split("=", 1)[1].startswith("nvidia/cuda:")
    user = [line for line in lines if line.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("0", "root")
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert "http://127.0.0.1:8000/health" in text and "EXPOSE 8000" in lines
    assert "pip install /src" in text
    # the demo model ships inside the package, so the image serves it without a volume
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"demo/t6-demo/*"' in pyproject
    ignore = [line for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[:4] == ["*", "!pyproject.toml", "!README.md", "!tpaserve/"]
