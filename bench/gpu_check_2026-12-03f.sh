#!/usr/bin/env bash
# One device call (2026-12-03, session 5; run twice: with constrained rows in multi-step
# rounds, which is main, and with the next step's masks filled in a thread, reverted). The
# gpu tests (engine: masks under graphs and rounds; the RoPE tables on CUDA), the core's step
# cost plain vs constrained (bench/structured_steps), then served (bench/structured).
# The session's first call, bench/gpu_check_2026-12-03e.sh, measured the overlap alone.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:.
OUT=${OUT:-/tmp/out}
python3 -m pytest -q -m gpu tests/engine/test_engine_gpu.py tests/models/test_rope_tables.py \
   tests/models/test_fused_model.py --tb=line 2>&1 | grep -E "^/|Error|passed|failed" | cut -c1-300 | tail -12
python3 -m bench.make_random_checkpoint --preset t6-medium --out /tmp/ck --max-position 4096 \
   --tokenizer tpaserve/demo/t6-demo >/dev/null
python3 bench/structured_steps.py --model /tmp/ck --batch 64 --rows plain8,plain1,json8,json1 \
   --json $OUT/steps_t6m.json 2>&1 | grep -v "^I0000"
F="--max-num-seqs 256 --cache-memory 24GiB --max-num-batched-tokens 8192"
python3 -m bench.structured --model /tmp/ck --name t6-medium --input-len 512 --output-len 256 \
   --vocab-size 8000 --concurrency 64 --num-prompts 512 --json $OUT/structured_t6m.json \
   -- $F 2>&1 | tail -4
python3 -m bench.structured --model tpaserve/demo/t6-demo --name t6-demo --input-len 256 --output-len 128 \
   --concurrency 64 --num-prompts 512 --vocab-size 8000 --json $OUT/structured_demo.json \
   -- --max-num-seqs 256 --cache-memory 8GiB --max-num-batched-tokens 8192 2>&1 | tail -4
