"""Metric names are an interface: the dashboards, alert rules and the autoscaler may only
query names that tpaserve/frontend/metrics.py defines and a live server exposes, and the
committed dashboard JSON is exactly what build_dashboards.py generates."""
from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

import tpaserve.frontend.metrics as metrics_module
from tests.api.conftest import MODEL_NAME
from tests.deploy.conftest import DEPLOY, REPO, scrape

BUILDER = DEPLOY / "grafana" / "build_dashboards.py"
DASHBOARD_DIR = DEPLOY / "grafana" / "dashboards"
NAME = re.compile(r"tpaserve:[A-Za-z0-9_:]*[A-Za-z0-9_]")


def load_builder():
    spec = importlib.util.spec_from_file_location("build_dashboards", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboard_queries(path: Path) -> list[str]:
    """Every PromQL expression of a dashboard's panels (rows' nested panels too) and every
    query variable's query."""
    d = json.loads(path.read_text())
    panels = list(d["panels"])
    for p in d["panels"]:
        panels.extend(p.get("panels") or [])
    out = [t["expr"] for p in panels for t in p.get("targets") or [] if "expr" in t]
    out += [v["query"] for v in d.get("templating", {}).get("list", [])
            if v.get("type") == "query"]
    return out


def alert_queries() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def autoscaler_queries() -> list[str]:
    hpa = yaml.safe_load((DEPLOY / "k8s" / "hpa.yaml").read_text())
    adapter = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter-values.yaml").read_text())
    return ([m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
            + [r["seriesQuery"] for r in adapter["rules"]["custom"]]
            + [r["name"]["as"] for r in adapter["rules"]["custom"]])


def defined_sample_names() -> set[str]:
    """The sample names the collectors in frontend/metrics.py expose."""
    names = set()
    for obj in vars(metrics_module).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        if isinstance(obj, Counter):
            names.add(obj._name + "_total")         # prometheus-client keeps it without
        elif isinstance(obj, Histogram):
            names.update(obj._name + s for s in ("_bucket", "_sum", "_count"))
        elif isinstance(obj, Gauge):
            names.add(obj._name)
        else:
            raise AssertionError(f"unexpected metric type {type(obj).__name__}")
    return names


def test_committed_dashboards_are_regenerated_byte_for_byte():
    builder = load_builder()
    committed = sorted(p.name for p in DASHBOARD_DIR.glob("*.json"))
    assert committed == sorted(builder.DASHBOARDS), \
        "a dashboard without a builder, or one not committed"
    for name, build in builder.DASHBOARDS.items():
        assert builder.render(build).encode() == (DASHBOARD_DIR / name).read_bytes(), \
            f"{name} is stale: run .venv/bin/python deploy/grafana/build_dashboards.py"
    r = subprocess.run([sys.executable, str(BUILDER), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_overview_dashboard_covers_the_issue():
    path = DASHBOARD_DIR / "tpaserve-overview.json"
    d = json.loads(path.read_text())
    assert d["title"] == "tpaserve overview" and d["uid"] == "tpaserve-overview"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["model_name"]["type"] == "query"
    assert variables["datasource"]["type"] == "datasource"
    exprs = dashboard_queries(path)
    assert all('model_name=~"$model_name"' in e for e in exprs if "label_values" not in e)
    text = "\n".join(exprs)
    for name in ("factor_cache_bytes_used", "factor_cache_bytes_total",
                 "factor_cache_usage_perc", "factor_cache_blocks_used", "factor_cache_bytes_per_token",
                 "mha_equivalent_cache_used_bytes", "mha_equivalent_bytes_per_token",
                 "prompt_tokens_total", "generation_tokens_total", "num_requests_running",
                 "num_requests_waiting", "num_preemptions_total", "prefix_cache_hits_total",
                 "request_success_total", "engine_step_duration_seconds"):
        assert f"tpaserve:{name}" in text, name
    for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds"):
        assert (f"histogram_quantile(0.99, sum by (model_name, le) "
                f"(rate(tpaserve:{hist}_bucket") in text
    ids = [p["id"] for p in d["panels"]]
    assert ids == list(range(1, len(ids) + 1))
    for p in d["panels"]:
        refs = [t["refId"] for t in p.get("targets") or []]
        assert len(set(refs)) == len(refs) and all(refs)


def test_every_queried_metric_is_defined_and_exposed(metrics_server):
    # traffic first, so that every labelled metric has its children (http status, ...)
    metrics_server.client().completions.create(model=MODEL_NAME, prompt="hello", max_tokens=3)
    exposed = {name for name, _ in scrape(metrics_server.url)}
    defined = defined_sample_names()
    assert defined <= exposed, f"defined but never exposed: {sorted(defined - exposed)}"
    dashboards = [e for p in DASHBOARD_DIR.glob("*.json") for e in dashboard_queries(p)]
    sources = {"dashboards": dashboards, "alerts": alert_queries(),
               "autoscaler": autoscaler_queries()}
    for source, exprs in sources.items():
        names = {n for e in exprs for n in NAME.findall(e)}
        assert names, f"{source}: no tpaserve metric found"
        missing = names - exposed
        assert not missing, f"{source} query metrics the server does not expose: {sorted(missing)}"
        assert names <= defined


def test_metrics_are_defined_only_in_the_metrics_module():
    """No other module of the package creates a Prometheus metric."""
    kinds = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}
    offenders = []
    for path in (REPO / "tpaserve").rglob("*.py"):
        if path.name == "metrics.py" and path.parent.name == "frontend":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "prometheus_client":
                offenders += [f"{path}: {a.name}" for a in node.names if a.name in kinds]
    assert not offenders
