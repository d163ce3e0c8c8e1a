"""The serving benchmark suite: one command on one H200, under 9 minutes, no network.

    python -m bench.run_gpu_suite --out results/         (from the repository root)

Steps (each a subprocess with its own time limit, all inside --budget-s; a step that fails
or runs out of time is recorded and the rest go on; a sweep keeps the points it finished):
  1. a random-weights T6-medium checkpoint + tiny tokenizer in --work-dir
  2. baselines at batch 1 and 64, prompt 512 / output 256: HF transformers `generate` on a
     same-size LLaMA, and the authors' full recompute per token (at batch 64 with 32 new
     tokens only: it needs ~0.6 s per token there)
  3. tpaserve on that checkpoint (bf16, --cache-memory), then with bench.serve, token-id
     prompts: concurrency sweep 1..256 (prompt 512 / output 256), a request-rate sweep,
     32K-token prompts, and capacity --verify (as many 4K-token requests as the cache holds)
  4. capacity table; plots (if matplotlib is there); suite.json; a short table, last.
--out ends up holding suite.json (every row, the verify result, the capacity table, each
step's status and time), server.log and the PNGs; each step's own files stay under raw/
when a step failed or with --keep-raw.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "t6-medium"
PROMPT, OUTPUT = 512, 256
CONCURRENCY = [1, 4, 16, 64, 256]
PROMPTS_PER_POINT = [4, 8, 32, 128, 256]         # >= 1 full wave per point, ~2 at low c
RATES, RATE_PROMPTS = [2.0, 8.0, 32.0], [24, 64, 128]
LONG_PROMPT, LONG_OUTPUT, LONG_REQUESTS, LONG_CONCURRENCY = 32768, 128, 8, 4
# --verify fills the whole cache with 4K-token requests; they must all be admitted (prefill
# at the engine's pace) before the first ones finish, hence 256 output tokens and a cache of
# 6 GiB (73 such sequences; a same-size MHA model would hold 16), which still holds the
# c=256 sweep point (256 x 768 tokens = 3.9 GiB) and four 32K-token requests.
VERIFY_CONTEXT, VERIFY_OUTPUT = 4096, 256
# The 32K capacity claim: the same 6 GiB holds 9 sequences of 32K for T6-medium against 2
# for a same-size MHA model. Admission is paced by 32K prefills (~5 s each), and while they
# run each admitted request decodes one token per (long) step, so 256 output tokens outlive
# the admission of the last one.
VERIFY_LONG_CONTEXT = 32768
CACHE_BYTES = 6 * 2**30
MAX_NUM_SEQS = 256
RECOMPUTE_B64_OUTPUT = 32      # shorter contexts than 256 would reach: flatters the baseline


class Suite:
    def __init__(self, out: Path, budget_s: float):
        self.out, self.deadline = out, time.monotonic() + budget_s
        self.raw = out / "raw"                    # per-step files, folded into suite.json
        self.raw.mkdir(parents=True, exist_ok=True)
        self.steps: list[dict] = []
        self.env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep
                        + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, msg: str) -> None:
        print(f"[suite {time.strftime('%H:%M:%S')}, {self.left():.0f}s left] {msg}", flush=True)

    def start(self, name: str, module: str, args: list[str], log: Path | None = None):
        cmd = [sys.executable, "-m", module, *map(str, args)]
        self.log(f"{name}: {' '.join(cmd[2:])}")
        stdout = open(log, "w") if log else None
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=stdout,
                                stderr=subprocess.STDOUT if log else None,
                                start_new_session=True)
        proc.name, proc.t0 = name, time.monotonic()
        return proc

    def finish(self, proc, limit_s: float) -> bool:
        """Wait up to limit_s (and never past the deadline minus a reserve); record."""
        limit = max(1.0, min(limit_s, self.left() - 20))
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            stop(proc)
            rc = "timeout"
        seconds = time.monotonic() - proc.t0
        self.steps.append(dict(step=proc.name, rc=rc, seconds=round(seconds, 1)))
        self.log(f"{proc.name}: rc={rc} in {seconds:.0f}s")
        return rc == 0

    def run(self, name: str, module: str, args: list[str], limit_s: float) -> bool:
        if self.left() < 40:
            self.steps.append(dict(step=name, rc="skipped: out of time", seconds=0))
            self.log(f"{name}: skipped, out of time")
            return False
        return self.finish(self.start(name, module, args), limit_s)


def stop(proc, grace_s: float = 15.0) -> None:
    """SIGTERM the process group we started, then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1.0)
    return False


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def rows(path: Path) -> list[dict]:
    return (read_json(path) or {}).get("rows", [])


