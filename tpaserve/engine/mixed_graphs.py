"""CUDA graphs of mixed steps: prompt chunks and decode rows together (the step that admits
new requests while others decode, and every chunk of a long prompt). Eagerly, such a step
costs ~20-40 ms of host time at batch 64 (~50 kernel launches per layer through Python and
Triton's launcher) for ~5 ms of GPU work; replayed, it costs the GPU work.

One graph per (token bucket t, sequence bucket b): a step of T <= t tokens in B <= b
sequences replays the smallest such graph. Everything is padded to the bucket in static
buffers: tokens T..t-1 get slot -1 (not stored) and belong to no sequence (their rows are
computed by the row-wise layers and never read); sequences B..b-1 have no queries
(query_start_loc repeats T), length 1, block 0. Attention is captured with the shapes of the
bucket: the decode kernel serves the one-query sequences; the prefill kernel runs a work
list of (sequence, query block) items (kernels/prefill.work_list) sized for the bucket, so
its grid does not grow with t x b. Logits are computed for the rows that sample only,
gathered through a static index buffer (padding entries read row 0).

Steps that score prompt tokens (prompt logprobs) run eagerly. Graphs share the decode
graphs' memory pool; the cache was sized with a reserve for them (LLMEngine).
`capture=False` runs the same padded path eagerly (CPU tests of the padding logic).
"""
from __future__ import annotations

import logging

import torch

from tpaserve.engine.cuda_graphs import capture
from tpaserve.engine.factor_cache import FactorCache
from tpaserve.engine.paged_attention import PagedAttention, StepMetadata
from tpaserve.models.t6 import T6

logger = logging.getLogger("tpaserve.engine")


def default_token_buckets(max_num_batched_tokens: int) -> list[int]:
    sizes = [128, 256, 512, 1024, 2048, 4096, 8192]
    return [t for t in sizes if t < max_num_batched_tokens] + [max_num_batched_tokens]


def default_seq_buckets(max_num_seqs: int) -> list[int]:
    sizes = [4, 16, 64, 128, 256]
    return [b for b in sizes if b < max_num_seqs] + [max_num_seqs]


