"""CUDA graphs of decode steps, one per batch-size bucket, so small batches are not bound
by kernel-launch overhead.

A decode step (every request computes exactly one token) of B requests replays the graph of
the smallest bucket >= B. Inputs live in static buffers sized for the largest bucket; rows
B..bucket-1 are padding: slot -1 (the store skips them), sequence length 1 over block 0
(finite garbage nobody reads). Each bucket is captured once per context class (CONTEXT_CLASSES
up to max_model_len): the decode kernel's grid of splits is sized for the class's longest
sequence, and a step replays the smallest class that holds its longest sequence (a grid
sized for 32K leaves most programs idle at 512, and idle programs cost: 64 x 512 36.5 us vs
20.8). The graph computes logits for all its rows into one buffer shared by every graph;
sampling stays outside (its work depends on each request's knobs).

Memory: all graphs share one pool, captured largest first, so the pool is about one
largest-bucket decode step of activations; it is measured at capture and logged (the cache
was sized with a reserve for it, see LLMEngine._profile_cuda_blocks).

`capture=False` runs the same padded path eagerly (CPU tests of the padding logic).
"""
from __future__ import annotations

import logging

import torch

from tpaserve.engine.factor_cache import FactorCache
from tpaserve.engine.paged_attention import PagedAttention, StepMetadata
from tpaserve.models.t6 import T6

logger = logging.getLogger("tpaserve.engine")


CONTEXT_CLASSES = (1024, 4096)      # plus max_model_len


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


def default_buckets(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16))
    return [b for b in sizes if b < max_num_seqs] + [min(max_num_seqs, 256)]


class DecodeGraphs:
    def __init__(self, model: T6, cache: FactorCache, ops, buckets: list[int],
                 max_model_len: int, device: torch.device, capture: bool = True,
                 workspace: torch.Tensor | None = None):
        self.model, self.cache, self.ops, self.workspace = model, cache, ops, workspace
        self.buckets = sorted(set(buckets))
        self.max_batch, self.max_model_len = self.buckets[-1], max_model_len
        self.device, self.capture = device, capture
        bs = cache.spec.block_size
        n, dev = self.max_batch, device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, -(-max_model_len // bs), dtype=torch.int32, device=dev)
        self.logits = torch.empty(n, model.cfg.vocab_size, dtype=torch.float32, device=dev)
        self.classes = [c for c in CONTEXT_CLASSES if c < max_model_len] + [max_model_len]
        self._class = max_model_len            # the class of the next replays (prepare)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool, self.pool_bytes = None, 0

    def bucket_for(self, batch: int) -> int | None:
        for b in self.buckets:
            if b >= batch:
                return b
        return None

    def _forward(self, b: int, ctx: int) -> torch.Tensor:
        meta = StepMetadata(self.slot_mapping[:b], self.query_start_loc[:b + 1],
                            self.seq_lens[:b], self.block_tables[:b], 1, ctx)
        hidden = self.model(self.input_ids[:b], self.positions[:b],
                            PagedAttention(self.cache, meta, self.ops, self.workspace),
                            kernels=self.capture or None)   # fused Triton tails in graphs
        out = self.logits[:b]
        out.copy_(self.model.compute_logits(hidden))                # (b, V) fp32
        return out

    @torch.inference_mode()
    def capture_all(self) -> None:
        if not self.capture:
            return
        before = torch.cuda.memory_reserved(self.device)
        pool = None
        # one warm-up stream for every bucket: cuBLAS keeps a workspace per stream it ran
        # on (from the caching allocator), so a stream per bucket held ~30 MiB each
        side = torch.cuda.Stream(self.device)
        for b in reversed(self.buckets):
            for ctx in reversed(self.classes):
                g, out = capture(lambda: self._forward(b, ctx), side, pool)
                pool = g.pool()
                self.graphs[(b, ctx)] = (g, out)
        torch.cuda.synchronize(self.device)
        self.pool = pool                          # the mixed-step graphs capture into it too
        self.pool_bytes = torch.cuda.memory_reserved(self.device) - before
        logger.info("captured %d decode CUDA graphs (batch %s..%s, contexts %s), pool %.1f MiB",
                    len(self.graphs), self.buckets[0], self.buckets[-1], self.classes,
                    self.pool_bytes / 2**20)

    @torch.inference_mode()
    def run(self, ids: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
            tables: list[list[int]]) -> torch.Tensor:
        """One decode step of B = len(ids) requests -> logits (B, V)."""
        self.prepare(tables, max(seq_lens))
        return self.replay(torch.tensor(ids), torch.tensor(positions), torch.tensor(slots),
                           torch.tensor(seq_lens, dtype=torch.int32))

    def prepare(self, tables: list[list[int]], max_seq_len: int) -> None:
        """Block tables of the B = len(tables) requests of the next replays (one decode
        step, or every step of a multi-step round: the tables cover all of them), the
        padding rows B..bucket-1 (no slot, length 1 over block 0), and the context class:
        max_seq_len bounds every sequence length of those replays."""
        self._class = next(c for c in self.classes if c >= max_seq_len)
        B = len(tables)
        b = self.bucket_for(B)
        width = max(len(t) for t in tables)
        host = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        self.block_tables[:B, :width].copy_(host, non_blocking=True)
        self.block_tables[B:b].zero_()
        self.slot_mapping[B:b].fill_(-1)
        self.seq_lens[B:b].fill_(1)

    @torch.inference_mode()
    def replay(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
               seq_lens: torch.Tensor) -> torch.Tensor:
        """One decode step after `prepare`: ids, positions, slots (B,) int64 and seq_lens (B,)
        int32, on the host or the device (a multi-step round passes the previous step's
        samples as ids) -> logits (B, V), valid until the next replay."""
        B = ids.numel()
        b = self.bucket_for(B)
        self.input_ids[:B].copy_(ids, non_blocking=True)
        self.positions[:B].copy_(positions, non_blocking=True)
        self.slot_mapping[:B].copy_(slots, non_blocking=True)
        self.seq_lens[:B].copy_(seq_lens, non_blocking=True)
        if self.capture:
            g, out = self.graphs[(b, self._class)]
            g.replay()
            return out[:B]
        return self._forward(b, self._class)[:B]
