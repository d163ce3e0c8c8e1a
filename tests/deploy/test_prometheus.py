"""A real Prometheus (/usr/bin/prometheus) scrapes a real tpaserve every second, with the
committed alert rules loaded; the dashboard's queries run through its HTTP API. And promtool
checks the committed config and rules and runs the rules' unit tests."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.api.conftest import MODEL_NAME
from tests.deploy.conftest import DEPLOY
from tests.deploy.test_dashboards import DASHBOARD_DIR, dashboard_queries

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="the prometheus binary is not installed (.ci/run installs it "
                               "with apt-get install prometheus)")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (.ci/run installs it with apt-get "
                             "install prometheus)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_config(target: str, tmp: Path) -> Path:
    """The committed prometheus.yml, pointed at the test server, scraping every second."""
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(DEPLOY / "prometheus" / f) for f in cfg["rule_files"]]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    jobs["tpaserve"]["static_configs"] = [{"targets": [target]}]
    cfg["scrape_configs"] = [jobs["tpaserve"]]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def wait(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def prometheus(prefix_server, tmp_path):
    port = free_port()
    config = render_config(prefix_server.url.removeprefix("http://"), tmp_path)
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready():
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
            except httpx.TransportError:
                return False
        wait(ready, 30, "prometheus to start")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def query(url: str, expr: str) -> list:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def instantiate(expr: str) -> str:
    """A dashboard expression as Grafana would send it for model_name = the test model."""
    return expr.replace("$model_name", MODEL_NAME).replace("$__rate_interval", "10s")


@needs_prometheus
def test_prometheus_scrapes_the_server_and_the_dashboard_queries_return_data(prometheus,
                                                                             prefix_server):
    wait(lambda: query(prometheus, 'up{job="tpaserve"} == 1'), 30, "the first scrape")
    prefix_server.client().completions.create(model=MODEL_NAME, prompt="hello there",
                                              max_tokens=16, extra_body={"ignore_eos": True})
    exprs = dashboard_queries(DASHBOARD_DIR / "tpaserve-overview.json")
    throughput = next(e for e in exprs if e.startswith("sum by (model_name) (rate("
                      "tpaserve:generation_tokens_total"))

    def generating():
        result = query(prometheus, instantiate(throughput))
        return result if result and float(result[0]["value"][1]) > 0 else None
    (series,) = wait(generating, 20, "generation throughput > 0 in Prometheus")
    assert series["metric"] == {"model_name": MODEL_NAME}
    # every panel's PromQL parses and runs (the model_name variable's query is Grafana's)
    for e in exprs:
        if not e.startswith("label_values"):
            query(prometheus, instantiate(e))
    # the committed alert rules loaded and evaluate cleanly
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == 4
    wait(lambda: all(r["health"] == "ok" for r in
                     httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]
                     ["groups"][0]["rules"]), 10, "rules evaluated")


@needs_promtool
def test_promtool_checks_the_committed_config_and_rules():
    # prometheus.yml names the compose service (tpaserve:8000): promtool does not resolve
    # hosts, so the committed file is checked as it is
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                 ["test", "rules", "alerts_test.yml"]):
        r = subprocess.run([PROMTOOL, *args], cwd=DEPLOY / "prometheus", capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
