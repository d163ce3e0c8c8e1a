"""deploy/k8s/inference/, checked offline: the InferencePool against its CRD's schema
(tests/deploy/schemas/, see SOURCES.md there), the core objects against the Kubernetes
schemas (kubernetes-validate, strict), the HTTPRoute and the endpoint picker's config by
hand, and how the objects refer to each other and to tpaserve itself (its flags, its ports,
the metric names it serves). Nothing here talks to a cluster."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import DEPLOY, REPO
from tests.deploy.test_manifests import K8S_VERSIONS, flag

INFERENCE = DEPLOY / "k8s" / "inference"
SCHEMAS = Path(__file__).parent / "schemas"
CRDS = ["inference.networking.k8s.io_inferencepools.yaml"]
CORE_KINDS = {"Deployment", "Service", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"}
POOL_GROUP = "inference.networking.k8s.io"
# The gauges the EPP's scorers read, under vLLM's names. tpaserve serves them as aliases of
# tpaserve:num_requests_waiting / _running and tpaserve:factor_cache_usage_perc once the
# kv-events work lands; until then the test checks the counterparts exist (see below).
VLLM_ALIASES = {
    "vllm:num_requests_waiting": "tpaserve:num_requests_waiting",
    "vllm:num_requests_running": "tpaserve:num_requests_running",
    "vllm:kv_cache_usage_perc": "tpaserve:factor_cache_usage_perc",
}
EPP_METRIC_FLAGS = {
    "--total-queued-requests-metric": "vllm:num_requests_waiting",
    "--total-running-requests-metric": "vllm:num_requests_running",
    "--kv-cache-usage-percentage-metric": "vllm:kv_cache_usage_perc",
}
KV_EVENTS_PORT = 5557
# The EPP's flags (GIE's EPP runner, Options.AddFlags, plus controller-runtime's zap flags):
# a misspelt one stops the EPP at start.
EPP_FLAGS = {
    "--grpc-port", "--ha-enable-leader-election", "--pool-group", "--pool-namespace",
    "--pool-name", "--endpoint-selector", "--endpoint-target-ports",
    "--model-server-metrics-scheme", "--model-server-metrics-path",
    "--model-server-metrics-https-insecure-skip-verify", "--refresh-metrics-interval",
    "--refresh-prometheus-metrics-interval", "--metrics-staleness-threshold",
    "--total-queued-requests-metric", "--total-running-requests-metric",
    "--kv-cache-usage-percentage-metric", "--lora-info-metric", "--cache-info-metric", "--v",
    "--tracing", "--health-checking", "--metrics-port", "--grpc-health-port", "--enable-pprof",
    "--cert-path", "--enable-cert-reload", "--secure-serving", "--metrics-endpoint-auth",
    "--config-file", "--config-text", "--zap-encoder", "--zap-log-level", "--zap-devel",
}


# ---- loading ----------------------------------------------------------------------------
def documents() -> list[tuple[str, dict]]:
    """(file, object) for every object the kustomization applies, in its order."""
    kustomization = yaml.safe_load((INFERENCE / "kustomization.yaml").read_text())
    return [(f, doc) for f in kustomization["resources"]
            for doc in yaml.safe_load_all((INFERENCE / f).read_text()) if doc]


def obj(kind: str, name: str | None = None) -> dict:
    (found,) = [d for _, d in documents()
                if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return found


def strict(schema: dict) -> dict:
    """The schema with unknown fields rejected, as the API server's strict field validation
    does (structural schemas leave additionalProperties out: the server prunes instead)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(schema)
    return schema


