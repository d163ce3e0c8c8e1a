#!/usr/bin/env bash
# Session 7's third device call (~8 min, as run): the constant-A tile defaults picked from
# bench/const_a.py (kv grid for batch < 16 and groups >= 16 heads, 1-warp blocks for smaller
# groups) through the gpu tests; the MLA decode tile / split sweep; the fp8 cache's accuracy
# through the GPU kernels and its capacity run (bench/gpu_check_fp8.sh steps 3-4).
#   carry: [".whl"] (scripts/device_wheels.sh), timeout_s 580
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
   >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.
OUT=${OUT:-/tmp/out}
mkdir -p $OUT
timeout 150 python3 -m pytest -q -m gpu tests/kernels/test_const_a.py \
   tests/engine/test_engine_gpu.py -k "const or dense or kernels_and_graphs" --tb=line 2>&1 \
   | grep -E "^/|Error|passed|failed" | cut -c1-300 | tail -10
timeout 110 python3 bench/mla.py --sweep --out $OUT/mla_sweep.json 2>&1 | tail -30
timeout 70 python3 -m bench.fp8_accuracy --model t6-demo --device cuda --tokens 500 \
   --chunk 1 --variants fp8,float16 --json $OUT/fp8_acc_demo.json 2>&1 | grep -v WARN | tail -5
timeout 80 python3 -m bench.fp8_accuracy --model t6-medium --device cuda --tokens 1024 \
   --prompts 8 --greedy-tokens 64 --chunk 1 --variants fp8 --json $OUT/fp8_acc_medium.json \
   2>&1 | grep -v WARN | tail -4
python3 -m bench.make_random_checkpoint --preset t6-medium --out /tmp/ck \
   --max-position 33024 >/dev/null
python3 -m bench.capacity --model t6-medium --cache-bytes 24GiB --contexts 32768 --dtype fp8 \
   | tail -2
python3 -m tpaserve --model /tmp/ck --cache-dtype fp8 --cache-memory 24GiB \
   --max-model-len 33024 --max-num-seqs 128 --max-num-batched-tokens 16384 --port 8011 \
   > $OUT/serve_fp8.log 2>&1 &
pid=$!
for i in $(seq 120); do curl -sf localhost:8011/health >/dev/null && break; sleep 2; done
grep -m1 "factor cache" $OUT/serve_fp8.log | cut -c1-300
curl -s localhost:8011/metrics | grep -E "^tpaserve:factor_cache_(blocks_total|bytes_per_token)"
timeout 150 python3 -m bench.capacity --model t6-medium --dtype fp8 --contexts 32768 \
   --verify http://127.0.0.1:8011 --verify-context 32768 --verify-output-len 1024 \
   --vocab-size 1000 --json $OUT/capacity_fp8.json 2>&1 | tail -3
kill $pid; wait $pid 2>/dev/null
