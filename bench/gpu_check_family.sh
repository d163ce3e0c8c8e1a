#!/usr/bin/env bash
# One device call (the session after 2026-12-03, one H200): the paper's family side by side
# (#17 item 6), bench/family.py. Run with carry [".whl"] (scripts/device_wheels.sh) and
# timeout_s 600; it needs ~9 minutes of the session's ~25:
#   ~20 s    the wheels
#   <= 450 s bench/family.py --budget-s 450, sized for it (bench/family.py GPU workload):
#            decode timing, all twins, one process: ~60 s (a Triton compile per twin shape,
#            do_bench at 64 x 32K and 64 x 128K; MHA-16 at 128K allocates 34 GB of cache);
#            then per twin, in the order T6, GQA-2, MHA-16, MQA, GQA-4, T6-KVonly, MLA:
#            checkpoint ~10 s, server start ~20 s (16 GiB cache, CUDA graphs), warm-up and
#            c=64 (128 prompts) + c=256 (256 prompts) of 512 + 128 tokens ~15 s, four 32K
#            prompts + 32 tokens ~10 s; MLA (served since branch mla-serve) the same. A twin that does not fit the budget is
#            recorded as "out of time"; family.json is rewritten after every twin.
# Afterwards, on the CPU side (matplotlib is not on the device):
#   python -m bench.family --report <files_at>/family/family.json \
#       --markdown /tmp/family.md --plot docs/img/family.png
# and the table goes into docs/benchmarks.md ("The family side by side").
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:.
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
timeout 540 python3 -m bench.family --out $OUT/family --budget-s 450 2>&1 \
   | grep -v "^I0000" | cut -c1-220 | tail -120
ls -la $OUT/family $OUT/family/raw 2>/dev/null | tail -40
