"""Train the small demo T6 on the token files of scripts/prepare_demo_data.py.

    PYTHONPATH=. python scripts/train_demo.py --data .demo_data --out out/t6-demo

Needs torch, numpy and safetensors only (no tpaserve install, no serving dependencies).
Model: T6 with TPA ranks R_Q 6, R_K = R_V 2, d_h 64 (defaults: 6 layers, d_model 384,
12 heads, context 512, ~13.8M parameters with the tied 8192 x 384 embedding).

Training: AdamW, linear warmup + cosine decay, bf16 autocast on CUDA, batches of random
context windows from train.bin. The corpus is small (~1.9M tokens), so a run is several
epochs and overfitting is the limit, not compute: residual dropout (training only, through
forward hooks, since the serving model has no dropout) and weight decay regularise it, and
the weights with the best validation loss seen are kept. --dropout may list several values:
each is a run from scratch sharing the time budget (--minutes), and the best run wins.

Writes into --out: the authors' checkpoint directory (config.json + model.safetensors in
--save-dtype), tokenizer.model, tokenizer_config.json, train_summary.json; the log goes to
stdout and --log.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tpaserve.config import ModelConfig
from tpaserve.models.layers import Rotary
from tpaserve.models.t6 import T6


class BatchedCausalAttention:
    """Training backend: the flat (B*L) tokens are B whole sequences of length L.

    Materialises k = A_K RoPE(B_K) / R_K and v = A_V B_V / R_V (cheap at training sizes)
    and runs one causal SDPA (flash attention on CUDA) over (B, h, L, d_h).
    """

    def __init__(self, batch: int, seqlen: int):
        self.batch, self.seqlen = batch, seqlen

    def __call__(self, layer, q, ak, bk, av, bv, cos, sin):
        T, h, dh = q.shape
        B, L = self.batch, self.seqlen
        dt = ak.dtype                                   # bf16 under autocast, else fp32
        bk = Rotary.apply(bk, cos, sin)                                       # (T, R_K, d_h)
        k = torch.bmm(ak.to(dt), bk.to(dt)) / ak.size(-1)                    # (T, h, d_h)
        v = torch.bmm(av.to(dt), bv.to(dt)) / av.size(-1)                    # (T, h, d_h)
        q_BHLD, k_BHLD, v_BHLD = (t.to(dt).view(B, L, h, dh).transpose(1, 2)
                                  for t in (q, k, v))
        y = F.scaled_dot_product_attention(q_BHLD, k_BHLD, v_BHLD, is_causal=True)
        return y.transpose(1, 2).reshape(T, h, dh)                            # (T, h, d_h)


def add_dropout(model: T6, p: float) -> list:
    """Residual dropout on the embedding and on each attention / MLP branch output,
    active in train() mode only. Hooks, so the module tree (and checkpoint) is unchanged."""
    def hook(mod, inp, out):
        return F.dropout(out, p, mod.training)
    mods = [model.transformer.wte]
    for blk in model.transformer.h:
        mods += [blk.attn, blk.mlp]
    return [m.register_forward_hook(hook) for m in mods] if p > 0 else []


@torch.no_grad()
def init_weights(model: T6, seed: int, std: float = 0.02) -> None:
    """N(0, std) everywhere; the two projections that write into the residual stream get
    std / sqrt(2 n_layer) so the stream's variance does not grow with depth (GPT-2)."""
    g = torch.Generator().manual_seed(seed)
    scaled = std / math.sqrt(2 * model.cfg.n_layer)
    for name, p in model.named_parameters():
        if name.endswith("subln.weight"):
            p.fill_(1.0)
        else:
            s = scaled if name.endswith("c_proj.weight") else std
            p.copy_(torch.randn(p.shape, generator=g) * s)


def lm_loss(model: T6, x_BL: torch.Tensor, y_BL: torch.Tensor, amp: bool) -> torch.Tensor:
    B, L = x_BL.shape
    positions = torch.arange(L, device=x_BL.device).repeat(B)                # (B*L,)
    with torch.autocast("cuda", torch.bfloat16, enabled=amp):
        hidden = model(x_BL.reshape(-1), positions, BatchedCausalAttention(B, L))
        logits = model.lm_head(hidden)                                       # (B*L, V)
    return F.cross_entropy(logits.float(), y_BL.reshape(-1))


