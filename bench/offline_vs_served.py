"""The same workload offline (`LLM.generate`) and served (HTTP, streamed), in one run, with
where the served time goes: one model, one engine configuration.

    python -m bench.offline_vs_served --model ckpt/ --name t6-medium --input-len 512 \
        --output-len 256 --concurrency 1,64,256,512 --num-prompts 16,512,1024,1024 \
        --offline-prompts 1024 --json out.json -- --max-num-seqs 512 --cache-memory 24GiB

Everything after `--` is a `tpaserve` engine flag, given to both the offline engine
(bench/offline.py, its own process) and the server. The server's load comes from several
client processes (--client-procs, split by concurrency: one Python client tops out near
10K streamed events/s), all started together; a point's duration runs from the first send
to the last completion over all of them.

Each served row also says where the time went, from /proc and /metrics over the point:
  api_cpu   CPU seconds per second of the API process(es) (1.0 = one core saturated)
  core_cpu  the same for the engine core process (its loop thread, its I/O threads; waiting
            for the GPU spins, so it is near 1.0 whenever the core is busy)
  host_frac, wait_frac  the core loop's share of time on host work (schedule, launch,
            update) and waiting for the device: host-bound when wait_frac is near 0
  core_busy the core's summed step times per second (1.0 = a step always running)
  tokens_per_step, seqs_per_step, step_ms: what the core's steps were
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np

from bench.metrics import summarize
from bench.serve import run_load
from bench.workload import make_requests

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK          # utime + stime


def scrape(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name.split("{")[0]] = out.get(name.split("{")[0], 0.0) + float(value)
    return out


def server_pids(log: Path, main_pid: int) -> tuple[list[int], int]:
    """(the API processes, the engine core), from the server's start-up log lines."""
    text = log.read_text()
    core = int(re.search(r"engine core process (\d+)", text)[1])
    m = re.search(r"\d+ API processes: ([\d, ]+)", text)
    api = [int(p) for p in m[1].split(", ")] if m else [main_pid]
    return api, core


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(args: tuple) -> tuple[list, float, float]:
    """One client process: its share of a point's requests, all sent as fast as allowed."""
    base_url, name, specs, concurrency, temperature, barrier = args
    barrier.wait()
    start = time.perf_counter()
    results, _ = asyncio.run(run_load(base_url, name, specs, np.zeros(len(specs)),
                                      concurrency=concurrency,
                                      extra_body=dict(temperature=temperature)))
    return results, start, time.perf_counter()


def run_point(url: str, name: str, specs: list, concurrency: int, procs: int,
              temperature: float) -> tuple[list, float]:
    procs = max(1, min(procs, concurrency, len(specs)))
    ctx = multiprocessing.get_context("fork")        # clients only: no CUDA in this process
    barrier = ctx.Manager().Barrier(procs)
    shares = [specs[i::procs] for i in range(procs)]
    conc = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    with ctx.Pool(procs) as pool:
        parts = pool.map(_client, [(url, name, s, c, temperature, barrier)
                                   for s, c in zip(shares, conc)])
    results = [r for part, _, _ in parts for r in part]
    return results, max(e for _, _, e in parts) - min(s for _, s, _ in parts)


