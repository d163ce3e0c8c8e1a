"""How many factor-cache blocks an engine gets: --num-blocks, --cache-memory, the CPU
default, or on CUDA `gpu_memory_utilization` x device memory after the weights, the
activation peak of a full-budget step (measured by running one) and a reserve for the CUDA
graphs' pool."""
from __future__ import annotations

import logging

import torch

from tpaserve.config import CacheConfig
from tpaserve.engine.contracts import NewRequest, ScheduledRequest, SchedulerOutput
from tpaserve.exceptions import ConfigError
from tpaserve.models.decoder import DecoderLM
from tpaserve.runner.factor_cache import FactorCache, FactorCacheSpec
from tpaserve.runner.sampler import Sampler
from tpaserve.sampling_params import SamplingParams

logger = logging.getLogger("tpaserve.engine")

CUBLAS_WORKSPACE_RESERVE = 96 * 2**20


def num_blocks_for(cache: CacheConfig, spec: FactorCacheSpec, device: torch.device,
                   profile) -> int:
    """`profile()` -> the CUDA budget in bytes, called only when no size is given on CUDA."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    if cache.cache_memory is not None:
        n = spec.num_blocks_for(cache.cache_memory)
    elif device.type == "cuda":
        n = spec.num_blocks_for(max(profile(), 0))
    else:
        n = spec.num_blocks_for(cache.cpu_default_memory)
    if n < 1:
        raise ConfigError(f"the factor cache gets no block: one block needs "
                          f"{spec.bytes_per_block} bytes; give more --cache-memory or "
                          f"--gpu-memory-utilization")
    return n


def profile_cuda_budget(model: DecoderLM, spec: FactorCacheSpec, sampler: Sampler,
                        device: torch.device, *, utilization: float, max_num_batched_tokens: int,
                        max_num_seqs: int, max_model_len: int, graphs: bool) -> int:
    """Bytes left for the cache: utilization x total, less the weights, the peak of a
    full-budget step and, with graphs, a reserve for their shared pool (one full-budget
    step's activations at a time: the largest mixed graph is one), their fp32 logits
    buffer and cuBLAS's workspace."""
    from tpaserve.runner.model_runner import ModelRunner
    torch.cuda.synchronize(device)
    weights = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    n_tok = min(max_num_batched_tokens, max_model_len)
    probe = FactorCache(spec, -(-n_tok // spec.block_size), device)
    # its buffers and workspace count in the peak, as the real runner's will
    runner = ModelRunner(model, probe, sampler, device, max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=max_num_batched_tokens,
                         max_model_len=max_model_len)
    params = SamplingParams(max_tokens=1)
    runner.execute(SchedulerOutput(
        [ScheduledRequest("profile", [0] * n_tok, 0, list(range(probe.num_blocks)), True, True)],
        new_requests=[NewRequest("profile", [0] * n_tok, params)])).result()
    torch.cuda.synchronize(device)
    activations = torch.cuda.max_memory_allocated(device) - probe.nbytes - weights
    del probe, runner
    torch.cuda.empty_cache()
    reserve = 0
    if graphs:
        logits = max_num_seqs * model.cfg.vocab_size * 4
        reserve = activations + logits + CUBLAS_WORKSPACE_RESERVE
    total = torch.cuda.get_device_properties(device).total_memory
    budget = int(total * utilization) - weights - activations - reserve
    logger.info("memory profile: weights %.2f GiB, activation peak %.2f GiB, graph reserve "
                "%.2f GiB, device %.2f GiB -> cache budget %.2f GiB", weights / 2**30,
                activations / 2**30, reserve / 2**30, total / 2**30, budget / 2**30)
    return budget