@torch.no_grad()
def evaluate(model: T6, data: torch.Tensor, L: int, batch: int, amp: bool) -> float:
    """Mean next-token NLL over all non-overlapping L-token windows of `data`."""
    was_training = model.training
    model.eval()
    n = (data.numel() - 1) // L
    total, count = 0.0, 0
    for s in range(0, n, batch):
        idx = torch.arange(s, min(s + batch, n), device=data.device)[:, None] * L
        win = data[idx + torch.arange(L + 1, device=data.device)]           # (b, L+1)
        b = win.size(0)
        total += lm_loss(model, win[:, :-1], win[:, 1:], amp).item() * b * L
        count += b * L
    model.train(was_training)
    return total / count


class Log:
    """print() that also appends to a file (reopened per line: a crash loses nothing)."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, msg: str) -> None:
        print(msg, flush=True)
        with open(self.path, "a") as f:
            f.write(msg + "\n")


def lr_at(step: int, total: int, args) -> float:
    """Linear warmup to args.lr, then cosine down to args.lr * min_lr_frac at `total`."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
    cosine = 0.5 * (1 + math.cos(math.pi * frac))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * cosine)


def train_run(run: int, dropout: float, epochs: float, cfg: ModelConfig, train: torch.Tensor,
              val: torch.Tensor, budget_s: float, args, log: Log, best: dict) -> None:
    dev, amp = train.device, train.device.type == "cuda"
    torch.manual_seed(args.seed + run)
    model = T6(cfg)
    init_weights(model, args.seed + run)
    model.to(dev).train()
    add_dropout(model, dropout)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=amp)
    B, L = args.batch_size, cfg.max_position
    steps_per_epoch = (train.numel() - 1) / (B * L)
    total = max(1, int(epochs * steps_per_epoch))
    if args.max_steps:
        total = min(total, args.max_steps)
    log(f"run {run}: dropout {dropout}, {epochs} epochs = {total} steps of {B}x{L} "
        f"tokens, time budget {budget_s:.0f}s")
    gen = torch.Generator(device=dev).manual_seed(args.seed + run)
    offsets = torch.arange(L + 1, device=dev)
    t0 = time.perf_counter()
    loss_acc, n_acc, step = 0.0, 0, 0
    while step < total:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args)
        start = torch.randint(0, train.numel() - L - 1, (B, 1), device=dev, generator=gen)
        win = train[start + offsets]                                          # (B, L+1)
        loss = lm_loss(model, win[:, :-1], win[:, 1:], amp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        loss_acc += loss.detach()
        n_acc += 1
        step += 1
        if step == args.calibrate_at and not args.max_steps:
            # Fit the schedule into the time budget now that the step time is known
            # (eval adds a few percent; 0.9 leaves room for it).
            elapsed = time.perf_counter() - t0
            fit = int(0.9 * budget_s * step / elapsed)
            if fit < total:
                log(f"run {run}: {elapsed / step * 1e3:.1f} ms/step; schedule cut from "
                    f"{total} to {fit} steps to fit {budget_s:.0f}s")
                total = max(fit, step + 1)
        if step % args.eval_every == 0 or step == total:
            train_loss = (loss_acc / n_acc).item()
            val_loss = evaluate(model, val, L, args.eval_batch, amp)
            elapsed = time.perf_counter() - t0
            mark = ""
            if val_loss < best.get("val_loss", float("inf")):
                best.update({"val_loss": val_loss, "run": run, "step": step, "dropout": dropout,
                         "epoch": step / steps_per_epoch,
                         "state": {k: v.detach().clone() for k, v in model.state_dict().items()}})
                mark = " *"
            log(f"run {run} step {step:5d}/{total} epoch {step / steps_per_epoch:5.2f} "
                f"lr {opt.param_groups[0]['lr']:.2e} train_loss {train_loss:.4f} "
                f"val_loss {val_loss:.4f} val_ppl {math.exp(val_loss):8.2f} "
                f"tok/s {step * B * L / elapsed / 1e6:.2f}M elapsed {elapsed:6.1f}s{mark}")
            loss_acc, n_acc = 0.0, 0
            if elapsed > budget_s * 1.05:
                log(f"run {run}: over its time budget, stopping at step {step}")
                break


def write_tokenizer(data: Path, out: Path, block_size: int) -> None:
    shutil.copy(data / "tokenizer.model", out / "tokenizer.model")
    meta = json.loads((data / "meta.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_type": "sentencepiece", "tokenizer_file": "tokenizer.model",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "bos_token_id": meta["bos_id"], "eos_token_id": meta["eos_id"], "unk_token_id": 0,
        "add_bos_token": True, "add_eos_token": False, "add_dummy_prefix": False,
        "model_max_length": block_size, "chat_template": None}, indent=2) + "\n")