def start_server(args, flags: list[str], log: Path):
    port = free_port()
    entry = [str(ROOT / "bench" / "fake_core.py")] if args.fake_core else ["-m", "tpaserve"]
    cmd = [sys.executable, *entry, "--model", args.model, "--served-model-name",
           args.name, "--port", str(port), "--log-level", "info", *flags]
    print("server:", " ".join(cmd[1:]), flush=True)
    out = open(log, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(int(args.startup_timeout * 2)):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                time.sleep(1)                   # every API process up
                return proc, url, server_pids(log, proc.pid)
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become ready")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def served_rows(args, flags: list[str]) -> list[dict]:
    log = Path(args.out_dir) / f"server-{args.name}.log"
    proc, url, (api_pids, core_pid) = start_server(args, flags, log)

    def cpu() -> tuple[float, float]:
        return sum(cpu_seconds(p) for p in api_pids), cpu_seconds(core_pid)
    rows = []
    try:
        warm = make_requests(args.warmup, args.input_len, 16, seed=99, token_ids=True,
                             vocab_size=args.vocab_size)
        run_point(url, args.name, warm, len(warm), 1, args.temperature)
        for i, (c, n) in enumerate(zip(args.concurrency, args.num_prompts)):
            specs = make_requests(n, args.input_len, args.output_len, seed=7919 * (i + 1),
                                  token_ids=True, vocab_size=args.vocab_size)
            m0, cpu0 = scrape(url), cpu()
            procs = 1 if c <= 16 else args.client_procs
            results, duration = run_point(url, args.name, specs, c, procs, args.temperature)
            m1, cpu1 = scrape(url), cpu()
            row = summarize(results, duration, label=args.name, mode="served", concurrency=c,
                            num_prompts=n, input_len=args.input_len,
                            output_len=args.output_len, client_procs=procs)
            d = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in m1}
            steps = d.get("tpaserve:engine_step_duration_seconds_count", 0.0) or math.nan
            row.update(api_cpu=(cpu1[0] - cpu0[0]) / duration,
                       core_cpu=(cpu1[1] - cpu0[1]) / duration,
                       core_busy=d.get("tpaserve:engine_step_duration_seconds_sum", 0) / duration,
                       step_ms=1e3 * d.get("tpaserve:engine_step_duration_seconds_sum", 0) / steps,
                       tokens_per_step=d.get("tpaserve:iteration_tokens_total_sum", 0) / steps,
                       seqs_per_step=d.get("tpaserve:engine_step_batch_size_sum", 0) / steps,
                       preemptions=d.get("tpaserve:num_preemptions_total", 0),
                       host_frac=d.get("tpaserve:engine_host_seconds_total", 0) / duration,
                       wait_frac=d.get("tpaserve:engine_device_wait_seconds_total", 0) / duration,
                       api_procs=len(api_pids),
                       # the server's own view of the latency: queue (arrival -> scheduled,
                       # in the core) and time to first token (arrival -> first output
                       # processed in the API process), means in ms
                       server_queue_ms=1e3 * _mean(d, "tpaserve:request_queue_time_seconds"),
                       server_ttft_ms=1e3 * _mean(d, "tpaserve:time_to_first_token_seconds"))
            print(fmt(row), flush=True)
            rows.append(row)
    finally:
        stop_server(proc)
    return rows


def _mean(d: dict, hist: str) -> float:
    n = d.get(hist + "_count", 0.0)
    return d.get(hist + "_sum", 0.0) / n if n else math.nan


def offline_row(args, flags: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench.offline", "--model", args.model, "--num-prompts",
           str(args.offline_prompts), "--input-len", str(args.input_len), "--output-len",
           str(args.output_len), "--vocab-size", str(args.vocab_size), "--temperature",
           str(args.temperature), "--", *flags]
    print("offline:", " ".join(cmd[2:]), flush=True)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"bench.offline failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row.update(label=args.name, concurrency=None)
    print(fmt(row), flush=True)
    return row


def fmt(row: dict) -> str:
    if row["mode"] == "offline":
        return (f"{row['label']:>10} offline  {row['num_prompts']:>5} prompts "
                f"{row['output_throughput']:>9,.0f} out tok/s  ({row['duration_s']:.1f} s)")
    return (f"{row['label']:>10} served c={row['concurrency']:<4} "
            f"{row['output_throughput']:>9,.0f} out tok/s  TPOT p50 "
            f"{row['median_tpot_ms'] or 0:6.2f} ms  TTFT p50 "
            f"{row['median_ttft_ms'] or 0:7.1f} ms (server: queue {row['server_queue_ms']:.1f}, "
            f"ttft {row['server_ttft_ms']:.1f})  api_cpu {row['api_cpu']:.2f} "
            f"core host {row['host_frac']:.2f} wait {row['wait_frac']:.2f} "
            f"step {row['step_ms']:.2f} ms x {row['seqs_per_step']:.0f} seqs "
            f"{row['tokens_per_step']:.0f} tok  failed {row['failed']}")


def main(argv: Sequence[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.offline_vs_served", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--name", required=True, help="served model name / row label")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=1000)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--concurrency", default="1,64,256,512")
    ap.add_argument("--num-prompts", default="16,512,1024,1024")
    ap.add_argument("--offline-prompts", type=int, default=1024)
    ap.add_argument("--client-procs", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=32)
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--fake-core", action="store_true",
                    help="serve with bench/fake_core.py's stand-in engine core (the API "
                         "process alone is measured; implies --skip-offline)")
    ap.add_argument("--startup-timeout", type=float, default=300)
    ap.add_argument("--out-dir", default="/tmp")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("engine_flags", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    args.num_prompts = [int(x) for x in args.num_prompts.split(",")]
    flags = [f for f in args.engine_flags if f != "--"]
    rows = [] if args.skip_offline or args.fake_core else [offline_row(args, flags)]
    rows += served_rows(args, flags)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(engine_flags=flags, rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
