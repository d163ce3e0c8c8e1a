"""The paper's family side by side (#17 item 6): T6-medium and its medium-size twins, random
weights at the authors' configurations, the same workloads, one table and one plot.

    python -m bench.family --out results/family               # one H200, ~8 minutes
    python -m bench.family --smoke --out /tmp/family-smoke    # CPU, tiny twins, ~2 minutes
    python -m bench.family --report results/family/family.json \
        --markdown results/family/family.md --plot docs/img/family.png

Twins (bench/presets.py; 24 layers, d_model 1024, d_h 64, vocab 50304, bf16): T6 (h 47,
R_Q 6, R 2), T6-KVonly (h 29), MHA-16, GQA-4 (28 query / 4 kv heads), GQA-2 (30 / 2, the
authors' medium GQA), MQA (31 / 1), MLA (23 heads, kv_lora 256, rope 32). Per twin:
  cache     bytes per token, all layers: the engine's FactorCacheSpec (MLA: its latent
            rows, kv_lora + rope a layer)
  capacity  sequences of 32K tokens that fit a 16 GiB cache, as the engine shows it: the
            server started with --cache-memory 16GiB reports tpaserve:factor_cache_blocks_total
            on /metrics; capacity = blocks // ceil(32768 / block_size)
  decode    one layer's paged decode attention (kernels.ops.paged_attention over the twin's
            cache, MLA: kernels.ops.mla_attention over its latent cache; split-K, shuffled
            block tables), do_bench median at 64 x 32K and 64 x 128K;
            "% copy" = cache bytes read / time / device copy bandwidth
  served    bench.serve against that server (token-id prompts, ignore_eos, temperature 1):
            output tok/s at concurrency 64 and 256 (prompt 512, 128 new tokens), TTFT p50 and
            TPOT at 4 concurrent 32K-token prompts (32 new tokens)
A twin the engine refuses (none since MLA is served) gets its cache bytes and one line
saying why the rest is missing. Sized for the device call's ~8 minutes (see WORKLOADS):
each twin's server steps have time limits and everything stops at --budget-s; family.json
is rewritten after every twin, so a cut-off run keeps what it measured. --smoke runs the
same steps end to end on the CPU with 2-layer twins and tiny contexts (its numbers mean
nothing but that every step works).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tpaserve" / "demo" / "t6-demo"      # 8192 pieces, copied into every twin
# table order; RUN_ORDER runs the comparisons the issue names first, in case time runs out
TWINS = {"T6": "t6-medium", "T6-KVonly": "t6-medium-kvonly", "MHA-16": "mha16-medium",
         "GQA-4": "gqa4-medium", "GQA-2": "gqa2-medium", "MQA": "mqa-medium",
         "MLA": "mla-medium"}
RUN_ORDER = ("T6", "GQA-2", "MHA-16", "MQA", "GQA-4", "T6-KVonly", "MLA")


@dataclass(frozen=True)
class Workload:
    cache_bytes: int               # --cache-memory of every server
    capacity_context: int
    decode_points: tuple[tuple[int, int], ...]     # (batch, context)
    prompt: int                    # throughput points
    output: int
    concurrency: tuple[int, ...]
    num_prompts: tuple[int, ...]   # one per concurrency: one or two waves
    long_prompt: int               # TTFT / TPOT point
    long_output: int
    long_requests: int
    warmup: int = 4
    block_size: int = 16
    dtype: str = "bfloat16"
    device: str = "cuda"


# H200 sizing, ~8 minutes for six served twins: a medium checkpoint writes in ~9 s and a
# server starts in ~15-25 s; c=64 and c=256 points of 128 new tokens take a few seconds each
# at T6-medium's 25K / 50K tok/s; four 32K prompts prefill in ~7 s (1.6 s each, chunked).
# 16 GiB holds c=256 x 640 tokens even for MHA-16 (98 KB/token: 170K tokens) and 4 x 32K.
GPU = Workload(cache_bytes=16 * 2**30, capacity_context=32768,
               decode_points=((64, 32768), (64, 131072)), prompt=512, output=128,
               concurrency=(64, 256), num_prompts=(128, 256), long_prompt=32768,
               long_output=32, long_requests=4)
SMOKE = Workload(cache_bytes=64 * 2**20, capacity_context=256,
                 decode_points=((2, 64), (2, 136)), prompt=16, output=4, concurrency=(2, 4),
                 num_prompts=(2, 4), long_prompt=128, long_output=3, long_requests=4,
                 warmup=1, dtype="float32", device="cpu")


def twin_config(name: str, smoke: bool, max_position: int):
    """The preset at medium size, or (smoke) the same kind of model at 2 layers, d_model 64,
    d_h 16, vocab 8192 + 64 (ranks and head ratios kept small, not scaled)."""
    from bench.presets import model_config
    from tpaserve.config import ModelConfig
    from tpaserve.models.dense import DenseConfig
    from tpaserve.models.mla import MLAConfig
    cfg = model_config(TWINS[name], max_position=max_position)
    if not smoke:
        return cfg
    tiny = dict(n_layer=2, n_embd=64, vocab_size=8192 + 64, max_position=max_position)
    if isinstance(cfg, ModelConfig):
        return dataclasses.replace(cfg, n_head=7 if cfg.q_rank else 5, head_dim=16,
                                   q_rank=cfg.q_rank and 3, **tiny)
    if isinstance(cfg, DenseConfig):        # MHA: n_head x d_h = d_model, as llama-mha has it
        h, kv = {"MHA-16": (4, 4), "GQA-4": (8, 4), "GQA-2": (6, 2), "MQA": (7, 1)}[name]
        return dataclasses.replace(cfg, n_head=h, n_kv_head=kv, head_dim=16, **tiny)
    assert isinstance(cfg, MLAConfig)
    return dataclasses.replace(cfg, n_head=3, q_lora_rank=24, kv_lora_rank=16,
                               qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, **tiny)


def cache_info(cfg, w: Workload) -> dict:
    """Bytes per token (the engine's spec where it serves the twin) and the arithmetic
    capacity at w.capacity_context in w.cache_bytes."""
    from tpaserve.config import ConfigError
    from tpaserve.models.loader import DTYPES
    from tpaserve.runner.factor_cache import FactorCacheSpec, cache_bytes_per_token
    dtype = DTYPES[w.dtype]
    out = dict(layers=cfg.n_layer, elems_per_token_layer=cfg.cache_elems_per_token_layer,
               bytes_per_token=cache_bytes_per_token(cfg, dtype), dtype=w.dtype)
    try:
        spec = FactorCacheSpec.from_model(cfg, dtype, w.block_size)
        assert spec.bytes_per_token == out["bytes_per_token"]
    except ConfigError as e:
        out["engine_refuses"] = str(e)
    per_seq = math.ceil(w.capacity_context / w.block_size) * w.block_size
    out["capacity_arithmetic"] = w.cache_bytes // (per_seq * out["bytes_per_token"])
    return out


# ------------------------------------------------------------------ decode (subprocess)

def _median_ms(fn, device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, return_mode="median")
    t = time.perf_counter()             # the CPU interpreter: once, to see that it runs
    fn()
    return (time.perf_counter() - t) * 1e3


def decode_point(cfg, batch: int, ctx: int, w: Workload) -> dict:
    """One layer's decode over `batch` sequences of `ctx` cached tokens, the twin's cache."""
    import torch

    from tpaserve.kernels.ops import make_workspace, paged_attention
    from tpaserve.kernels.reference import paged_attention_ref
    from tpaserve.models.loader import DTYPES
    from tpaserve.runner.factor_cache import FactorCacheSpec
    dtype, dev, bs = DTYPES[w.dtype], w.device, w.block_size
    s = FactorCacheSpec.from_model(cfg, dtype, bs)
    g = torch.Generator(device=dev).manual_seed(batch + ctx)
    rnd = lambda *shape: torch.randn(*shape, device=dev, dtype=dtype, generator=g)  # noqa: E731
    nblk = -(-ctx // bs)
    nb = batch * nblk
    if s.latent:
        return _latent_decode_point(s, batch, ctx, nb, rnd, w)
    q = rnd(batch, s.n_head, s.head_dim)                                 # (B, h, d_h)
    bk, bv = rnd(nb, bs, s.k_rank, s.head_dim), rnd(nb, bs, s.v_rank, s.head_dim)
    ak = None if s.const_a else rnd(nb, bs, s.n_head, s.k_rank)          # (blocks, bs, h, R)
    av = None if s.const_a else rnd(nb, bs, s.n_head, s.v_rank)
    perm = torch.randperm(nb, device=dev, generator=g)
    tables = perm.to(torch.int32).view(batch, nblk)                      # shuffled blocks
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    ws = make_workspace(batch, s.n_head, s.head_dim, device=dev)
    run = lambda: paged_attention(q, ak, bk, av, bv, tables, seq_lens, qsl, 1,  # noqa: E731
                                  ctx, workspace=ws)
    out = dict(batch=batch, context=ctx, bytes=batch * ctx * s.bytes_per_token // s.n_layer)
    if batch * ctx <= 2 * 4096:         # the smoke's sizes: check the kernel, not only time it
        want = paged_attention_ref(*[t if t is None else t.cpu().float()
                                     if t.is_floating_point() else t.cpu()
                                     for t in (q, ak, bk, av, bv, tables, seq_lens, qsl)])
        got = run().float().cpu()
        out["rel_err"] = ((got - want).norm() / want.norm()).item()
        assert out["rel_err"] < 2e-2, out
    out["ms"] = _median_ms(run, dev)
    return out                          # the caches go with this frame (empty_cache: caller)


def _latent_decode_point(s, batch: int, ctx: int, nb: int, rnd, w: Workload) -> dict:
    """decode_point for MLA: its absorbed kernel over a latent cache (kv_lora + rope rows)."""
    import torch

    from tpaserve.kernels.ops import make_workspace, mla_attention
    from tpaserve.kernels.reference import mla_attention_ref
    dev, row = w.device, s.kv_lora + s.rope_dim
    q = rnd(batch, s.n_head, row)                                   # [q_lat, q_pe] (B, h, row)
    cache = rnd(nb, w.block_size, row)                              # (blocks, bs, row)
    tables = torch.randperm(nb, device=dev).to(torch.int32).view(batch, -1)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    ws = make_workspace(batch, s.n_head, s.kv_lora, device=dev)
    scale = s.head_dim ** -0.5                                      # 1 / sqrt(nope + rope)
    run = lambda: mla_attention(q, cache, tables, seq_lens, qsl, 1, ctx, s.kv_lora,  # noqa: E731
                                scale, workspace=ws)
    out = dict(batch=batch, context=ctx, bytes=batch * ctx * s.bytes_per_token // s.n_layer)
    if batch * ctx <= 2 * 4096:
        want = mla_attention_ref(q.cpu().float(), cache.cpu().float(), tables.cpu(),
                                 seq_lens.cpu(), qsl.cpu(), s.kv_lora, scale)
        got = run().float().cpu()
        out["rel_err"] = ((got - want).norm() / want.norm()).item()
        assert out["rel_err"] < 2e-2, out
    out["ms"] = _median_ms(run, dev)
    return out


def copy_bandwidth_gbs() -> float:
    import torch
    from triton.testing import do_bench
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() / (t * 1e-3) / 1e9


def decode_main(args: argparse.Namespace) -> None:
    """`--decode-only`: every twin's decode points into args.decode_json."""
    w = SMOKE if args.smoke else GPU
    copy_gbs = copy_bandwidth_gbs() if w.device == "cuda" else None
    rows = {}
    for name in RUN_ORDER:
        cfg = twin_config(name, args.smoke, 1024)
        info = cache_info(cfg, w)
        if "engine_refuses" in info:
            rows[name] = dict(skipped=f"no paged decode kernel: {info['engine_refuses']}")
        else:
            # at a size the fp32 reference can check (the timed points are too big for it)
            check = decode_point(cfg, 2, 1000, w)["rel_err"] if w.device == "cuda" else None
            points = []
            for batch, ctx in w.decode_points:
                p = decode_point(cfg, batch, ctx, w)
                if w.device == "cuda":
                    import torch
                    torch.cuda.empty_cache()
                if copy_gbs:
                    p["copy_pct"] = 100 * p["bytes"] / (p["ms"] * 1e-3) / 1e9 / copy_gbs
                points.append(p)
                print(f"decode {name:<10} {batch} x {ctx}: {p['ms']:.3f} ms/layer"
                      + (f" ({p['copy_pct']:.0f}% copy)" if copy_gbs else ""), flush=True)
            rows[name] = dict(points=points, check_rel_err=check)
        Path(args.decode_json).write_text(json.dumps(dict(copy_gbs=copy_gbs, twins=rows)))


# ------------------------------------------------------------------ served (orchestrator)

def metric_gauges(url: str) -> dict[str, float]:
    from bench.capacity import read_gauges
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return read_gauges(text, ("tpaserve:factor_cache_blocks_total",
                              "tpaserve:factor_cache_bytes_per_token"))


def refusal_line(log: Path) -> str:
    """The server's last error line (why it exited), trimmed."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    hits = [ln for ln in lines if "not implemented" in ln or "rror" in ln]
    line = (hits or lines or ["(no log)"])[-1].strip()
    return line.split("error: ", 1)[-1][:600]


def serve_twin(s, name: str, ckpt: Path, vocab: int, w: Workload) -> dict:
    """Start tpaserve on the twin, read its capacity from /metrics, run the load points."""
    from bench.run_gpu_suite import free_port, rows, stop, wait_ready
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = s.raw / f"{name}.server.log"
    flags = ["--model", ckpt, "--served-model-name", name, "--host", "127.0.0.1",
             "--port", port, "--dtype", w.dtype, "--device", w.device,
             "--cache-memory", w.cache_bytes, "--block-size", w.block_size,
             "--max-num-seqs", max(w.concurrency),
             "--max-model-len", max(w.long_prompt + w.long_output, w.capacity_context) + 64]
    server = s.start(f"{name} server", "tpaserve", flags, log=log)
    out: dict = {}
    try:
        if not wait_ready(url, server, min(300 if w.device == "cpu" else 180, s.left() - 30)):
            out["skipped"] = f"server did not start: {refusal_line(log)}"
            s.steps.append(dict(step=f"{name} server", rc=server.poll(), seconds=round(
                time.monotonic() - server.t0, 1)))
            return out
        s.steps.append(dict(step=f"{name} server", rc=0,
                            seconds=round(time.monotonic() - server.t0, 1)))
        g = metric_gauges(url)
        if "tpaserve:factor_cache_blocks_total" in g:
            blocks = int(g["tpaserve:factor_cache_blocks_total"])
            out["engine"] = dict(
                blocks=blocks, block_size=w.block_size,
                bytes_per_token=int(g.get("tpaserve:factor_cache_bytes_per_token", 0)),
                capacity=blocks // math.ceil(w.capacity_context / w.block_size))
        else:
            out["engine"] = dict(missing="no tpaserve:factor_cache_blocks_total on /metrics")
        common = ["--base-url", url, "--model", name, "--token-ids", "--vocab-size", vocab,
                  "--no-progress", "--label", name, "--temperature", 1.0]
        tput, long = s.raw / f"{name}.serve.json", s.raw / f"{name}.long.json"
        s.run(f"{name} throughput", "bench.serve", [
            *common, "--input-len", w.prompt, "--output-len", w.output, "--warmup", w.warmup,
            "--concurrency", ",".join(map(str, w.concurrency)),
            "--num-prompts", ",".join(map(str, w.num_prompts)), "--max-time", 30,
            "--json", tput], limit_s=150 if w.device == "cpu" else 75)
        s.run(f"{name} 32K prompts", "bench.serve", [
            *common, "--input-len", w.long_prompt, "--output-len", w.long_output,
            "--concurrency", w.long_requests, "--num-prompts", w.long_requests, "--seed", 1,
            "--json", long], limit_s=150 if w.device == "cpu" else 60)
        out["throughput"] = rows(tput)
        out["long"] = rows(long)
    finally:
        stop(server)
    return out


def run(args: argparse.Namespace) -> dict:
    import torch

    from bench.make_random_checkpoint import make_checkpoint
    from bench.run_gpu_suite import Suite, read_json
    w = SMOKE if args.smoke else GPU
    torch.set_num_threads(max(1, min(16, os.cpu_count() or 1)))      # random init, saving
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    s = Suite(out, args.budget_s)
    result = dict(workload=dataclasses.asdict(w), smoke=args.smoke, twins={}, steps=s.steps)
    path = out / "family.json"

    def save() -> None:
        path.write_text(json.dumps(result, indent=1))

    max_position = max(w.long_prompt + w.long_output, w.capacity_context) + 1024
    for name in TWINS:                         # the arithmetic first: it cannot fail on time
        result["twins"][name] = dict(preset=TWINS[name], cache=cache_info(
            twin_config(name, args.smoke, max_position), w))
    decode_json = s.raw / "decode.json"
    if not args.skip_decode:
        s.run("decode", "bench.family", ["--decode-only", "--decode-json", decode_json,
                                         *(["--smoke"] if args.smoke else [])],
              limit_s=300 if args.smoke else 120)
    decode = read_json(decode_json) or {}
    result["copy_gbs"] = decode.get("copy_gbs")
    for name in TWINS:
        result["twins"][name]["decode"] = decode.get("twins", {}).get(name)
    save()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="tpaserve-family-"))
    for name in [n for n in RUN_ORDER if n in args.twins]:
        if s.left() < 60:
            result["twins"][name]["served"] = dict(skipped="out of time")
            s.log(f"{name}: out of time")
            continue
        t0 = time.monotonic()
        ckpt = work / name
        info = make_checkpoint(twin_config(name, args.smoke, max_position), ckpt,
                               max_position=max_position, dtype=w.dtype, tokenizer_from=TOKENIZER)
        s.steps.append(dict(step=f"{name} checkpoint", rc=0,
                            seconds=round(time.monotonic() - t0, 1)))
        result["twins"][name]["params"] = info["params"]
        try:
            result["twins"][name]["served"] = serve_twin(s, name, ckpt, info["vocab_size"], w)
        except Exception as e:                  # one twin's failure must not end the run
            result["twins"][name]["served"] = dict(skipped=f"{type(e).__name__}: {e}"[:600])
            s.log(f"{name}: {type(e).__name__}: {e}")
        shutil.rmtree(ckpt, ignore_errors=True)
        save()
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    table = format_markdown(result)
    (out / "family.md").write_text(table + "\n")
    print("\n" + table, flush=True)
    if _has_matplotlib():
        from bench.plots import plot_family
        plot_family(result, str(out / "family.png"))
    return result


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


# ------------------------------------------------------------------ report

def summary(result: dict) -> list[dict]:
    """One flat row per twin (table order): the numbers the table and the plot show."""
    out = []
    for name, t in result["twins"].items():
        served, decode = t.get("served") or {}, t.get("decode") or {}
        row = dict(name=name, bytes_per_token=t["cache"]["bytes_per_token"],
                   capacity_arithmetic=t["cache"]["capacity_arithmetic"],
                   capacity_engine=(served.get("engine") or {}).get("capacity"),
                   skipped=served.get("skipped") or decode.get("skipped")
                   or t["cache"].get("engine_refuses"))
        for p in decode.get("points") or []:
            key = f"decode_{p['batch']}x{p['context']}"
            row[key + "_ms"], row[key + "_copy_pct"] = p["ms"], p.get("copy_pct")
        for r in served.get("throughput") or []:
            row[f"tok_s_c{r['concurrency']}"] = r["output_throughput"] if r["completed"] else None
            row[f"failed_c{r['concurrency']}"] = r["failed"]
        for r in served.get("long") or []:
            row["long_ttft_p50_ms"], row["long_tpot_ms"] = r["median_ttft_ms"], r["mean_tpot_ms"]
            row["long_failed"] = r["failed"]
        out.append(row)
    return out


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_markdown(result: dict) -> str:
    """The table, then one line per metric naming every twin that beats T6 on it (the
    honest part), then a line per twin that could not be measured."""
    w, rows = result["workload"], summary(result)
    t6 = next(r for r in rows if r["name"] == "T6")
    ctx = w["capacity_context"]
    (b, c1), (_, c2) = w["decode_points"]
    c_lo, c_hi = w["concurrency"]
    gib = w["cache_bytes"] / 2**30
    k = lambda n: f"{n // 1024}K" if n >= 1024 else str(n)  # noqa: E731
    head = (f"| twin | cache B/token | vs T6 | {k(ctx)} seqs in {gib:g} GiB (engine) | "
            f"decode ms/layer {b}x{k(c1)} | {b}x{k(c2)} | out tok/s c={c_lo} | c={c_hi} | "
            f"TTFT p50 s, {w['long_requests']}x{k(w['long_prompt'])} | TPOT ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    if result.get("smoke"):
        lines.insert(0, "SMOKE RUN (CPU, 2-layer twins, tiny contexts): the numbers below say "
                     "only that every step ran.\n")
    for r in rows:
        cap = r["capacity_engine"]
        cap_s = (f"{cap}" if cap is not None else f"({r['capacity_arithmetic']})")
        cells = [r["name"], f"{r['bytes_per_token']:,}",
                 f"{r['bytes_per_token'] / t6['bytes_per_token']:.2f}x", cap_s]
        for c in (c1, c2):
            ms, pct = r.get(f"decode_{b}x{c}_ms"), r.get(f"decode_{b}x{c}_copy_pct")
            cells.append("-" if ms is None else f"{ms:.3f}" + (f" ({pct:.0f}%)" if pct else ""))
        cells += [_num(r.get(f"tok_s_c{c_lo}"), ",.0f"), _num(r.get(f"tok_s_c{c_hi}"), ",.0f"),
                  _num(r.get("long_ttft_p50_ms") and r["long_ttft_p50_ms"] / 1e3, ".2f"),
                  _num(r.get("long_tpot_ms"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    copy = f", {result['copy_gbs']:.0f} GB/s" if result.get("copy_gbs") else ""
    lines += ["", f"({w['dtype']}, cache blocks of {w['block_size']}; a capacity in "
              "parentheses is arithmetic, the engine did not serve that twin; % = of device "
              f"copy bandwidth{copy})", ""]
    lines += beats_t6(rows, w)
    for r in rows:
        if r["skipped"]:
            lines.append(f"- {r['name']}: not measured beyond its cache: {r['skipped']}")
    return "\n".join(lines)


def beats_t6(rows: list[dict], w: dict) -> list[str]:
    """Where another twin does better than T6, said plainly, metric by metric."""
    t6 = next(r for r in rows if r["name"] == "T6")
    (b, c1), (_, c2) = w["decode_points"]
    cap = "capacity_engine" if t6["capacity_engine"] is not None else "capacity_arithmetic"
    gib = w["cache_bytes"] / 2**30
    metrics = [("bytes_per_token", "Fewer cache bytes per token", min, ",d", " B"),
               (cap, f"More {w['capacity_context']}-token sequences in {gib:g} GiB", max, ",d", ""),
               (f"decode_{b}x{c1}_ms", f"Faster decode per layer at {b} x {c1}", min,
                ".3f", " ms"),
               (f"decode_{b}x{c2}_ms", f"Faster decode per layer at {b} x {c2}", min,
                ".3f", " ms")]
    metrics += [(f"tok_s_c{c}", f"More output tok/s at c={c}", max, ",.0f", "")
                for c in w["concurrency"]]
    metrics += [("long_ttft_p50_ms", "Lower TTFT p50 on the long prompts", min, ",.0f", " ms"),
                ("long_tpot_ms", "Lower TPOT on the long prompts", min, ".2f", " ms")]
    lines = []
    for key, what, better, fmt, unit in metrics:
        mine = t6.get(key)
        if mine is None:
            continue
        winners = [r for r in rows if r["name"] != "T6" and r.get(key) is not None
                   and better(r[key], mine) == r[key] and r[key] != mine]
        if winners:
            lines.append(f"- {what} than T6 ({format(mine, fmt)}{unit}): "
                         + ", ".join(f"{r['name']} {format(r[key], fmt)}" for r in winners)
                         + ".")
    return lines


def report(args: argparse.Namespace) -> None:
    result = json.loads(Path(args.report).read_text())
    table = format_markdown(result)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.plot:
        from bench.plots import plot_family
        plot_family(result, args.plot)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.family", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/family")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny twins, tiny contexts")
    ap.add_argument("--budget-s", type=float, default=480, help="wall time for everything")
    ap.add_argument("--twins", default=",".join(TWINS), help="which twins to serve")
    ap.add_argument("--work-dir", default=None, help="checkpoints go here (default: temp)")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--report", metavar="JSON", help="only render family.json: table, plot")
    ap.add_argument("--markdown", metavar="MD")
    ap.add_argument("--plot", metavar="PNG")
    ap.add_argument("--decode-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--decode-json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.twins = [t for t in args.twins.split(",") if t]
    unknown = set(args.twins) - set(TWINS)
    if unknown:
        ap.error(f"--twins: unknown {sorted(unknown)}; known: {', '.join(TWINS)}")
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")      # the CPU runs Triton's interpreter
    if args.report:
        report(args)
    elif args.decode_only:
        decode_main(args)
    else:
        run(args)


if __name__ == "__main__":
    sys.exit(main())
