"""GET /dashboard in a real headless Chromium against a real server: after real traffic the
page shows the numbers /metrics shows at that moment, and it says so plainly when the server
goes away. Screenshots go to each test's tmp_path (and, with TPASERVE_UPDATE_SCREENSHOT=1,
the laptop one to docs/img/dashboard.png, the README's picture).

To compare at one moment, the engine core is paused (SIGSTOP) in the middle of traffic:
its requests keep their blocks and the counters stop moving, while the API process still
serves /metrics and the page."""
from __future__ import annotations

import math
import os
import re
import signal
import threading
import time

import httpx
import pytest

from tests.api.conftest import launch, stop
from tests.deploy.browser import (
    LAPTOP,
    PHONE,
    chrome,
    full_page_screenshot,
    set_viewport,
    wait_until,
)
from tests.deploy.conftest import REPO, delta, scrape, value
from tests.deploy.test_dashboards import NAME, defined_sample_names
from tests.reliability.common import core_pid
from tpaserve.args import DEMO_DIR, DEMO_NAME

SCREENSHOT = REPO / "docs" / "img" / "dashboard.png"
STATIC = REPO / "tpaserve" / "api" / "static"
PREFIX = "It is a truth universally acknowledged that a single man in possession of "


def engine_samples(url: str) -> dict:
    """scrape() less the HTTP counter, which the page's own scrapes keep moving."""
    return {k: v for k, v in scrape(url).items() if k[0] != "tpaserve:http_requests_total"}


def shown(driver, element_id: str) -> str:
    """The raw number (data-value) behind what element `element_id` shows."""
    return driver.execute_script(f"return document.getElementById('{element_id}').dataset.value")


def number(driver, element_id: str) -> float:
    return float(shown(driver, element_id))


def polls(driver) -> int:
    return int(driver.execute_script("return Number(document.body.dataset.polls || 0)"))


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile (promql/quantile.go) over cumulative (le, count)."""
    buckets = sorted(buckets)
    total = buckets[-1][1]
    if total == 0:
        return math.nan
    rank = q * total
    b = next(i for i, (_, c) in enumerate(buckets) if c >= rank)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    start, count = 0.0, buckets[b][1]
    if b > 0:
        start, count, rank = buckets[b - 1][0], count - buckets[b - 1][1], rank - buckets[b - 1][1]
    return start + (buckets[b][0] - start) * (rank / count)


def window_buckets(before: dict, after: dict, hist: str) -> list[tuple[float, float]]:
    les = {dict(ls)["le"] for n, ls in after if n == f"tpaserve:{hist}_bucket"}
    return [(float(le), delta(before, after, f"tpaserve:{hist}_bucket", le=le)) for le in les]


def drive(server, stop_event: threading.Event, errors: list) -> None:
    """Completions with a shared prefix (prefix-cache hits), back to back, until told."""
    client = server.client()
    i = 0
    while not stop_event.is_set():
        try:
            client.completions.create(model=DEMO_NAME, prompt=PREFIX + f"fortune {i}",
                                      max_tokens=24, extra_body={"ignore_eos": True})
        except Exception as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
            return
        i += 1


@pytest.fixture
def driver():
    """A laptop-sized headless Chromium (skips, or fails as root, before any server starts)."""
    d = chrome(LAPTOP)
    yield d
    d.quit()


def test_page_shows_what_metrics_shows(driver, tmp_path):
    # the bundled demo model, as `make serve` serves it (the README's picture), with a cache
    # small enough to show its use; prefix caching on (the default) for a hit rate
    server = launch(DEMO_DIR, tmp_path / "tpaserve.log", "--served-model-name", DEMO_NAME,
                    "--num-blocks", "64", api_key=None)
    url = server.url
    stop_event, errors = threading.Event(), []
    threads = [threading.Thread(target=drive, args=(server, stop_event, errors))
               for _ in range(4)]
    core = core_pid(server)
    try:
        driver.get(f"{url}/dashboard")
        wait_until(driver, "document.body.dataset.state === 'live'", what="the first scrape")
        before = engine_samples(url)     # idle: what the page's first scrape saw too

        for t in threads:
            t.start()
        # the page follows the traffic: a tokens/s above 0 within a few polls
        wait_until(driver, "Number(document.getElementById('gen-rate').dataset.value) > 0",
                   what="a generation rate above 0")
        time.sleep(6)                    # a few seconds of lines on the charts
        os.kill(core, signal.SIGSTOP)
        try:
            # the core's last outputs reach the API process, then nothing moves
            end, last = time.monotonic() + 10, None
            while (now := engine_samples(url)) != last:
                assert time.monotonic() < end, "/metrics kept changing with the core paused"
                last = now
                time.sleep(0.5)
            seen = polls(driver)
            wait_until(driver, f"Number(document.body.dataset.polls) >= {seen + 2}",
                       what="two scrapes of the paused server")
            full_page_screenshot(driver, tmp_path / "dashboard.png", LAPTOP[0])
            if os.environ.get("TPASERVE_UPDATE_SCREENSHOT") == "1":
                full_page_screenshot(driver, SCREENSHOT, LAPTOP[0])
            after = engine_samples(url)
            assert after == last
            check_numbers(driver, before, after)
        finally:
            stop_event.set()
            os.kill(core, signal.SIGCONT)
        for t in threads:
            t.join(60)
        assert not errors, errors

        # a phone: one column, nothing wider than the screen
        set_viewport(driver, *PHONE, mobile=True)
        seen = polls(driver)
        wait_until(driver, f"Number(document.body.dataset.polls) > {seen}", what="a redraw")
        assert driver.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth")
        full_page_screenshot(driver, tmp_path / "dashboard-phone.png", PHONE[0], mobile=True)
        # every request the page made was to this server: no CDN, nothing else
        urls = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)")
        assert urls and all(u.startswith(url + "/") for u in urls), urls
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        stop_event.set()
        stop(server)


def check_numbers(driver, before: dict, after: dict) -> None:
    """What the page shows against one /metrics scrape (`after`); `before`: the page's first."""
    def m(name: str) -> float:
        return value(after, f"tpaserve:{name}")

    assert m("factor_cache_blocks_used") > 0 and m("num_requests_running") > 0
    for element_id, name in [
            ("cache-blocks-used", "factor_cache_blocks_used"),
            ("cache-blocks-total", "factor_cache_blocks_total"),
            ("cache-bytes-used", "factor_cache_bytes_used"),
            ("cache-bytes-total", "factor_cache_bytes_total"),
            ("cache-usage", "factor_cache_usage_perc"),
            ("mha-bytes-used", "mha_equivalent_cache_used_bytes"),
            ("tpa-bytes-per-token", "factor_cache_bytes_per_token"),
            ("mha-bytes-per-token", "mha_equivalent_bytes_per_token"),
            ("prompt-total", "prompt_tokens_total"),
            ("gen-total", "generation_tokens_total"),
            ("running", "num_requests_running"),
            ("waiting", "num_requests_waiting"),
            ("preemptions", "num_preemptions_total")]:
        assert number(driver, element_id) == m(name), element_id
    # paused: nothing moved between the page's last two scrapes
    assert number(driver, "gen-rate") == 0 and number(driver, "prompt-rate") == 0
    # the window is the page's whole life here: from `before` to `after`
    for element_id, hist in [("ttft", "time_to_first_token_seconds"),
                             ("itl", "inter_token_latency_seconds")]:
        buckets = window_buckets(before, after, hist)
        for q in (50, 95):
            want = histogram_quantile(q / 100, buckets)
            assert number(driver, f"{element_id}-p{q}") == pytest.approx(want, rel=1e-9)
    hits = delta(before, after, "tpaserve:prefix_cache_hits_total")
    queries = delta(before, after, "tpaserve:prefix_cache_queries_total")
    assert hits > 0
    assert number(driver, "prefix-hit-rate") == pytest.approx(hits / queries, rel=1e-12)
    assert shown(driver, "model") == DEMO_NAME
    assert shown(driver, "dtype") == "float32"
    uptime = time.time() - m("server_start_time_seconds")
    assert number(driver, "uptime") == pytest.approx(uptime, abs=5)


