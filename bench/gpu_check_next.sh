#!/usr/bin/env bash
# The next session's first device call (written in session 7, when the device time ended):
# what session 7 changed after its last measurement, run through the defaults' own path.
#  1. gpu tests of the kernels whose defaults moved (constant-A tiles, MLA tiles and the
#     wave-based split count) and of the engine with them (CUDA graphs)
#  2. bench/mla.py (full grid: 64 x 128K is #17's MLA target point; predicted medium 0.449 ms
#     at 64 x 32K = 63% of copy, DeepSeek-Lite 0.722 = 79%, from the num_splits=4 sweep)
#  3. bench/const_a.py --quick: the defaults' column should equal the best variant of
#     docs/kernel_notes.md "Constant A, measured" (GQA 30/2 64 x 128K 1.14 ms)
#   carry: [".whl"] (scripts/device_wheels.sh), timeout_s 600
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
   >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.
OUT=${OUT:-/tmp/out}
mkdir -p $OUT
timeout 240 python3 -m pytest -q -m gpu tests/kernels/test_const_a.py tests/kernels/test_mla.py \
   tests/engine/test_engine_gpu.py --tb=line 2>&1 | grep -E "^/|Error|passed|failed" \
   | cut -c1-300 | tail -10
timeout 150 python3 bench/mla.py --out $OUT/mla.json 2>&1 | tail -16
timeout 120 python3 bench/const_a.py --quick --out $OUT/const_a.json 2>&1 | tail -12
