"""tpaserve on Ray Serve (tpaserve/serve_ray), on a real local Ray cluster: two applications
of 2 t6-demo replicas each behind Ray's HTTP proxy, one routed by prompt prefix, one round
robin (autoscaled, 2 to 3), driven with the official openai client.

    - 40 requests (completions and chat, streamed and not) succeed, spread over both replicas;
      a replica's 4xx errors and prompt-less routes pass through the ingress unchanged
    - the same prefix-sharing workload, through both applications: prefix-cache hit rate
      (each replica's own counters) with affinity > 2x round robin's
    - SIGKILL of a replica's process, or of its engine core, with requests in flight: every
      request is answered (retried on the other replica) and the fleet is whole again

One module-scoped cluster; small caches and max_tokens keep it to about a minute of CPU.
Ray is the `ray` extra (make test installs it); without it the cluster tests skip, but not
in CI (CI=true), where a missing install must fail.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from openai import OpenAI

from bench.fleet import workload
from tests.deploy.conftest import REPO
from tpaserve.args import EngineArgs, ServerArgs
from tpaserve.serve_ray.forward import routing_key

PREFIX_CHARS = 64
# a replica caches 56 blocks of 16 tokens: the workload's 24 shared prefixes (3 blocks
# each, 72 blocks) fit in two replicas' caches together, not in one
ENGINE = dict(max_model_len=128, num_blocks=56, max_num_seqs=16)


@pytest.fixture(scope="module")
def fleet():
    if os.environ.get("CI") != "true":
        pytest.importorskip("ray", reason="the ray extra is not installed: pip install "
                                          "'tpaserve[ray]' (make test does)")
    import ray
    from ray import serve

    from tpaserve.serve_ray.cli import FleetArgs
    from tpaserve.serve_ray.deployments import build_app
    # Ray's memory monitor kills workers when the machine's memory runs short, whoever
    # uses it (another job on a shared machine): not what this measures
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=8, include_dashboard=False, logging_level="warning",
             log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # the round-robin app is autoscaled (2 to 3 replicas, a target it never reaches here):
    # Ray accepts build_app's autoscaling config and keeps the 2 replicas
    apps = {"affinity": ("prefix", "/", {"replicas": 2}),
            "rr": ("round-robin", "/rr", {"min_replicas": 2, "max_replicas": 3,
                                          "target_ongoing_requests": 1000})}
    for name, (routing, route, size) in apps.items():
        app = build_app(EngineArgs(**ENGINE), ServerArgs(graceful_shutdown_timeout=1),
                        ["t6-demo"], FleetArgs(routing=routing, prefix_chars=PREFIX_CHARS,
                                               num_cpus_per_replica=1, num_gpus_per_replica=0,
                                               **size))
        serve.run(app, name=name, route_prefix=route, blocking=False)
    for name in apps:
        _wait_running(serve, name)
    yield {name: f"http://127.0.0.1:{port}{route.rstrip('/')}/v1"
           for name, (_, route, _) in apps.items()}
    serve.shutdown()
    ray.shutdown()


def _wait_running(serve, name: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            pytest.fail(f"{name}: {status.message}")
        time.sleep(0.5)
    pytest.fail(f"{name} did not start in {timeout} s: {serve.status()}")


def stats(app: str) -> dict[str, dict]:
    from tpaserve.serve_ray.deployments import replica_stats
    return {s["replica"]: s for s in replica_stats(app)}


def client(url: str) -> OpenAI:
    return OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


# ---- serving --------------------------------------------------------------------------------
def one_request(c: OpenAI, i: int) -> tuple[str, str]:
    """(the replica that answered, the text)."""
    kind, stream = i % 2, i % 4 >= 2
    if kind == 0:
        call = c.completions.with_raw_response.create(
            model="t6-demo", prompt=f"{i} And it came to pass", max_tokens=8,
            temperature=0, stream=stream)
    else:
        call = c.chat.completions.with_raw_response.create(
            model="t6-demo", max_tokens=8, temperature=0, stream=stream,
            messages=[{"role": "user", "content": f"{i}: tell me of Mr. Darcy"}])
    replica, out = call.headers["x-tpaserve-replica"], call.parse()
    if stream:
        chunks = list(out)
        text = "".join((ch.choices[0].text if kind == 0 else ch.choices[0].delta.content or "")
                       for ch in chunks if ch.choices)
    else:
        text = out.choices[0].text if kind == 0 else out.choices[0].message.content
        assert out.usage.completion_tokens == 8
    return replica, text


def test_forty_requests_through_the_openai_client(fleet):
    c = client(fleet["affinity"])
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: one_request(c, i), range(40)))   # raises on any error
    assert len(results) == 40 and all(text for _, text in results)
    assert len({replica for replica, _ in results}) == 2, "both replicas served"
    assert [m.id for m in c.models.list().data] == ["t6-demo"]


def test_errors_and_other_routes_pass_through_unchanged(fleet):
    """A replica's 4xx comes back as its OpenAI error body (not retried, not a 500), and
    routes without a prompt reach a replica too."""
    import httpx
    c = client(fleet["affinity"])
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="t6-demo", prompt="x", max_tokens=-1)
    assert e.value.response.headers["x-tpaserve-attempts"] == "1"
    assert "max_tokens" in e.value.message
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    base = fleet["affinity"].removesuffix("/v1")
    assert httpx.get(f"{base}/health").status_code == 200
    tokens = httpx.post(f"{base}/tokenize", json={"model": "t6-demo", "prompt": "And God"})
    assert tokens.status_code == 200 and tokens.json()["count"] > 0


# ---- prefix affinity ------------------------------------------------------------------------
def run_workload(url: str, prompts: list[tuple[int, str]]) -> tuple[float, dict[int, set]]:
    """Sent one at a time; (the app's prefix-cache hit rate over the workload, from its
    replicas' counters before and after; the replicas that served each group)."""
    app = "rr" if url.endswith("/rr/v1") else "affinity"
    before = stats(app)
    c, served = client(url), {}
    for group, prompt in prompts:
        r = c.completions.with_raw_response.create(model="t6-demo", prompt=prompt,
                                                   max_tokens=1, temperature=0)
        served.setdefault(group, set()).add(r.headers["x-tpaserve-replica"])
    after = stats(app)
    assert after.keys() == before.keys(), "no replica was replaced meanwhile"
    queries = sum(after[r]["prefix_queries"] - before[r]["prefix_queries"] for r in after)
    hits = sum(after[r]["prefix_hits"] - before[r]["prefix_hits"] for r in after)
    return hits / queries, served


def test_prefix_affinity_more_than_doubles_the_prefix_cache_hit_rate(fleet):
    prompts = workload(seed=1)
    assert len({routing_key("/v1/completions", f'{{"prompt": "{p}"}}'.encode(), PREFIX_CHARS)
                for _, p in prompts}) == 24, "one routing key per group"
    affinity, served = run_workload(fleet["affinity"], prompts)
    round_robin, served_rr = run_workload(fleet["rr"], prompts)
    print(f"prefix-cache hit rate: affinity {affinity:.3f}, round robin {round_robin:.3f}")
    assert all(len(replicas) == 1 for replicas in served.values()), served
    assert sum(len(replicas) for replicas in served_rr.values()) > 24
    assert affinity > 2 * round_robin, (affinity, round_robin)


# ---- a replica dies -------------------------------------------------------------------------
@pytest.mark.parametrize("victim", ["replica", "engine core"])
def test_a_killed_replica_loses_no_accepted_request(fleet, victim):
    """SIGKILL while both replicas decode: every request is answered, some after a retry on
    the survivor (x-tpaserve-attempts 2; without the retry they would have failed), and Ray
    brings the fleet back to 2 replicas that serve."""
    c = client(fleet["affinity"])
    before = stats("affinity")
    assert len(before) == 2
    target = next(iter(before.values()))

    def ask(i: int):
        return c.completions.with_raw_response.create(
            model="t6-demo", prompt=f"{victim} {i}: In the beginning", max_tokens=48,
            temperature=0)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, i) for i in range(8)]
        deadline = time.monotonic() + 60
        while stats("affinity")[target["replica"]]["num_running"] == 0:
            assert time.monotonic() < deadline, "the target replica never got a request"
            time.sleep(0.05)
        os.kill(target["pid" if victim == "replica" else "core_pid"], signal.SIGKILL)
        responses = [f.result() for f in futures]          # raises on any error
    assert all(r.parse().usage.completion_tokens == 48 for r in responses)
    attempts = [int(r.headers["x-tpaserve-attempts"]) for r in responses]
    assert max(attempts) >= 2, attempts
    assert target["replica"] not in {r.headers["x-tpaserve-replica"] for r in responses}

    deadline = time.monotonic() + 180                      # Ray replaces the dead replica
    while True:
        now = stats("affinity")
        if len(now) == 2 and target["replica"] not in now:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.5)
    with ThreadPoolExecutor(4) as pool:
        served = {r.headers["x-tpaserve-replica"] for r in pool.map(ask, range(100, 108))}
    assert served <= set(now)


