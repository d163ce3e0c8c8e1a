#!/usr/bin/env bash
# One device call (2026-12-03, session 4): the gpu tests of the merged main (structured
# outputs on CUDA, the non-finite guard) and structured outputs' cost served
# (bench/structured). The guard's cost is gpu_check_2026-12-03c.sh's.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:.
OUT=${OUT:-/tmp/out}
python3 -m pytest -q -m gpu tests/engine/test_engine_gpu.py 2>&1 | tail -4
python3 -m bench.make_random_checkpoint --preset t6-medium --out /tmp/ck --max-position 4096 >/dev/null
F="--max-num-seqs 256 --cache-memory 24GiB --max-num-batched-tokens 8192"
python3 -m bench.structured --model /tmp/ck --name t6-medium --input-len 512 --output-len 256 \
   --concurrency 64 --num-prompts 512 --json $OUT/structured_t6m.json -- $F 2>&1 | tail -8
python3 -m bench.structured --model tpaserve/demo/t6-demo --name t6-demo --input-len 256 --output-len 128 \
   --concurrency 64 --num-prompts 512 --vocab-size 8000 --json $OUT/structured_demo.json \
   -- --max-num-seqs 256 --cache-memory 8GiB --max-num-batched-tokens 8192 2>&1 | tail -8
