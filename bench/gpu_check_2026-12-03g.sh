#!/usr/bin/env bash
# One device call (2026-12-03, session 5): MHA/GQA/MQA through the constant-A factor cache
# (#17 item 3): the kernels' and the engine's gpu tests, the T6 kernels' gpu tests (they gained
# constexpr branches), bench/const_a (CONST_A decode vs SDPA); then where a constrained round's
# device time goes (bench/structured_steps --trace).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:.
OUT=${OUT:-/tmp/out}
python3 -m pytest -q -m gpu tests/kernels/test_const_a.py tests/kernels/test_decode.py \
   tests/kernels/test_prefill.py tests/kernels/test_store.py tests/engine/test_engine_gpu.py \
   --tb=line 2>&1 | grep -E "^/|Error|passed|failed" | cut -c1-300 | tail -15
timeout 150 python3 bench/const_a.py --quick --out $OUT/const_a.json 2>&1 | tail -20
python3 -m bench.make_random_checkpoint --preset t6-medium --out /tmp/ck --max-position 4096 \
   --tokenizer tpaserve/demo/t6-demo >/dev/null
timeout 150 python3 bench/structured_steps.py --model /tmp/ck --batch 64 --rows plain8,json8 \
   --trace plain8,json8 --steps 60 --trace-steps 6 2>&1 | grep -v "^I0000" | cut -c1-160
