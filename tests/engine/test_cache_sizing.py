"""How the factor cache is sized: --num-blocks, --cache-memory, the CPU default, and the
CUDA path (profile a full-budget step, then fill utilization * memory). The CUDA memory
API is replaced by a ledger here (no GPU on this machine); the step it profiles is real."""
import pytest
import torch

from tpaserve.config import ConfigError, ModelConfig
from tpaserve.frontend.llm_engine import build_engine
from tpaserve.models import T6
from tpaserve.runner.factor_cache import FactorCacheSpec
from tpaserve.runner.memory import profile_cuda_budget
from tpaserve.runner.sampler import Sampler

CFG = ModelConfig(n_layer=2, n_head=5, head_dim=8, n_embd=32, vocab_size=101, k_rank=2, v_rank=2,
                  q_rank=3, max_position=256)


@pytest.fixture(scope="module")
def model():
    return T6(CFG).init_random(0).eval()


def test_explicit_sizes(model):
    assert build_engine(model, num_blocks=7).core.cache.num_blocks == 7
    eng = build_engine(model, cache_memory=10 * 2**20, block_size=16)
    assert eng.core.cache.num_blocks == 10 * 2**20 // eng.core.spec.bytes_per_block
    # bytes per token = layers * (R_K + R_V)(h + d_h) * itemsize
    assert eng.core.spec.bytes_per_token == 2 * (2 + 2) * (5 + 8) * 4
    default = build_engine(model)
    assert default.core.cache.num_blocks == (256 * 2**20) // default.core.spec.bytes_per_block
    with pytest.raises(ConfigError, match="no block"):
        build_engine(model, cache_memory=10)


def test_cuda_profile_path_sizes_from_the_measured_peak(model, monkeypatch):
    """runner/memory.profile_cuda_budget against a fake allocator ledger: the weights and
    the profiled step's peak are taken off utilization * total, and a graph reserve too.
    The step it profiles is real (on the CPU here)."""
    total, weights, peak = 10 * 2**30, 1 * 2**30, 3 * 2**30
    calls = []
    fake = dict(
        synchronize=lambda dev=None: None, empty_cache=lambda: None,
        memory_allocated=lambda dev=None: weights,
        reset_peak_memory_stats=lambda dev=None: calls.append("reset"),
        max_memory_allocated=lambda dev=None: calls.append("peak") or peak,
        get_device_properties=lambda dev=None: type("P", (), {"total_memory": total})())
    for name, fn in fake.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    spec = FactorCacheSpec.from_model(CFG, torch.float32, 16)
    budget = profile_cuda_budget(model, spec, Sampler(CFG.vocab_size, None),
                                 torch.device("cpu"), utilization=0.9,
                                 max_num_batched_tokens=64, max_num_seqs=4, max_model_len=256,
                                 graphs=True)
    assert calls == ["reset", "peak"]                 # the peak is read after a real step
    probe_bytes = -(-64 // 16) * spec.bytes_per_block
    activations = peak - probe_bytes - weights
    # one full-budget step of activations (the largest mixed-step graph), the graphs' fp32
    # logits buffer (max_num_seqs = 4 rows), cuBLAS's workspace
    reserve = activations + 4 * CFG.vocab_size * 4 + 96 * 2**20
    assert budget == int(total * 0.9) - weights - activations - reserve
    no_graphs = profile_cuda_budget(model, spec, Sampler(CFG.vocab_size, None),
                                    torch.device("cpu"), utilization=0.9,
                                    max_num_batched_tokens=64, max_num_seqs=4,
                                    max_model_len=256, graphs=False)
    assert no_graphs == budget + reserve
