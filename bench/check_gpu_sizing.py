"""Device check of the default cache sizing (--gpu-memory-utilization): profile the
activation peak of a full-budget step, size the cache, capture graphs, serve a request.

    PYTHONPATH=. python3 bench/check_gpu_sizing.py
"""
import logging
import time

import torch

from tpaserve.config import ModelConfig
from tpaserve.frontend.llm_engine import build_engine
from tpaserve.models import T6
from tpaserve.sampling_params import SamplingParams

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
cfg = ModelConfig(n_layer=24, n_head=47, head_dim=64, n_embd=1024, vocab_size=50304, k_rank=2,
                  v_rank=2, q_rank=6, max_position=4096)
model = T6(cfg).init_random(0).to(device="cuda", dtype=torch.bfloat16).eval()
for util in (0.5, 0.9):
    t = time.perf_counter()
    eng = build_engine(model, gpu_memory_utilization=util)
    total = torch.cuda.get_device_properties(0).total_memory
    used = torch.cuda.memory_reserved()
    print(f"util {util}: {eng.core.cache.num_blocks} blocks, cache {eng.core.cache.nbytes / 2**30:.1f} GiB, "
          f"reserved {used / 2**30:.1f} of {total / 2**30:.1f} GiB ({used / total:.2f}), "
          f"start-up {time.perf_counter() - t:.1f} s", flush=True)
    eng.add_request("a", list(range(1, 3000)), SamplingParams(max_tokens=8, temperature=0))
    while eng.has_unfinished_requests():
        outs = eng.step()
    print("served:", outs[0].outputs[0].token_ids, flush=True)
    del eng
    torch.cuda.empty_cache()
