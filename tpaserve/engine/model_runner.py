"""Executes one scheduled step on the model. The only place where the scheduler's lists
become device tensors:

    SchedulerOutput -> token ids (T,), positions (T,), slot mapping (T,), block tables
    (B, max_blocks), sequence lengths (B,), query start locations (B+1,)
    -> model forward through PagedAttention (store factors, attend over the cache)
    -> logits for the rows that sample or score prompt tokens only -> Sampler
    -> RunnerOutput (plain lists)

It also owns per-request device state that must outlive a step: the seeded generators,
dropped when the scheduler reports the request finished (a preempted request keeps its
generator, so recomputation does not change what it samples next).
"""
from __future__ import annotations

import torch

from tpaserve.engine.cuda_graphs import DecodeGraphs
from tpaserve.engine.factor_cache import FactorCache
from tpaserve.engine.outputs import RunnerOutput, SchedulerOutput
from tpaserve.engine.paged_attention import PagedAttention, StepMetadata, select_ops
from tpaserve.engine.sampler import Sampler, SamplingRow, compute_logprobs
from tpaserve.models.t6 import T6


class ModelRunner:
    def __init__(self, model: T6, cache: FactorCache, sampler: Sampler, device: torch.device,
                 graphs: DecodeGraphs | None = None, max_num_seqs: int = 256):
        self.model, self.cache, self.sampler, self.device = model, cache, sampler, device
        self.block_size = cache.spec.block_size
        self.ops = select_ops(device)
        spec = cache.spec
        self.workspace = self.ops.make_workspace(max_num_seqs, spec.n_head, spec.head_dim,
                                                 device=device)
        self.graphs = graphs             # decode steps of up to graphs.max_batch requests
        self.mixed_graphs = None         # MixedGraphs: other steps without prompt logprobs
        self.generators: dict[str, torch.Generator] = {}

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        g = self.generators.get(request_id)
        if g is None:
            g = self.generators[request_id] = torch.Generator(device=self.device).manual_seed(seed)
        return g

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        for rid in sched.finished_ids:
            self.generators.pop(rid, None)
        if not sched.requests:
            return RunnerOutput(sampled={})
        if sched.num_steps > 1:
            return self._execute_round(sched)
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl, seq_lens = [0], []
        sample_rows: list[int] = []
        plp: list[tuple[str, list[int], list[int], int]] = []   # (rid, rows, targets, top)
        for r in sched.requests:
            s, n, table = r.start_pos, r.num_tokens, r.block_ids
            ids.extend(r.token_ids)
            positions.extend(range(s, s + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(s, s + n))
            qsl.append(qsl[-1] + n)
            seq_lens.append(s + n)
            if r.sample:
                sample_rows.append(qsl[-1] - 1)
            if r.prompt_logprobs_from is not None:
                last = min(s + n, len(r.prompt_token_ids) - 1)
                ps = range(r.prompt_logprobs_from, last + 1)
                plp.append((r.request_id, [qsl[-2] + p - 1 - s for p in ps],
                            r.prompt_token_ids[ps.start:ps.stop], r.params.prompt_logprobs))
        if self.graphs is not None and len(ids) == len(sched.requests) <= self.graphs.max_batch \
                and not plp:
            # pure decode step: replay a captured graph (logits for every row)
            all_logits = self.graphs.run(ids, positions, slots, seq_lens,
                                         [r.block_ids for r in sched.requests])
            return self._sample(sched, all_logits[sample_rows], [])
        mg = self.mixed_graphs
        if mg is not None and not plp and mg.bucket_for(len(ids), len(sched.requests)):
            logits = mg.run(ids, positions, slots, [r.num_tokens for r in sched.requests],
                            seq_lens, [r.block_ids for r in sched.requests], sample_rows)
            return self._sample(sched, logits if sample_rows else None, [])
        max_blocks = max(len(r.block_ids) for r in sched.requests)
        tables = [r.block_ids + [0] * (max_blocks - len(r.block_ids)) for r in sched.requests]

        dev, i32 = self.device, torch.int32
        meta = StepMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=i32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=i32, device=dev),
            block_tables=torch.tensor(tables, dtype=i32, device=dev),
            max_query_len=max(r.num_tokens for r in sched.requests),
            max_seq_len=max(seq_lens))
        input_ids = torch.tensor(ids, dtype=torch.int64, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        attn = PagedAttention(self.cache, meta, self.ops, self.workspace)
        # eager steps: torch ops for the elementwise tails (see T6.forward's `kernels`)
        hidden = self.model(input_ids, pos_t, attn, kernels=False)                    # (T, d)
        logits = self.model.compute_logits(hidden[sample_rows]) if sample_rows else None  # (S, V)
        plp_logits = [(rid, self.model.compute_logits(hidden[rows]), targets, top)
                      for rid, rows, targets, top in plp]
        return self._sample(sched, logits, plp_logits)

    def _execute_round(self, sched: SchedulerOutput) -> RunnerOutput:
        """A multi-step decode round (see Scheduler): K = sched.num_steps steps; request i
        samples n_i <= K tokens. Step t computes position start_i + t for every request
        with t < n_i, from the token step t - 1 sampled (on the device, no host sync); the
        K x B samples come back in one copy at the end. Requests done early (n_i < K) drop
        out of the later steps' sampling (a graph replay still carries their row, with no
        cache slot), so their seeded generators draw exactly what single steps would."""
        reqs = sched.requests
        K, B, bs, dev = sched.num_steps, len(reqs), self.block_size, self.device
        n = [r.num_steps for r in reqs]
        # host metadata of every step (K, B): padding rows repeat their last real position
        pos = [[r.start_pos + min(t, ni - 1) for r, ni in zip(reqs, n)] for t in range(K)]
        slots = [[r.block_ids[p // bs] * bs + p % bs if t < ni else -1
                  for r, ni, p in zip(reqs, n, pos[t])] for t in range(K)]
        lens = [[p + 1 for p in pos[t]] for t in range(K)]
        rows = [SamplingRow(params=r.params, prompt_token_ids=r.prompt_token_ids,
                            output_token_ids=(),
                            generator=self._generator(r.request_id, r.params.seed))
                for r in reqs]
        use_graph = self.graphs is not None and B <= self.graphs.max_batch
        meta = torch.tensor([pos, slots], dtype=torch.int64).to(dev, non_blocking=True)  # (2, K, B)
        lens_d = torch.tensor(lens, dtype=torch.int32).to(dev, non_blocking=True)        # (K, B)
        if use_graph:
            self.graphs.prepare([r.block_ids for r in reqs], max(lens[-1]))
        else:
            max_blocks = max(len(r.block_ids) for r in reqs)
            tables = torch.tensor([r.block_ids + [0] * (max_blocks - len(r.block_ids))
                                   for r in reqs], dtype=torch.int32, device=dev)
            qsl = torch.arange(B + 1, dtype=torch.int32, device=dev)
        ids = torch.tensor([r.token_ids[0] for r in reqs], dtype=torch.int64, device=dev)
        sampled = []
        for t in range(K):
            if use_graph:
                logits = self.graphs.replay(ids, meta[0, t], meta[1, t], lens_d[t])
            else:
                step = StepMetadata(slot_mapping=meta[1, t], query_start_loc=qsl,
                                    seq_lens=lens_d[t], block_tables=tables, max_query_len=1,
                                    max_seq_len=max(lens[t]))
                hidden = self.model(ids, meta[0, t], PagedAttention(self.cache, step, self.ops,
                                                                    self.workspace), kernels=False)
                logits = self.model.compute_logits(hidden)                         # (B, V)
            live = [i for i in range(B) if t < n[i]]
            if len(live) == B:
                ids = self.sampler.sample_ids(logits, rows)
            else:
                ids = ids.clone()
                ids[live] = self.sampler.sample_ids(logits[live], [rows[i] for i in live])
            sampled.append(ids)
        toks = torch.stack(sampled).cpu().tolist()       # (K, B); .cpu() waits without the GIL
        return RunnerOutput(sampled={r.request_id: [toks[t][i] for t in range(n[i])]
                                     for i, r in enumerate(reqs)})

    def _sample(self, sched: SchedulerOutput, logits: torch.Tensor | None, plp) -> RunnerOutput:
        out = RunnerOutput(sampled={})
        sampling = [r for r in sched.requests if r.sample]
        if sampling:
            rows = [SamplingRow(params=r.params, prompt_token_ids=r.prompt_token_ids,
                                output_token_ids=r.output_token_ids,
                                generator=self._generator(r.request_id, r.params.seed))
                    for r in sampling]
            res = self.sampler(logits, rows)
            for i, r in enumerate(sampling):
                out.sampled[r.request_id] = res.token_ids[i]
                if res.logprobs is not None and r.params.logprobs is not None:
                    out.logprobs[r.request_id] = res.logprobs[i]
        for rid, plogits, targets, top in plp:
            out.prompt_logprobs[rid] = compute_logprobs(plogits, targets, top,
                                                         vocab_size=self.sampler.vocab_size)
        return out
