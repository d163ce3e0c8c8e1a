#!/usr/bin/env bash
# One device call for MLA through the latent cache (#17 item 4), first run on a GPU:
# the MLA kernels' and engine's gpu tests, the T6/const-A decode tests (mla_decode reuses
# decode.py's merge), registers/spills as compiled by the device's Triton, bench/mla.py
# (latent decode vs copy bandwidth and the MHA twin; the rows-launch prefill) against the
# prediction in docs/kernel_notes.md "MLA", then offline throughput of a medium MLA against
# T6-medium on the same workload.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:.
OUT=${OUT:-/tmp/out}
python3 -m pytest -q -m gpu tests/kernels/test_mla.py tests/kernels/test_decode.py \
   tests/engine/test_engine_gpu.py -k "mla or decode" \
   --tb=line 2>&1 | grep -E "^/|Error|passed|failed" | cut -c1-300 | tail -15
timeout 200 python3 bench/mla.py --quick --out $OUT/mla.json 2>&1 | tail -12
for preset in mla-medium t6-medium; do
  python3 -m bench.make_random_checkpoint --preset $preset --out /tmp/$preset \
     --max-position 4096 >/dev/null
  timeout 150 python3 -m bench.offline --model /tmp/$preset --num-prompts 256 --input-len 512 \
     --output-len 128 -- --max-num-seqs 128 --cache-memory 16GiB 2>&1 | tail -1
done