def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema, for every served version of the shipped CRDs."""
    out = {}
    for name in CRDS:
        crd = yaml.safe_load((SCHEMAS / name).read_text())
        spec = crd["spec"]
        for v in spec["versions"]:
            if v["served"]:
                out[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = \
                    v["schema"]["openAPIV3Schema"]
    return out


def validate_crd_object(doc: dict) -> None:
    schema = crd_schemas()[(doc["apiVersion"], doc["kind"])]
    jsonschema.Draft7Validator(strict(schema)).validate(doc)


def pool_cel_rules(pool: dict) -> None:
    """The CRD's x-kubernetes-validations (CEL, which jsonschema cannot run), by hand."""
    ref = pool["spec"]["endpointPickerRef"]
    if ref.get("kind", "Service") == "Service":
        assert "port" in ref, "port is required when kind is 'Service'"
    numbers = [p["number"] for p in pool["spec"]["targetPorts"]]
    assert len(numbers) == len(set(numbers)), "port number must be unique"


def served_metric_names() -> set[str]:
    """Every metric name written out in tpaserve/frontend/metrics.py."""
    text = (REPO / "tpaserve" / "frontend" / "metrics.py").read_text()
    return set(re.findall(r'"((?:tpaserve|vllm):[a-z_]+)"', text))