def serve_args(url: str, vocab: int, **kw) -> list[str]:
    # temperature 1: random weights decode greedily into one repeated token; sampling keeps
    # the output (and the detokenizer's work) varied, as with a real model
    args = ["--base-url", url, "--model", MODEL, "--token-ids", "--vocab-size", vocab,
            "--no-progress", "--label", "tpaserve", "--temperature", 1.0]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", v]
    return args


def run_server_steps(s: Suite, ckpt: Path, vocab: int, server_args: list[str]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = s.start("server", "tpaserve", [
        "--model", ckpt, "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", port,
        "--dtype", "bfloat16", "--cache-memory", CACHE_BYTES, "--max-num-seqs", MAX_NUM_SEQS,
        "--max-model-len", LONG_PROMPT + LONG_OUTPUT + 128, *server_args],
        log=s.out / "server.log")
    try:
        if not wait_ready(url, server, min(240, s.left() - 60)):
            s.steps.append(dict(step="server start", rc=server.poll(), seconds=round(
                time.monotonic() - server.t0, 1)))
            s.log(f"server did not come up (see {s.out / 'server.log'}); skipping its steps")
            return
        s.steps.append(dict(step="server start", rc=0,
                            seconds=round(time.monotonic() - server.t0, 1)))
        s.log(f"server up at {url}")
        s.run("concurrency sweep", "bench.serve", serve_args(
            url, vocab, input_len=PROMPT, output_len=OUTPUT, warmup=8,
            concurrency=",".join(map(str, CONCURRENCY)),
            num_prompts=",".join(map(str, PROMPTS_PER_POINT)), max_time=30,
            json=s.raw / "sweep.json"), limit_s=200)
        s.run("long context", "bench.serve", serve_args(
            url, vocab, input_len=LONG_PROMPT, output_len=LONG_OUTPUT,
            concurrency=LONG_CONCURRENCY, num_prompts=LONG_REQUESTS, max_time=45, seed=1,
            json=s.raw / "long_context.json"), limit_s=90)
        s.run("capacity verify", "bench.capacity", [
            "--model", ckpt, "--cache-bytes", CACHE_BYTES, "--verify", url,
            "--verify-context", VERIFY_CONTEXT, "--verify-output-len", VERIFY_OUTPUT,
            "--vocab-size", vocab, "--seed", 3, "--json", s.raw / "capacity_verify.json"],
            limit_s=120)
        s.run("capacity verify 32K", "bench.capacity", [
            "--model", ckpt, "--cache-bytes", CACHE_BYTES, "--verify", url,
            "--verify-context", VERIFY_LONG_CONTEXT, "--verify-output-len", VERIFY_OUTPUT,
            "--vocab-size", vocab, "--seed", 4, "--json", s.raw / "capacity_verify_32k.json"],
            limit_s=180)
        s.run("rate sweep", "bench.serve", serve_args(
            url, vocab, input_len=PROMPT, output_len=OUTPUT,
            request_rate=",".join(map(str, RATES)),
            num_prompts=",".join(map(str, RATE_PROMPTS)), max_time=20, seed=2,
            json=s.raw / "rate_sweep.json"), limit_s=120)
    finally:
        stop(server)


def plots(s: Suite, results: dict) -> None:
    if not _has_matplotlib():
        s.log("matplotlib not installed: no PNG plots (the JSON has every number)")
        return
    from bench.plots import plot_serving
    plot_serving(results["sweep"] + results["baselines"], str(s.out / "throughput.png"))
    plot_serving(results["rate_sweep"], str(s.out / "latency_vs_rate.png"))


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def _f(v, fmt=".0f") -> str:
    return "-" if v is None else format(v, fmt)


def summary_table(results: dict) -> str:
    lines = [f"{'run (prompt/output)':<22}{'batch/conc':>11}{'out tok/s':>11}{'TTFT p50 ms':>13}"
             f"{'ITL p50 ms':>12}{'TPOT ms':>9}{'ok/failed':>11}"]
    for r in results["baselines"] + results["sweep"] + results["long_context"]:
        name = f"{r.get('label', '')} {r.get('input_len')}/{r.get('output_len')}"
        lines.append(f"{name:<22}{_f(r.get('concurrency')):>11}"
                     f"{_f(r.get('output_throughput')):>11}{_f(r.get('median_ttft_ms'), '.1f'):>13}"
                     f"{_f(r.get('median_itl_ms'), '.2f'):>12}{_f(r.get('mean_tpot_ms'), '.2f'):>9}"
                     f"{r.get('completed', 0):>6}/{r.get('failed', 0)}")
    for v in (results.get("verify"), results.get("verify_32k")):
        if v:
            lines.append(f"capacity verify: {v['max_running']} of {v['requested']} requests of "
                         f"{v['context']} tokens running at once (server cache "
                         f"{v['server_num_blocks']} blocks); completed {v['completed']}, "
                         f"failed {v['failed']}")
    cap = results.get("capacity")
    if cap:
        r = next((r for r in cap["rows"] if r["context"] == VERIFY_CONTEXT), cap["rows"][0])
        lines.append(f"capacity at {r['context']} tokens in {cap['cache_bytes'] / 2**30:.0f} GiB: "
                     + ", ".join(f"{k} {v}" for k, v in r.items()
                                 if k not in ("context", "tpa_over_mha"))
                     + f" (TPA/MHA {r['tpa_over_mha']:.2f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.run_gpu_suite", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results")
    ap.add_argument("--work-dir", default=None, help="checkpoint goes here (default: a temp dir)")
    ap.add_argument("--budget-s", type=float, default=510, help="wall time for everything")
    ap.add_argument("--keep-raw", action="store_true",
                    help="keep each step's own JSON/log under OUT/raw (default: only suite.json, "
                         "server.log and the plots stay)")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--skip-server", action="store_true")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra tpaserve flag, repeatable (e.g. --server-arg=--enforce-eager)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="tpaserve-bench-"))
    s = Suite(out, args.budget_s)
    raw = s.raw
    ckpt = work / "t6-medium-random"
    # Not overlapped with the baselines: HF generate at batch 1 is bound by the host CPU,
    # which writing the checkpoint would share.
    checkpoint_ok = s.run("checkpoint", "bench.make_random_checkpoint", [
        "--preset", MODEL, "--out", ckpt,
        "--max-position", LONG_PROMPT + LONG_OUTPUT + 1024], limit_s=150)
    if not args.skip_baselines:
        def common(batch, output_len=OUTPUT):
            return ["--device", "cuda", "--dtype", "bfloat16", "--batch", batch,
                    "--prompt-len", PROMPT, "--output-len", output_len]
        s.run("baseline hf", "bench.baseline_hf",
              [*common("1,64"), "--json", raw / "baseline_hf.json"], limit_s=110)
        s.run("baseline recompute", "bench.baseline_recompute",
              [*common(1), "--json", raw / "baseline_recompute.json"], limit_s=60)
        # recompute at batch 64 takes ~0.6 s per token (H200): 256 tokens would be minutes
        s.run("baseline recompute b64", "bench.baseline_recompute",
              [*common(64, RECOMPUTE_B64_OUTPUT), "--json", raw / "baseline_recompute_b64.json"],
              limit_s=60)
    vocab = None
    if checkpoint_ok:
        from tpaserve.models.tokenizer import load_tokenizer
        vocab = load_tokenizer(ckpt).vocab_size
    if checkpoint_ok and not args.skip_server:
        run_server_steps(s, ckpt, vocab, args.server_arg)
    s.run("capacity table", "bench.capacity", [
        "--model", MODEL, "--cache-bytes", "80GiB", "--json", raw / "capacity.json",
        *(["--plot", out / "capacity.png"] if _has_matplotlib() else [])],
        limit_s=30)
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)

    verify = read_json(raw / "capacity_verify.json") or {}
    verify_32k = read_json(raw / "capacity_verify_32k.json") or {}
    results = dict(
        baselines=(rows(raw / "baseline_hf.json") + rows(raw / "baseline_recompute.json")
                   + rows(raw / "baseline_recompute_b64.json")),
        sweep=rows(raw / "sweep.json"), rate_sweep=rows(raw / "rate_sweep.json"),
        long_context=rows(raw / "long_context.json"), verify=verify.get("verify"),
        verify_32k=verify_32k.get("verify"),
        capacity=read_json(raw / "capacity.json"), steps=s.steps)
    plots(s, results)
    (out / "suite.json").write_text(json.dumps(results, indent=1))
    if not args.keep_raw and all(st["rc"] == 0 for st in s.steps):
        shutil.rmtree(raw, ignore_errors=True)       # on a failure, its logs stay
    print("\n" + "\n".join(f"  {st['step']:<20} rc={st['rc']} {st['seconds']}s"
                           for st in s.steps))
    print("\n" + summary_table(results), flush=True)
    return results


if __name__ == "__main__":
    main()
