"""Real tpaserve processes for the observability tests, started the way tests/api starts them
(tests.api.conftest.launch: a tiny random T6 checkpoint, port 0, killed however the test
ends), plus a reader for their /metrics.

  metrics_server  session: prefix caching off (idle means zero blocks in use), a cache of
                  24 blocks x 16 slots so that a handful of requests forces preemption,
                  API key on
  prefix_server   session: prefix caching on, no API key (also Prometheus' scrape target)
"""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import checkpoint, launch, stop  # noqa: F401 - fixture re-exported

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
NUM_BLOCKS, BLOCK_SIZE = 24, 16


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every `tpaserve:` sample on /metrics, and the `vllm:` aliases: (sample name, labels)
    -> value."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith(("tpaserve:", "vllm:"))}


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="session")
def metrics_server(checkpoint, tmp_path_factory):  # noqa: F811
    log = tmp_path_factory.mktemp("metrics_server") / "tpaserve.log"
    s = launch(checkpoint, log, "--no-enable-prefix-caching", "--num-blocks", str(NUM_BLOCKS),
               "--block-size", str(BLOCK_SIZE), "--max-num-seqs", "8")
    try:
        yield s
    finally:
        stop(s)


@pytest.fixture(scope="session")
def prefix_server(checkpoint, tmp_path_factory):  # noqa: F811
    log = tmp_path_factory.mktemp("prefix_server") / "tpaserve.log"
    s = launch(checkpoint, log, "--num-blocks", "128", "--block-size", str(BLOCK_SIZE),
               api_key=None)
    try:
        yield s
    finally:
        stop(s)