# ---- schemas ----------------------------------------------------------------------------
def test_the_kustomization_applies_every_file_here_and_each_kind_is_checked():
    kustomization = yaml.safe_load((INFERENCE / "kustomization.yaml").read_text())
    files = {p.name for p in INFERENCE.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    crd_kinds = {kind for _, kind in crd_schemas()}
    for f, doc in documents():
        assert doc["kind"] in CORE_KINDS | crd_kinds | {"HTTPRoute"}, (f, doc["kind"])
    assert {d["kind"] for _, d in documents()} >= CORE_KINDS | {"InferencePool", "HTTPRoute"}


def test_the_shipped_crds_are_the_released_v1_inferencepool():
    crd = yaml.safe_load((SCHEMAS / CRDS[0]).read_text())
    assert crd["metadata"]["annotations"]["inference.networking.k8s.io/bundle-version"] == \
        "v1.4.0"
    assert crd["spec"]["group"] == POOL_GROUP
    assert [v["name"] for v in crd["spec"]["versions"]] == ["v1"]
    assert "v1.4.0" in (SCHEMAS / "SOURCES.md").read_text()


@pytest.mark.parametrize("doc", [d for _, d in documents() if d["kind"] == "InferencePool"],
                         ids=lambda d: d["metadata"]["name"])
def test_crd_objects_validate_against_their_crd_schema(doc):
    validate_crd_object(doc)
    pool_cel_rules(doc)


@pytest.mark.parametrize("mutate", [
    lambda p: p["spec"].__setitem__("targetPortNumber", 8000),         # v1alpha2's field
    lambda p: p["spec"].pop("endpointPickerRef"),
    lambda p: p["spec"]["endpointPickerRef"].__setitem__("failureMode", "FailSoft"),
    lambda p: p["spec"]["targetPorts"].append({"number": 0}),
], ids=["old-field", "no-picker", "bad-enum", "port-0"])
def test_crd_validation_rejects_a_broken_pool(mutate):
    bad = copy.deepcopy(obj("InferencePool"))
    mutate(bad)
    with pytest.raises(jsonschema.ValidationError):
        validate_crd_object(bad)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("doc", [d for _, d in documents() if d["kind"] in CORE_KINDS],
                         ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_core_objects_validate_against_the_kubernetes_schemas(doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


def test_httproute_by_hand():
    """gateway.networking.k8s.io/v1 HTTPRoute (CRD not shipped, see schemas/SOURCES.md):
    only fields of that version, and the one rule routes to the InferencePool."""
    route = obj("HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert set(route) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(route["spec"]) <= {"parentRefs", "hostnames", "rules"}
    for ref in route["spec"]["parentRefs"]:
        assert set(ref) <= {"group", "kind", "namespace", "name", "sectionName", "port"}
        assert ref.get("kind", "Gateway") == "Gateway" and ref["name"]
    (rule,) = route["spec"]["rules"]
    assert set(rule) <= {"name", "matches", "filters", "backendRefs", "timeouts",
                         "retry", "sessionPersistence"}
    for m in rule["matches"]:
        assert m["path"]["type"] in {"Exact", "PathPrefix", "RegularExpression"}
    assert set(rule["timeouts"]) <= {"request", "backendRequest"}
    assert re.fullmatch(r"(\d+(h|m|s|ms)){1,4}", rule["timeouts"]["request"])
    (backend,) = rule["backendRefs"]
    assert set(backend) <= {"group", "kind", "name", "namespace", "port", "weight", "filters"}
    pool = obj("InferencePool")
    assert (backend["group"], backend["kind"], backend["name"]) == \
        (POOL_GROUP, "InferencePool", pool["metadata"]["name"])
    assert "port" not in backend      # a pool's port is its targetPorts, not the route's


# ---- cross-references -------------------------------------------------------------------
def pool_server() -> tuple[dict, dict]:
    dep = obj("Deployment", "tpaserve-pool")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return dep, c


def test_the_pool_selects_the_tpaserve_pods_on_their_serving_port():
    pool, (dep, c) = obj("InferencePool"), pool_server()
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (target,) = pool["spec"]["targetPorts"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert target["number"] == ports["http"] == int(flag(c["args"], "--port"))
    # nothing else in the namespace picks these pods up: not deploy/k8s's Service, not the EPP
    base_svc = yaml.safe_load((DEPLOY / "k8s" / "service.yaml").read_text())
    assert not base_svc["spec"]["selector"].items() <= pod_labels.items()
    epp = obj("Deployment", "tpaserve-pool-epp")
    assert not pool["spec"]["selector"]["matchLabels"].items() <= \
        epp["spec"]["template"]["metadata"]["labels"].items()


def test_the_tpaserve_pods_publish_kv_events_where_the_epp_subscribes():
    _, c = pool_server()
    endpoint = flag(c["args"], "--kv-events-endpoint")
    assert endpoint == f"tcp://*:{KV_EVENTS_PORT}"        # every interface: the EPP connects
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["kv-events"] == KV_EVENTS_PORT
    assert "--no-enable-prefix-caching" not in c["args"]
    scorer = epp_plugins()["precise-prefix-cache-scorer"]["parameters"]
    kv = scorer["kvEventsConfig"]
    assert kv["discoverPods"] is True and kv["podDiscoveryConfig"]["socketPort"] == KV_EVENTS_PORT
    assert scorer["tokenProcessorConfig"]["blockSize"] == int(flag(c["args"], "--block-size"))


def test_the_pool_server_is_the_base_deployment_plus_the_pool_flags():
    """Same probes, GPU and shutdown arithmetic as deploy/k8s/deployment.yaml (tested in
    test_manifests.py); every flag is one tpaserve's parser knows, with a valid value."""
    from tpaserve.api.cli import build_parser
    base = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    (base_c,) = base["spec"]["template"]["spec"]["containers"]
    dep, c = pool_server()
    for key in ("startupProbe", "readinessProbe", "livenessProbe", "lifecycle", "resources",
                "securityContext", "image"):
        assert c[key] == base_c[key], key
    assert set(base_c["args"]) <= set(c["args"])
    pod, base_pod = dep["spec"]["template"]["spec"], base["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == base_pod["terminationGracePeriodSeconds"]
    ns = build_parser().parse_args(c["args"])          # an unknown flag exits here
    assert ns.kv_events_endpoint == f"tcp://*:{KV_EVENTS_PORT}"


def test_the_pool_names_the_epp_service_and_its_port():
    ref = obj("InferencePool")["spec"]["endpointPickerRef"]
    assert ref.get("kind", "Service") == "Service" and ref.get("group", "") == ""
    svc = obj("Service", ref["name"])
    svc_ports = {p["port"]: p for p in svc["spec"]["ports"]}
    ext_proc = svc_ports[ref["port"]["number"]]
    assert ext_proc["appProtocol"] == "http2"                 # gRPC
    epp = obj("Deployment", ref["name"])
    assert svc["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    (c,) = epp["spec"]["template"]["spec"]["containers"]
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert named[ext_proc["targetPort"]] == int(flag(c["args"], "--grpc-port"))
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["grpc"]["port"] == int(flag(c["args"], "--grpc-health-port"))


def test_the_epp_watches_this_pool_with_its_config_and_rights():
    pool = obj("InferencePool")
    epp = obj("Deployment", "tpaserve-pool-epp")
    pod = epp["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    for arg in c["args"]:
        assert arg.split("=", 1)[0] in EPP_FLAGS, arg
    assert flag(c["args"], "--pool-namespace") == "$(POD_NAMESPACE)"
    (ns_env,) = [e for e in c["env"] if e["name"] == "POD_NAMESPACE"]
    assert ns_env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert flag(c["args"], "--pool-name") == pool["metadata"]["name"]
    assert flag(c["args"], "--pool-group") == pool["apiVersion"].split("/")[0]
    # the config file is the ConfigMap's key, mounted where --config-file says
    config_file = Path(flag(c["args"], "--config-file"))
    (mount,) = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == config_file.parent]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    cm = obj("ConfigMap", volume["configMap"]["name"])
    assert config_file.name in cm["data"]
    # its ServiceAccount may read the pool and its pods
    sa = obj("ServiceAccount", pod["serviceAccountName"])
    (binding,) = [d for _, d in documents() if d["kind"] == "RoleBinding"
                  and any(s["name"] == sa["metadata"]["name"] for s in d["subjects"])]
    role = obj(binding["roleRef"]["kind"], binding["roleRef"]["name"])
    can = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
           for r in rule["resources"] for v in rule["verbs"]}
    for group, resource in ((POOL_GROUP, "inferencepools"), ("", "pods")):
        assert {(group, resource, v) for v in ("get", "list", "watch")} <= can


def epp_plugins() -> dict[str, dict]:
    cm = obj("ConfigMap", "tpaserve-pool-epp-config")
    (text,) = cm["data"].values()
    config = yaml.safe_load(text)
    return {p.get("name", p["type"]): p for p in config["plugins"]}


def test_the_epp_config_scores_prefix_cache_queue_and_kv_cache():
    cm = obj("ConfigMap", "tpaserve-pool-epp-config")
    config = yaml.safe_load(next(iter(cm["data"].values())))
    assert config["apiVersion"] == "inference.networking.x-k8s.io/v1alpha1"
    assert config["kind"] == "EndpointPickerConfig"
    assert set(config) <= {"apiVersion", "kind", "plugins", "schedulingProfiles",
                           "featureGates", "saturationDetector", "dataLayer"}
    plugins = epp_plugins()
    for p in config["plugins"]:
        assert set(p) <= {"type", "name", "parameters"}, p
    (profile,) = config["schedulingProfiles"]
    refs = {}
    for entry in profile["plugins"]:
        assert set(entry) <= {"pluginRef", "weight"} and entry["pluginRef"] in plugins
        refs[entry["pluginRef"]] = entry.get("weight")
    # the scorers this deployment exists for, with weights; exactly one picker
    for scorer in ("precise-prefix-cache-scorer", "kv-cache-utilization-scorer",
                   "queue-scorer"):
        assert refs[scorer] > 0, scorer
    assert [r for r in refs if plugins[r]["type"].endswith("-picker")] == ["max-score-picker"]
    assert any(p["type"] == "single-profile-handler" for p in plugins.values())


def test_the_epp_reads_metrics_tpaserve_serves():
    """The names on the EPP's command line are the vLLM aliases, and tpaserve serves them,
    beside their tpaserve: counterparts."""
    (c,) = obj("Deployment", "tpaserve-pool-epp")["spec"]["template"]["spec"]["containers"]
    for name, metric in EPP_METRIC_FLAGS.items():
        assert flag(c["args"], name) == metric
    served = served_metric_names()
    assert set(VLLM_ALIASES) <= served and set(VLLM_ALIASES.values()) <= served


def test_docs_walk_through_the_inference_deployment():
    text = (REPO / "docs" / "deploy.md").read_text()
    section = text.split("Prefix-aware routing with the Gateway API Inference Extension")[1]
    assert "kubectl apply -k deploy/k8s/inference" in section
    assert "v1.4.0" in section
    for f in (INFERENCE.glob("*.yaml")):
        assert f.name in section, f.name
