"""Prefix-cache hit rate and TTFT of a tpaserve fleet on Ray Serve (tpaserve/serve_ray):
1, 2, 4 replicas, prefix-affinity routing vs round robin, on a local Ray cluster.

    pip install 'tpaserve[ray]' matplotlib
    python -m bench.fleet --replicas 1 2 4 --json fleet.json --plot docs/img/fleet.png

The workload: `--groups` shared prefixes of about 50 tokens (3 cache blocks of the bundled
t6-demo), each asked once per round with its own short question, `--rounds` rounds, each in
its own random order, `--concurrency` streams at a time. Every replica has a small cache
(`--num-blocks`): one replica cannot hold every group's prefix, N replicas that split the
groups between them can; that is where routing by prefix pays. A fresh application (new
replicas, empty caches) for every point; 8 unrelated requests per replica warm it up first.

Hit rate: prompt tokens found in the prefix cache / looked up, summed over the replicas'
own counters (record_routing_stats), over the workload only. TTFT: the client's, from
sending the request to the first streamed text, through Ray's proxy and the ingress.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

WORDS = ("the lord said unto him and behold king israel house land people son father day man "
         "god hand heart sister mother love letter ball marriage fortune ladies gentleman "
         "evening morning walk").split()


def workload(seed: int, groups: int = 24, rounds: int = 3) -> list[tuple[int, str]]:
    """(group, prompt): `groups` prefixes of about 50 t6-demo tokens (42 words), each asked
    once per round with its own short question; each round in its own random order."""
    rng = random.Random(seed)
    prefixes = [" ".join(rng.choice(WORDS) for _ in range(42)) for _ in range(groups)]
    out = []
    for r in range(rounds):
        order = list(range(groups))
        rng.shuffle(order)
        out += [(g, f"{prefixes[g]}. Question {r}:") for g in order]
    return out


def ask(client, prompt: str, max_tokens: int) -> tuple[float, str]:
    """(TTFT in seconds, the replica that answered) of one streamed completion."""
    start = time.perf_counter()
    with client.completions.with_streaming_response.create(
            model="t6-demo", prompt=prompt, max_tokens=max_tokens, temperature=0,
            stream=True) as response:
        replica, ttft = response.headers["x-tpaserve-replica"], None
        for chunk in response.parse():
            if ttft is None and chunk.choices and chunk.choices[0].text:
                ttft = time.perf_counter() - start
    return ttft if ttft is not None else time.perf_counter() - start, replica


def run_point(serve, port: int, replicas: int, routing: str, args) -> dict:
    from openai import OpenAI

    from tpaserve.args import EngineArgs, ServerArgs
    from tpaserve.serve_ray.cli import FleetArgs
    from tpaserve.serve_ray.deployments import build_app, replica_stats
    fleet = FleetArgs(replicas=replicas, routing=routing, prefix_chars=args.prefix_chars,
                      num_cpus_per_replica=0.5, num_gpus_per_replica=0)
    engine = EngineArgs(max_model_len=128, num_blocks=args.num_blocks, max_num_seqs=16)
    started = time.monotonic()
    serve.run(build_app(engine, ServerArgs(graceful_shutdown_timeout=1), ["t6-demo"], fleet),
              name="fleet", route_prefix="/")
    startup = time.monotonic() - started
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    warm = [f"{i} " + p for i, (_, p) in enumerate(workload(args.seed + 1, 8 * replicas, 1))]
    with ThreadPoolExecutor(args.concurrency) as pool:        # warm every replica up
        list(pool.map(lambda p: ask(client, p, args.max_tokens), warm))
    before = {s["replica"]: s for s in replica_stats("fleet")}
    prompts = workload(args.seed, args.groups, args.rounds)
    started = time.monotonic()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda gp: ask(client, gp[1], args.max_tokens), prompts))
    elapsed = time.monotonic() - started
    after = {s["replica"]: s for s in replica_stats("fleet")}
    assert after.keys() == before.keys(), "a replica was replaced during the run"
    queries = sum(after[r]["prefix_queries"] - before[r]["prefix_queries"] for r in after)
    hits = sum(after[r]["prefix_hits"] - before[r]["prefix_hits"] for r in after)
    ttfts = sorted(t for t, _ in results)
    per_group: dict[int, set] = {}
    for (group, _), (_, replica) in zip(prompts, results):
        per_group.setdefault(group, set()).add(replica)
    serve.delete("fleet")
    return {"replicas": replicas, "routing": routing, "requests": len(prompts),
            "hit_rate": round(hits / queries, 4), "prefix_hits": hits,
            "prefix_queries": queries,
            "ttft_p50_ms": round(1e3 * statistics.median(ttfts), 1),
            "ttft_p90_ms": round(1e3 * ttfts[int(0.9 * (len(ttfts) - 1))], 1),
            "ttft_mean_ms": round(1e3 * statistics.fmean(ttfts), 1),
            "replicas_per_group": round(statistics.fmean(len(s) for s in per_group.values()), 2),
            "seconds": round(elapsed, 1), "startup_s": round(startup, 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--routing", nargs="+", default=["prefix", "round-robin"],
                   choices=["prefix", "round-robin", "power-of-two"])
    p.add_argument("--groups", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--num-blocks", type=int, default=64, help="cache blocks per replica")
    p.add_argument("--prefix-chars", type=int, default=64)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--plot", help="write the plot (PNG) here")
    args = p.parse_args(argv)

    import ray
    from ray import serve
    # Ray's memory monitor kills workers when the machine's memory runs short, whoever
    # uses it (another job on a shared machine): not what this measures
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray.init(num_cpus=8, include_dashboard=False, logging_level="warning", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    rows = []
    try:
        for n in args.replicas:
            for routing in args.routing:
                rows.append(run_point(serve, args.port, n, routing, args))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    if args.plot:
        from bench.plots import plot_fleet
        plot_fleet(rows, args.plot)


if __name__ == "__main__":
    main()
