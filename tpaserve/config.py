"""Frozen, per-concern configuration. Every user-facing value is validated here with a
message that shows the offending numbers; the engine trusts what it receives."""
from __future__ import annotations

from dataclasses import dataclass, field

from tpaserve.exceptions import ConfigError

__all__ = ["ConfigError", "ModelConfig", "CacheConfig", "SchedulerConfig", "KVEventsConfig",
           "EngineConfig", "MAX_SCHEDULER_STEPS"]


ROPE_TABLE_DTYPES = ("bfloat16", "float32")
ROPE_TABLES = ("trained", "exact")          # --rope-tables: as trained, or exact fp32


def check_rope_table_dtype(value: object) -> None:
    if value not in ROPE_TABLE_DTYPES:
        raise ConfigError(f"model config: rope_table_dtype must be one of "
                          f"{', '.join(ROPE_TABLE_DTYPES)}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a T6 / T6-KVonly model (../shared/TPA.md section 2).

    q_rank is None for T6-KVonly (queries are a plain linear d_model -> h*d_h).
    """
    n_layer: int
    n_head: int
    head_dim: int
    n_embd: int
    vocab_size: int
    k_rank: int
    v_rank: int
    q_rank: int | None = None
    max_position: int = 1024          # block_size in the authors' config: training context
    using_groupnorm: bool = False
    rope_base: float = 10000.0
    # RoPE cos/sin tables as the checkpoint was trained (models/layers.Rotary): "bfloat16" =
    # fp32 tables rounded to bf16, as the authors' Rotary does (the loader's default for
    # their checkpoints); "float32" = exact (tpaserve-trained models, --rope-tables exact)
    rope_table_dtype: str = "float32"
    name: str = "t6"

    def __post_init__(self) -> None:
        for f in ("n_layer", "n_head", "head_dim", "n_embd", "vocab_size", "k_rank", "v_rank",
                  "max_position"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"model config: {f} must be a positive integer, got {v!r}")
        if self.q_rank is not None and (not isinstance(self.q_rank, int) or self.q_rank < 1):
            raise ConfigError(f"model config: q_rank must be a positive integer, got {self.q_rank!r}")
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        check_rope_table_dtype(self.rope_table_dtype)

    @property
    def kv_only(self) -> bool:
        return self.q_rank is None

    @property
    def mlp_hidden(self) -> int:
        # SwiGLU hidden size used by the authors: floor(8/3 * d_model)
        return int(8 * self.n_embd / 3)

    @property
    def factor_elems_per_token_layer(self) -> int:
        """Cache numbers per token per layer: (R_K + R_V)(h + d_h)."""
        return (self.k_rank + self.v_rank) * (self.n_head + self.head_dim)

    @property
    def cache_elems_per_token_layer(self) -> int:
        """The family's common name for it (models/dense.py, models/mla.py have theirs)."""
        return self.factor_elems_per_token_layer

    @property
    def mha_equivalent_heads(self) -> int:
        """Heads of a same-size MHA model: d_model / d_h (the paper's comparison)."""
        return max(1, self.n_embd // self.head_dim)

    @property
    def mha_elems_per_token_layer(self) -> int:
        return 2 * self.mha_equivalent_heads * self.head_dim


# --cache-dtype: auto = the model's dtype; fp8 = e4m3 with the scales folded into the
# factors (docs/kernel_notes.md, "fp8 factor cache"). Resolved where torch runs
# (core/engine_core.resolve_cache_dtype), which also refuses what the device cannot do.
CACHE_DTYPES = ("auto", "bfloat16", "bf16", "float16", "fp8")


@dataclass(frozen=True)
class CacheConfig:
    """How the paged factor cache is sized. Exactly one of num_blocks / cache_memory /
    gpu_memory_utilization decides the size (checked by the engine at start-up)."""
    block_size: int = 16
    num_blocks: int | None = None
    cache_memory: int | None = None            # bytes
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    cpu_default_memory: int = 256 * 2**20      # CPU with nothing given: 256 MiB
    cache_dtype: str = "auto"                  # CACHE_DTYPES

    def __post_init__(self) -> None:
        if self.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(f"--cache-dtype must be one of {', '.join(CACHE_DTYPES)}, got "
                              f"{self.cache_dtype!r}")
        if self.block_size < 1 or self.block_size > 1024:
            raise ConfigError(f"--block-size must be in [1, 1024], got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"--num-blocks must be >= 1, got {self.num_blocks}")
        if self.cache_memory is not None and self.cache_memory < 1:
            raise ConfigError(f"--cache-memory must be positive, got {self.cache_memory} bytes")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")


MAX_SCHEDULER_STEPS = 64
SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048   # token budget per engine step
    max_num_seqs: int = 128              # running requests at once
    max_model_len: int | None = None     # None: the model's max_position
    max_queued_requests: int | None = None
    # decode steps per scheduling round (see Scheduler._round_steps): host work once per
    # round, not once per token. None: the core picks (8 on CUDA, 1 on the CPU).
    num_scheduler_steps: int | None = 1
    # fcfs: arrival order, and a request's `priority` must be 0 (a client cannot jump the
    # queue or choose who is preempted); priority: lower values first, then arrival order
    scheduling_policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ConfigError(f"--scheduling-policy must be one of "
                              f"{', '.join(SCHEDULING_POLICIES)}, got {self.scheduling_policy!r}")
        if self.num_scheduler_steps is not None and \
                not 1 <= self.num_scheduler_steps <= MAX_SCHEDULER_STEPS:
            raise ConfigError(f"--num-scheduler-steps must be in [1, {MAX_SCHEDULER_STEPS}], "
                              f"got {self.num_scheduler_steps}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(
                f"--max-num-batched-tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"--max-num-seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"--max-model-len must be >= 1, got {self.max_model_len}")
        # 0 would refuse every request: all of them pass through the waiting queue
        if self.max_queued_requests is not None and self.max_queued_requests < 1:
            raise ConfigError(
                f"--max-queued-requests must be >= 1, got {self.max_queued_requests} (every "
                f"request waits in the queue before it runs; leave it out for no bound)")


def _check_zmq_endpoint(flag: str, endpoint: str) -> None:
    """tcp://HOST:PORT, ipc://PATH or inproc://NAME (what ZMQ can bind or connect)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("tcp", "ipc", "inproc") or not rest:
        raise ConfigError(f"{flag} must look like tcp://*:5557, tcp://HOST:PORT, ipc://PATH "
                          f"or inproc://NAME, got {endpoint!r}")
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"{flag} {endpoint!r}: a tcp endpoint needs a host (or *) and "
                              f"a port in [1, 65535], e.g. tcp://*:5557")


@dataclass(frozen=True)
class KVEventsConfig:
    """Where the core publishes its prefix cache's changes (core/kv_events.py), in vLLM's
    KV-event format. endpoint None: off (the block manager records nothing)."""
    endpoint: str | None = None
    replay_endpoint: str | None = None     # a ROUTER, always bound: missed batches on request
    topic: str = ""

    def __post_init__(self) -> None:
        if self.endpoint is not None:
            _check_zmq_endpoint("--kv-events-endpoint", self.endpoint)
        if self.replay_endpoint is not None:
            if self.endpoint is None:
                raise ConfigError("--kv-events-replay-endpoint needs --kv-events-endpoint")
            _check_zmq_endpoint("--kv-events-replay-endpoint", self.replay_endpoint)
            if self.replay_endpoint == self.endpoint:
                raise ConfigError(f"--kv-events-replay-endpoint must differ from "
                                  f"--kv-events-endpoint, both are {self.endpoint!r}")
        if self.topic and self.endpoint is None:
            raise ConfigError("--kv-events-topic needs --kv-events-endpoint")


@dataclass(frozen=True)
class EngineConfig:
    """What an engine core is built from. Plain values only: it is pickled to the engine core
    process. `model` is a checkpoint directory; device and dtype may be "auto" and
    num_scheduler_steps None: the core resolves them where torch runs and reports the
    resolved values back (engine/messages.EngineInfo)."""
    model: str = ""
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    kv_events: KVEventsConfig = field(default_factory=KVEventsConfig)
    dtype: str = "auto"
    device: str = "auto"
    enforce_eager: bool = False
    seed: int = 0
    # prepare step N+1 while the device runs step N (Scheduler: placeholders)
    async_scheduling: bool = True
    # from the tokenizer, which the frontend loads: the sampler never draws ids past
    # vocab_size (a model's embedding is often padded beyond it); eos ends a request
    eos_token_id: int | None = None
    vocab_size: int | None = None
    # where that tokenizer was loaded from: the core builds structured outputs' token
    # masks from it (core/structured.py); None: constrained requests are refused
    tokenizer: str | None = None
    # RoPE tables (ROPE_TABLES): "trained" = as the checkpoint was trained (bf16-rounded for
    # the authors' checkpoints, config.json rope_table_dtype otherwise); "exact" = fp32.
    # The core hands it to models.loader.load(rope_tables=...).
    rope_tables: str = "trained"

    def __post_init__(self) -> None:
        if self.rope_tables not in ROPE_TABLES:
            raise ConfigError(f"--rope-tables must be one of {', '.join(ROPE_TABLES)}, "
                              f"got {self.rope_tables!r}")
        if self.kv_events.endpoint is not None and not self.cache.enable_prefix_caching:
            # the events describe the prefix cache: without it there would be none
            raise ConfigError("--kv-events-endpoint publishes the prefix cache's changes: it "
                              "cannot be used with --no-enable-prefix-caching")
