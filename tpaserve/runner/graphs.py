"""CUDA graphs of engine steps, so a step costs its GPU work and not ~50 kernel launches per
layer through Python. One class, two kinds of bucket, one set of static input buffers:

  decode (b, ctx)   every sequence computes one token: b >= B sequences, a grid of decode
                    splits sized for context class ctx (the smallest of CONTEXT_CLASSES up to
                    max_model_len that holds the longest sequence: a grid sized for 32K
                    leaves most programs idle at 512, and idle programs cost: 64 x 512 36.5 us
                    vs 20.8). Logits for all b rows.
  mixed (t, b)      prompt chunks and decode rows together (admissions, long prompts): T <= t
                    tokens in B <= b sequences. The decode kernel serves the one-query
                    sequences; the prefill kernel runs a work list of (sequence, query block)
                    items sized for the bucket, so its grid does not grow with t x b. Logits
                    for the rows that sample, gathered through `sample_rows`.

Padding (written by the runner with the inputs, runner/model_runner.py): tokens T..t-1 get
slot -1 (not stored) and belong to no sequence; sequences B..b-1 have no queries
(query_start_loc repeats T), length 1, block table row 0 (finite garbage nobody reads);
sample_rows entries past S read row 0.

Memory: all graphs share one pool, captured largest first, so the pool is about one
largest step's activations; every graph writes its logits into one buffer (a graph's own
output would stay allocated as long as the graph). The cache was sized with a reserve for
both (runner/memory.py). `capture=False` runs the same padded forwards eagerly (the CPU
tests of the padding logic).
"""
from __future__ import annotations

import logging

import torch

from tpaserve.kernels import prefill
from tpaserve.models.decoder import DecoderLM
from tpaserve.runner.attention import PagedAttention, StepMetadata
from tpaserve.runner.factor_cache import FactorCache

logger = logging.getLogger("tpaserve.engine")

CONTEXT_CLASSES = (1024, 4096)      # plus max_model_len


