#!/usr/bin/env bash
# One device call (2026-12-03, session 5): structured outputs with the overlapped masks.
# The engine's gpu tests (masks under graphs, no host sync in execute or in the held-back
# sampling), llguidance's mask cost on this host (bench/mask_cost), then what constraining
# costs served (bench/structured): t6-demo, and random T6-medium with t6-demo's tokenizer
# (so its JSON parses; 8192 of its 50304 ids are tokens).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:.
OUT=${OUT:-/tmp/out}
python3 -m pytest -q -m gpu tests/engine/test_engine_gpu.py 2>&1 | tail -4
python3 -m bench.mask_cost --rows 1,16,64 --steps 200 --json $OUT/mask_cost.json 2>&1 | tail -6
python3 -m bench.make_random_checkpoint --preset t6-medium --out /tmp/ck --max-position 4096 \
   --tokenizer tpaserve/demo/t6-demo >/dev/null
F="--max-num-seqs 256 --cache-memory 24GiB --max-num-batched-tokens 8192"
python3 -m bench.structured --model /tmp/ck --name t6-medium --input-len 512 --output-len 256 \
   --vocab-size 8000 --concurrency 64 --num-prompts 512 --json $OUT/structured_t6m.json \
   -- $F 2>&1 | tail -5
python3 -m bench.structured --model tpaserve/demo/t6-demo --name t6-demo --input-len 256 --output-len 128 \
   --concurrency 64 --num-prompts 512 --vocab-size 8000 --json $OUT/structured_demo.json \
   -- --max-num-seqs 256 --cache-memory 8GiB --max-num-batched-tokens 8192 2>&1 | tail -5
