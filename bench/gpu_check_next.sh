#!/usr/bin/env bash
# The first device call of the next session (written in session 6, when the device budget
# was spent after one run): the gpu tests of everything built without a GPU this session
# (constant-A kv-head grid, fp8 factor cache, MLA latent kernels, the engine with each), then
# the three kernel timings that pick defaults / check targets. ~8 min. Then, as separate
# calls: bench/gpu_check_family.sh (the family table, ~8 min) and the rest of
# bench/gpu_check_fp8.sh (accuracy through the GPU kernels, the capacity run).
#   carry: [".whl"] (scripts/device_wheels.sh), timeout_s 600
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:.
OUT=${OUT:-/tmp/out}
mkdir -p $OUT
timeout 300 python3 -m pytest -q -m gpu tests/kernels/test_const_a.py tests/kernels/test_fp8.py \
   tests/kernels/test_mla.py tests/kernels/test_decode.py tests/kernels/test_store.py \
   tests/engine/test_engine_gpu.py --tb=line 2>&1 | grep -E "^/|Error|passed|failed" \
   | cut -c1-300 | tail -20
# constant A: the kv-head grid and T6's tiles against the shipped config, 64 x 32K / 128K
timeout 100 python3 bench/const_a.py --quick --out $OUT/const_a.json 2>&1 | tail -12
# MLA decode against its prediction (65-75% of copy at 64 x 32K) and the MHA twin's SDPA
timeout 100 python3 bench/mla.py --quick --out $OUT/mla.json 2>&1 | tail -12
# fp8 vs bf16 T6-medium decode (target 64 x 128K <= 1.0 ms; predicted 2.2-2.6)
timeout 120 python3 bench/fp8_decode.py --quick --out $OUT 2>&1 | tail -16