def decode_buckets(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + [384, 512]
    return [b for b in sizes if b < max_num_seqs] + [min(max_num_seqs, 512)]


def token_buckets(max_num_batched_tokens: int) -> list[int]:
    sizes = [128, 256, 512, 1024, 2048, 4096, 8192]
    return [t for t in sizes if t < max_num_batched_tokens] + [max_num_batched_tokens]


def seq_buckets(max_num_seqs: int) -> list[int]:
    sizes = [4, 16, 64, 128, 256, 512]
    return [b for b in sizes if b < max_num_seqs] + [max_num_seqs]


def capture(fn, side: torch.cuda.Stream, pool=None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Run fn twice on the side stream (Triton compiles, cuBLAS picks its kernels), then
    capture a third call into a graph whose memory comes from `pool`."""
    main = torch.cuda.current_stream(side.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    main.wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        out = fn()
    return g, out


class StepBuffers:
    """A step's device inputs at fixed addresses: graphs replay them, eager steps slice
    them. Sized for the largest step (max_tokens tokens in max_seqs sequences)."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, vocab: int,
                 work_items: int, device: torch.device):
        i64, i32, dev = torch.int64, torch.int32, device
        self.input_ids = torch.zeros(max_tokens, dtype=i64, device=dev)            # (T,)
        self.positions = torch.zeros(max_tokens, dtype=i64, device=dev)            # (T,)
        self.slot_mapping = torch.full((max_tokens,), -1, dtype=i64, device=dev)   # (T,)
        self.query_start_loc = torch.zeros(max_seqs + 1, dtype=i32, device=dev)    # (B+1,)
        self.arange = torch.arange(max_seqs + 1, dtype=i32, device=dev)            # decode qsl
        self.seq_lens = torch.ones(max_seqs, dtype=i32, device=dev)                # (B,)
        self.block_tables = torch.zeros(max_seqs, max_blocks, dtype=i32, device=dev)  # (B, W)
        self.sample_rows = torch.zeros(max_seqs, dtype=i64, device=dev)            # (B,)
        self.logits = torch.empty(max_seqs, vocab, dtype=torch.float32, device=dev)  # (B, V)
        self.work = torch.full((2 * work_items,), -1, dtype=i32, device=dev)


class StepGraphs:
    def __init__(self, model: DecoderLM, cache: FactorCache, ops, buffers: StepBuffers,
                 workspace: torch.Tensor | None, decode: list[int], tokens: list[int],
                 seqs: list[int], max_model_len: int, device: torch.device,
                 capture: bool = True):
        self.model, self.cache, self.ops, self.buf = model, cache, ops, buffers
        self.workspace, self.max_model_len, self.device = workspace, max_model_len, device
        self.capture = capture
        self.decode_sizes = sorted(set(decode))
        self.token_sizes, self.seq_sizes = sorted(set(tokens)), sorted(set(seqs))
        self.classes = [c for c in CONTEXT_CLASSES if c < max_model_len] + [max_model_len]
        # the prefill launch's block_m per token bucket (its config follows max_query_len = t)
        self.block_m = {t: prefill.prefill_config(t).block_m for t in self.token_sizes}
        self.work_size = {(t, b): prefill.work_list_size(t, b, self.block_m[t])
                          for t in self.token_sizes for b in self.seq_sizes}
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool, self.pool_bytes = None, 0

    @staticmethod
    def work_items(tokens: list[int], seqs: list[int]) -> int:
        """Work-list entries the largest mixed bucket needs (StepBuffers' size)."""
        return max(prefill.work_list_size(t, b, prefill.prefill_config(t).block_m)
                   for t in tokens for b in seqs)

    # ---- buckets ---------------------------------------------------------------------------
    @property
    def max_decode(self) -> int:
        return self.decode_sizes[-1]

    def decode_bucket(self, batch: int) -> int | None:
        return next((b for b in self.decode_sizes if b >= batch), None)

    def mixed_bucket(self, num_tokens: int, num_seqs: int) -> tuple[int, int] | None:
        t = next((x for x in self.token_sizes if x >= num_tokens), None)
        b = next((x for x in self.seq_sizes if x >= num_seqs), None)
        return None if t is None or b is None else (t, b)

    def context_class(self, max_seq_len: int) -> int:
        return next(c for c in self.classes if c >= max_seq_len)

    # ---- forwards over the buffers ---------------------------------------------------------
    def _decode(self, b: int, ctx: int) -> torch.Tensor:
        buf = self.buf
        meta = StepMetadata(buf.slot_mapping[:b], buf.arange[:b + 1], buf.seq_lens[:b],
                            buf.block_tables[:b], 1, ctx)
        hidden = self.model(buf.input_ids[:b], buf.positions[:b],
                            PagedAttention(self.cache, meta, self.ops, self.workspace),
                            kernels=self.capture or None)   # fused Triton tails in graphs
        out = buf.logits[:b]
        out.copy_(self.model.compute_logits(hidden))                        # (b, V) fp32
        return out

    def _mixed(self, t: int, b: int) -> torch.Tensor:
        buf, n_work = self.buf, self.work_size[(t, b)]
        meta = StepMetadata(buf.slot_mapping[:t], buf.query_start_loc[:b + 1],
                            buf.seq_lens[:b], buf.block_tables[:b], t, self.max_model_len,
                            prefill_work=buf.work[:2 * n_work])
        hidden = self.model(buf.input_ids[:t], buf.positions[:t],
                            PagedAttention(self.cache, meta, self.ops, self.workspace),
                            kernels=self.capture or None)                   # (t, d)
        out = buf.logits[:b]
        out.copy_(self.model.compute_logits(hidden[buf.sample_rows[:b]]))   # (b, V) fp32
        return out

    def decode(self, b: int, ctx: int) -> torch.Tensor:
        """Logits (b, V) of the decode step whose inputs are in the buffers."""
        if self.capture:
            g, out = self.graphs[("decode", b, ctx)]
            g.replay()
            return out
        return self._decode(b, ctx)

    def mixed(self, t: int, b: int) -> torch.Tensor:
        """Logits (b, V) of the mixed step whose inputs are in the buffers."""
        if self.capture:
            g, out = self.graphs[("mixed", t, b)]
            g.replay()
            return out
        return self._mixed(t, b)

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Every bucket, largest first, into one pool."""
        if not self.capture:
            return
        before = torch.cuda.memory_reserved(self.device)
        # one warm-up stream for every graph: cuBLAS keeps a workspace per stream it ran
        # on (from the caching allocator), so a stream per graph held ~30 MiB each
        side, pool = torch.cuda.Stream(self.device), None
        todo = [(("mixed", t, b), lambda t=t, b=b: self._mixed(t, b))
                for t in reversed(self.token_sizes) for b in reversed(self.seq_sizes)]
        todo += [(("decode", b, c), lambda b=b, c=c: self._decode(b, c))
                 for b in reversed(self.decode_sizes) for c in reversed(self.classes)]
        for key, fn in todo:
            g, out = capture(fn, side, pool)
            pool = g.pool()
            self.graphs[key] = (g, out)
        torch.cuda.synchronize(self.device)
        self.pool = pool
        self.pool_bytes = torch.cuda.memory_reserved(self.device) - before
        logger.info("captured %d CUDA graphs: decode batch %s..%s x contexts %s, mixed tokens "
                    "%s x sequences %s; pool %.1f MiB", len(self.graphs), self.decode_sizes[0],
                    self.decode_sizes[-1], self.classes, self.token_sizes, self.seq_sizes,
                    self.pool_bytes / 2**20)