def save(model: T6, out: Path, dtype: torch.dtype) -> None:
    model = model.to("cpu", dtype)
    try:
        from tpaserve.models.loader import save_checkpoint
    except ImportError:                                 # loader not there: same format by hand
        from safetensors.torch import save_file
        out.mkdir(parents=True, exist_ok=True)
        c = model.cfg
        (out / "config.json").write_text(json.dumps({
            "model_type": "gpt2", "n_layer": c.n_layer, "n_head": c.n_head,
            "head_dim": c.head_dim, "n_embd": c.n_embd, "vocab_size": c.vocab_size,
            "block_size": c.max_position, "rank": c.k_rank, "q_rank": c.q_rank,
            "using_groupnorm": c.using_groupnorm, "bias": False, "dropout": 0.0}, indent=2))
        sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
        return
    save_checkpoint(model, out, format="safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path(".demo_data"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--log", type=Path, default=None, help="default: <out>/train_log.txt")
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--n-head", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--q-rank", type=int, default=6)
    ap.add_argument("--rank", type=int, default=2, help="R_K = R_V")
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.1])
    ap.add_argument("--epochs", type=float, nargs="+", default=[10.0],
                    help="schedule length of each run (one value: all runs)")
    ap.add_argument("--minutes", type=float, default=7.0, help="training time, all runs")
    ap.add_argument("--max-steps", type=int, default=0, help="smoke tests: cap every run")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--calibrate-at", type=int, default=30)
    ap.add_argument("--save-dtype", choices=["bfloat16", "float16", "float32"],
                    default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    if len(args.epochs) not in (1, len(args.dropout)):
        ap.error(f"--epochs takes 1 value or one per --dropout value ({len(args.dropout)}), "
                 f"got {len(args.epochs)}")

    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.log or args.out / "train_log.txt")
    log("argv: " + " ".join(sys.argv[1:]))
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        log(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")

    meta = json.loads((args.data / "meta.json").read_text())
    def tokens(name):                                                        # (N,) int64
        ids = np.fromfile(args.data / name, dtype=np.uint16).astype(np.int64)
        return torch.from_numpy(ids).to(dev)
    train, val = tokens("train.bin"), tokens("val.bin")
    cfg = ModelConfig(n_layer=args.n_layer, n_head=args.n_head, head_dim=args.head_dim,
                      n_embd=args.n_embd, vocab_size=meta["vocab_size"], k_rank=args.rank,
                      v_rank=args.rank, q_rank=args.q_rank, max_position=args.block_size,
                      name="t6-demo")
    n_params = sum(p.numel() for p in T6(cfg).parameters())                 # tied: counted once
    log(f"data: {train.numel()} train / {val.numel()} val tokens, vocab {cfg.vocab_size}")
    log(f"model: {cfg}\nparameters: {n_params} ({n_params / 1e6:.2f}M, embedding "
        f"{cfg.vocab_size * cfg.n_embd / 1e6:.2f}M)")

    best: dict = {}
    t_start = time.perf_counter()
    budget = args.minutes * 60
    for run, p in enumerate(args.dropout):
        left = budget - (time.perf_counter() - t_start)
        epochs = args.epochs[run] if len(args.epochs) > 1 else args.epochs[0]
        share = left / (len(args.dropout) - run)        # earlier runs' leftovers pass on
        train_run(run, p, epochs, cfg, train, val, share, args, log, best)
    train_s = time.perf_counter() - t_start

    model = T6(cfg)
    model.load_state_dict(best["state"])
    model.to(dev).eval()
    # Final figure in fp32 (no autocast), the dtype the CPU test uses.
    val_loss = evaluate(model, val, cfg.max_position, args.eval_batch, amp=False)
    log(f"best: run {best['run']} (dropout {best['dropout']}) step {best['step']} epoch "
        f"{best['epoch']:.2f}, val_loss {best['val_loss']:.4f} (as logged in training)")
    log(f"final: val_loss {val_loss:.4f} val_ppl {math.exp(val_loss):.3f} (fp32, "
        f"{(val.numel() - 1) // cfg.max_position} windows of {cfg.max_position}); "
        f"training took {train_s:.0f}s")
    save(model, args.out, getattr(torch, args.save_dtype))
    write_tokenizer(args.data, args.out, cfg.max_position)
    (args.out / "train_summary.json").write_text(json.dumps({
        "parameters": n_params, "train_tokens": train.numel(), "val_tokens": val.numel(),
        "best_run": best["run"], "best_dropout": best["dropout"], "best_step": best["step"],
        "best_epoch": round(best["epoch"], 3), "val_loss_fp32": round(val_loss, 5),
        "val_ppl_fp32": round(math.exp(val_loss), 4), "train_seconds": round(train_s, 1),
        "save_dtype": args.save_dtype}, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
