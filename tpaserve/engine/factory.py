"""Builds an LLMEngine from what a user names: a checkpoint directory (or a T6 module),
a tokenizer, dtype/device and the cache and scheduler knobs (the CLI's flags)."""
from __future__ import annotations

import os

import torch

from tpaserve.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig
from tpaserve.engine.llm_engine import LLMEngine
from tpaserve.models.t6 import T6

# Decode steps per scheduling round on CUDA (see Scheduler): the host work of a step (~0.3 ms
# at batch 1, ~2 ms at batch 64, docs/benchmarks.md) is paid once per round instead of
# once per token; a new request waits at most one round (8 steps: ~10-15 ms).
DEFAULT_CUDA_SCHEDULER_STEPS = 8


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible to torch")
    return torch.device(device)


def build_engine(model: str | os.PathLike | T6, tokenizer=None, *, dtype: str = "auto",
                 device: str = "auto", block_size: int = 16, num_blocks: int | None = None,
                 cache_memory: int | None = None, gpu_memory_utilization: float = 0.9,
                 enable_prefix_caching: bool = True, max_num_batched_tokens: int = 2048,
                 max_num_seqs: int = 128, max_model_len: int | None = None,
                 max_queued_requests: int | None = None, seed: int = 0,
                 enforce_eager: bool = False, num_scheduler_steps: int | None = None
                 ) -> LLMEngine:
    """num_scheduler_steps None: DEFAULT_CUDA_SCHEDULER_STEPS on CUDA, 1 on the CPU (where
    the model step, not the host, is the bottleneck)."""
    if isinstance(model, T6):
        module = model
    else:
        from tpaserve.models.loader import load
        module = load(model, dtype=dtype, device=str(resolve_device(device)))
    if next(module.parameters()).is_cuda:
        # one GEMM per layer for the factor projections and one for the MLP's c_fc1/c_fc2
        # (weights become views of the fused ones; state_dict unchanged; idempotent). Not on
        # the CPU, where a fused model's shared weights would trip safetensors' save_file.
        module.fuse_projections()
    if tokenizer is None and not isinstance(model, T6):
        tokenizer = model                     # look for it in the checkpoint directory
    if isinstance(tokenizer, (str, os.PathLike)):
        from tpaserve.models.tokenizer import load_tokenizer
        cfg_json = _read_config_json(model) if not isinstance(model, T6) else None
        tokenizer = load_tokenizer(tokenizer, cfg_json)
    on_cuda = next(module.parameters()).is_cuda
    if num_scheduler_steps is None:
        num_scheduler_steps = DEFAULT_CUDA_SCHEDULER_STEPS if on_cuda else 1
    config = EngineConfig(
        model=module.cfg,
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, cache_memory=cache_memory,
                          gpu_memory_utilization=gpu_memory_utilization,
                          enable_prefix_caching=enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens,
                                  max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                  max_queued_requests=max_queued_requests,
                                  num_scheduler_steps=num_scheduler_steps),
        dtype=str(next(module.parameters()).dtype).removeprefix("torch."),
        device=str(next(module.parameters()).device), enforce_eager=enforce_eager, seed=seed)
    return LLMEngine(module, config, tokenizer=tokenizer)


def _read_config_json(path) -> dict | None:
    import json
    f = os.path.join(os.fspath(path), "config.json")
    try:
        with open(f) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None
