#!/usr/bin/env bash
# Quick serving check on the GPU machine (about 1 minute): a random-weights T6-medium
# checkpoint, tpaserve with the suite's flags, then bench.serve at concurrency 1 and 64
# (prompt 512 / output 256, 4 and 128 requests). Extra arguments go to the server.
#     bash bench/quick_serve.sh [--num-scheduler-steps 1 ...]        (writes $OUT/q.json)
# Needs the wheels of scripts/device_wheels.sh in .whl/ (the device image lacks fastapi...).
set -u
OUT=${OUT:-/tmp}
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.
python3 -m bench.make_random_checkpoint --out /tmp/ck --max-position 33024 | tail -1
python3 -m tpaserve --model /tmp/ck --served-model-name t6-medium --port 8011 --dtype bfloat16 \
  --cache-memory 6GiB --max-num-seqs 256 --max-model-len 33024 "$@" > "$OUT/server.log" 2>&1 &
python3 - <<'PY'
import time, urllib.request
for _ in range(240):
    try:
        urllib.request.urlopen("http://127.0.0.1:8011/health", timeout=1)
        break
    except Exception:
        time.sleep(1)
PY
python3 -m bench.serve --base-url http://127.0.0.1:8011 --model t6-medium --token-ids \
  --vocab-size 1000 --no-progress --temperature 1.0 --input-len 512 --output-len 256 \
  --concurrency 1,64 --num-prompts 4,128 --warmup 4 --json "$OUT/q.json" 2>&1 | tail -25
kill %1
wait
grep -i "error\|Traceback" "$OUT/server.log" | head -5
