#!/usr/bin/env bash
# One device call (#14 item 3): the fp8 factor cache (--cache-dtype fp8) on the GPU.
#  1. gpu tests: the fp8 kernels at real sizes (store bit-exact with bf16 inputs, decode,
#     prefill / mixed) and the bf16 kernels they share code with; the engine's gpu tests
#  2. decode speed, fp8 vs bf16, T6-medium (64 x 128K target <= 1.0 ms) + fp8 tile sweep
#  3. accuracy on the GPU kernels (t6-demo text; random T6-medium), fp8 vs bf16 cache
#  4. capacity: the engine's blocks for one cache budget, bf16 vs fp8, and a --verify run
#     of 32K-token requests against an fp8 server (twice the bf16 count running at once)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:.
OUT=${OUT:-/tmp/out}
mkdir -p $OUT
python3 -m pytest -q -m gpu tests/kernels/test_fp8.py tests/kernels/test_store.py \
   tests/kernels/test_decode.py tests/kernels/test_prefill.py tests/engine/test_engine_gpu.py \
   --tb=line 2>&1 | grep -E "^/|Error|passed|failed" | cut -c1-300 | tail -15
timeout 240 python3 bench/fp8_decode.py --out $OUT 2>&1 | tail -20
timeout 120 python3 -m bench.fp8_accuracy --model t6-demo --device cuda --tokens 500 \
   --chunk 1 --variants fp8,float16 --json $OUT/fp8_acc_demo.json 2>&1 | grep -v WARN | tail -5
timeout 120 python3 -m bench.fp8_accuracy --model t6-medium --device cuda --tokens 1024 \
   --prompts 8 --greedy-tokens 64 --chunk 1 --variants fp8 --json $OUT/fp8_acc_medium.json \
   2>&1 | grep -v WARN | tail -4
# capacity: same 24 GiB cache budget, 32K-token sequences (bf16: 36, fp8: 73 by arithmetic)
python3 -m bench.make_random_checkpoint --preset t6-medium --out /tmp/ck \
   --max-position 33024 >/dev/null
python3 -m bench.capacity --model t6-medium --cache-bytes 24GiB --contexts 32768 --dtype fp8 \
   | tail -2
for cd in bfloat16 fp8; do
  python3 -m tpaserve --model /tmp/ck --cache-dtype $cd --cache-memory 24GiB \
     --max-model-len 33024 --max-num-seqs 128 --max-num-batched-tokens 16384 --port 8011 \
     > $OUT/serve_$cd.log 2>&1 &
  pid=$!
  for i in $(seq 120); do curl -sf localhost:8011/health >/dev/null && break; sleep 2; done
  grep -m1 "factor cache" $OUT/serve_$cd.log | cut -c1-300
  curl -s localhost:8011/metrics | grep -E "^tpaserve:factor_cache_(blocks_total|bytes_per_token)"
  if [ $cd = fp8 ]; then
    timeout 300 python3 -m bench.capacity --model t6-medium --dtype fp8 --contexts 32768 \
       --verify http://127.0.0.1:8011 --verify-context 32768 --verify-output-len 2048 \
       --vocab-size 1000 --json $OUT/capacity_fp8.json 2>&1 | tail -3
  fi
  kill $pid; wait $pid 2>/dev/null
done