def test_page_says_when_the_server_is_unreachable(driver, checkpoint, tmp_path):
    server = launch(checkpoint, tmp_path / "tpaserve.log", api_key=None)
    try:
        driver.get(f"{server.url}/dashboard")
        wait_until(driver, "document.body.dataset.state === 'live'", what="the first scrape")
        gen_total = shown(driver, "gen-total")
        stop(server)
        wait_until(driver, "document.body.dataset.state === 'unreachable'", timeout=10,
                   what="the unreachable state")
        banner = driver.find_element("id", "banner")
        assert banner.is_displayed() and banner.text.startswith("Server unreachable")
        assert driver.find_element("id", "state").text == "unreachable"
        assert shown(driver, "gen-total") == gen_total      # the last numbers stay, dimmed
        full_page_screenshot(driver, tmp_path / "dashboard-unreachable.png", LAPTOP[0])
    finally:
        stop(server)


def test_the_page_reads_only_metrics_the_metrics_module_defines():
    script = (STATIC / "dashboard.js").read_text()
    names = set(NAME.findall(script))
    assert {"tpaserve:cache_config_info", "tpaserve:factor_cache_bytes_used",
            "tpaserve:time_to_first_token_seconds_bucket"} <= names
    assert names <= defined_sample_names(), sorted(names - defined_sample_names())
    # the one URL it fetches is /metrics (relative: the page may sit behind a path prefix)
    assert re.findall(r"fetch\((\S+?),", script) == ['"metrics"']


def test_dashboard_is_open_self_contained_and_can_be_disabled(metrics_server, checkpoint,
                                                              tmp_path):
    # open like /metrics: metrics_server wants an API key everywhere else
    page = httpx.get(f"{metrics_server.url}/dashboard", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assets = [httpx.get(f"{metrics_server.url}/dashboard/{name}", timeout=10)
              for name in ("dashboard.js", "dashboard.css")]
    assert [a.status_code for a in assets] == [200, 200]
    assert assets[0].text == (STATIC / "dashboard.js").read_text()
    # nothing from elsewhere: the only absolute URL is the SVG namespace, which is not fetched
    text = "".join([page.text, *(a.text for a in assets)])
    assert set(re.findall(r"https?://[^\s\"'`]+", text)) == {"http://www.w3.org/2000/svg"}
    # only the page's own files are open, not everything under /dashboard/
    assert httpx.get(f"{metrics_server.url}/dashboard/x.js", timeout=10).status_code == 401

    off = launch(checkpoint, tmp_path / "tpaserve.log", "--disable-dashboard", api_key=None)
    try:
        assert httpx.get(f"{off.url}/dashboard", timeout=10).status_code == 404
        assert httpx.get(f"{off.url}/metrics", timeout=10).status_code == 200
    finally:
        stop(off)