class MixedGraphs:
    def __init__(self, model: T6, cache: FactorCache, ops, token_buckets: list[int],
                 seq_buckets: list[int], max_model_len: int, device: torch.device,
                 capture: bool = True, workspace: torch.Tensor | None = None):
        from tpaserve.kernels import prefill
        self.model, self.cache, self.ops, self.workspace = model, cache, ops, workspace
        self.token_buckets, self.seq_buckets = sorted(set(token_buckets)), sorted(set(seq_buckets))
        self.max_model_len, self.device, self.capture = max_model_len, device, capture
        T, B, dev = self.token_buckets[-1], self.seq_buckets[-1], device
        self.input_ids = torch.zeros(T, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(T, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((T,), -1, dtype=torch.int64, device=dev)
        self.query_start_loc = torch.zeros(B + 1, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(B, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(B, -(-max_model_len // cache.spec.block_size),
                                        dtype=torch.int32, device=dev)
        self.sample_rows = torch.zeros(B, dtype=torch.int64, device=dev)
        # every graph writes its logits here: a graph's own output would stay allocated
        # for as long as the graph lives (b x vocab x 4 bytes each)
        self.logits = torch.empty(B, model.cfg.vocab_size, dtype=torch.float32, device=dev)
        # the prefill launch's block_m per token bucket (its config follows max_query_len = t)
        self._block_m = {t: prefill.prefill_config(t).block_m for t in self.token_buckets}
        self._work_size = {(t, b): prefill.work_list_size(t, b, self._block_m[t])
                           for t in self.token_buckets for b in self.seq_buckets}
        self.work = torch.full((2 * max(self._work_size.values()),), -1, dtype=torch.int32,
                               device=dev)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def bucket_for(self, num_tokens: int, num_seqs: int) -> tuple[int, int] | None:
        t = next((x for x in self.token_buckets if x >= num_tokens), None)
        b = next((x for x in self.seq_buckets if x >= num_seqs), None)
        return None if t is None or b is None else (t, b)

    def _forward(self, t: int, b: int) -> torch.Tensor:
        n_work = self._work_size[(t, b)]
        meta = StepMetadata(self.slot_mapping[:t], self.query_start_loc[:b + 1],
                            self.seq_lens[:b], self.block_tables[:b], t, self.max_model_len,
                            prefill_work=self.work[:2 * n_work])
        hidden = self.model(self.input_ids[:t], self.positions[:t],
                            PagedAttention(self.cache, meta, self.ops, self.workspace),
                            kernels=self.capture or None)                  # (t, d)
        out = self.logits[:b]
        out.copy_(self.model.compute_logits(hidden[self.sample_rows[:b]]))   # (b, V) fp32
        return out

    @torch.inference_mode()
    def capture_all(self, pool=None) -> None:
        """Capture every (token, sequence) bucket, largest first, into `pool` (the decode
        graphs' pool: one step's activations at a time)."""
        if not self.capture:
            return
        before = torch.cuda.memory_reserved(self.device)
        side = torch.cuda.Stream(self.device)
        for t in reversed(self.token_buckets):
            for b in reversed(self.seq_buckets):
                g, out = capture(lambda: self._forward(t, b), side, pool)
                pool = g.pool()
                self.graphs[(t, b)] = (g, out)
        torch.cuda.synchronize(self.device)
        logger.info("captured %d mixed-step CUDA graphs (tokens %s, sequences %s), %.1f MiB more",
                    len(self.graphs), self.token_buckets, self.seq_buckets,
                    (torch.cuda.memory_reserved(self.device) - before) / 2**20)

    @torch.inference_mode()
    def run(self, ids: list[int], positions: list[int], slots: list[int], query_lens: list[int],
            seq_lens: list[int], tables: list[list[int]], sample_rows: list[int]) -> torch.Tensor:
        """One step of T = len(ids) tokens in B = len(seq_lens) sequences (sequence i owns
        query_lens[i] consecutive rows) -> logits of sample_rows (S, V)."""
        from tpaserve.kernels.prefill import work_list
        T, B, S = len(ids), len(seq_lens), len(sample_rows)
        t, b = self.bucket_for(T, B)
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)
        qsl += [T] * (b - B)
        width = max(len(x) for x in tables)
        i64, i32 = torch.int64, torch.int32
        self.input_ids[:T].copy_(torch.tensor(ids, dtype=i64), non_blocking=True)
        self.positions[:T].copy_(torch.tensor(positions, dtype=i64), non_blocking=True)
        self.slot_mapping[:T].copy_(torch.tensor(slots, dtype=i64), non_blocking=True)
        self.slot_mapping[T:t].fill_(-1)
        self.query_start_loc[:b + 1].copy_(torch.tensor(qsl, dtype=i32), non_blocking=True)
        self.seq_lens[:B].copy_(torch.tensor(seq_lens, dtype=i32), non_blocking=True)
        self.seq_lens[B:b].fill_(1)
        self.block_tables[:B, :width].copy_(
            torch.tensor([x + [0] * (width - len(x)) for x in tables], dtype=i32),
            non_blocking=True)
        self.block_tables[B:b].zero_()
        self.sample_rows[:b].copy_(torch.tensor(sample_rows + [0] * (b - S), dtype=i64),
                                   non_blocking=True)
        n_work = self._work_size[(t, b)]
        self.work[:2 * n_work].copy_(torch.tensor(
            work_list(query_lens, self._block_m[t], n_work), dtype=i32), non_blocking=True)
        if self.capture:
            g, out = self.graphs[(t, b)]
            g.replay()
            return out[:S]
        return self._forward(t, b)[:S]