# ---- the command line -----------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["--replicas", "0"], "--replicas must be >= 1, got 0"),
    (["--max-replicas", "2", "--min-replicas", "3"], "--max-replicas must be >= 1 and >= "
     "--min-replicas (3), got 2"),
    (["--routing", "lru"], "invalid choice: 'lru'"),
    (["--api-server-count", "2"], "scale with --replicas"),
    (["--max-retries", "-1"], "--max-retries must be >= 0, got -1"),
])
def test_the_cli_refuses_bad_values_in_one_line(args, message):
    out = subprocess.run([sys.executable, "-m", "tpaserve", "ray", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert message in out.stderr


def test_routing_keys():
    chat = b'{"messages": [{"role": "system", "content": "Be brief."}, ' \
           b'{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}'
    assert routing_key("/v1/chat/completions", chat, 100) == "system: Be brief.\nuser: Hi"
    assert routing_key("/v1/completions", b'{"prompt": ["abcdef", "x"]}', 3) == "abc"
    assert routing_key("/v1/completions", b'{"prompt": [1, 2, 3]}', 100) == "[1, 2, 3]"
    assert routing_key("/v1/models", b"", 100) is None
    assert routing_key("/v1/completions", b"not json", 100) is None
    assert routing_key("/v1/completions", b'{"prompt": ""}', 100) is None


def test_docs_walk_through_the_ray_fleet():
    from tpaserve.serve_ray.cli import FleetArgs
    section = (REPO / "docs" / "deploy.md").read_text().split("## 9. A fleet on Ray Serve")[1]
    for step in ("pip install 'tpaserve[ray]'", "tpaserve ray --replicas 2",
                 "ray start --head", "--ray-address auto", "replica_stats("):
        assert step in section, step
    for name in FleetArgs.__dataclass_fields__:
        if name not in ("app_name", "min_replicas"):
            assert "--" + name.replace("_", "-") in section, name
    assert 'ray = ["ray[serve]==' in (REPO / "pyproject.toml").read_text()
