#!/usr/bin/env bash
# Device call (2026-12-03, session 4, last): the merged main's gpu tests, the non-finite
# guard's cost in its final form, and served throughput after the request-policy,
# structured-output and reliability changes (same workloads as runs D/E in docs/benchmarks.md).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:.
OUT=${OUT:-/tmp/out}
python3 -m pytest -q -m gpu tests/engine/test_engine_gpu.py tests/kernels tests/models/test_fused_model.py 2>&1 | tail -2
python3 -m bench.guard_cost
python3 -m bench.make_random_checkpoint --preset t6-medium --out /tmp/ck --max-position 4096 >/dev/null
B="python3 -m bench.offline_vs_served --client-procs 4 --out-dir $OUT"
$B --model /tmp/ck --name t6-medium --concurrency 1,256 --num-prompts 16,1024 --offline-prompts 1024 \
   --json $OUT/runF_t6m.json -- --max-num-seqs 256 --cache-memory 24GiB --max-num-batched-tokens 8192 \
   --api-server-count 2 2>&1 | grep -E "out tok/s"
$B --model tpaserve/demo/t6-demo --name t6-demo --input-len 256 --output-len 128 --concurrency 256 \
   --num-prompts 2048 --offline-prompts 2048 --client-procs 6 --json $OUT/runF_demo.json -- \
   --max-num-seqs 512 --cache-memory 8GiB --max-num-batched-tokens 8192 --api-server-count 3 2>&1 | grep -E "out tok/s"
