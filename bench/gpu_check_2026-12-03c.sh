#!/usr/bin/env bash
# Device call (2026-12-03, session 4): the non-finite guard's cost per step (bench/guard_cost)
# and offline T6-medium throughput with and without the guard, alternated, same run.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:.
python3 -m bench.guard_cost
python3 -m bench.make_random_checkpoint --preset t6-medium --out /tmp/ck --max-position 4096 >/dev/null
F="--max-num-seqs 256 --cache-memory 24GiB --max-num-batched-tokens 8192"
off() { python3 -m bench.offline --model /tmp/ck --num-prompts 1024 --input-len 512 --output-len 256 \
        --vocab-size 1000 --temperature 1.0 -- $F 2>/dev/null | tail -1 | \
        python3 -c "import json,sys; print('$1', round(json.load(sys.stdin)['output_throughput']))"; }
cp tpaserve/runner/sampler.py /tmp/on.py
sed -e 's/^        return tokens.masked_fill(broken, NONFINITE)$/        return tokens/' \
    -e 's/^        broken = ~(x.amax(dim=-1) < float("inf")).*$/        broken = None/' /tmp/on.py > /tmp/off.py
for i in 1 2; do
  cp /tmp/on.py tpaserve/runner/sampler.py;  off "guard on "
  cp /tmp/off.py tpaserve/runner/sampler.py; off "guard off"
done
cp /tmp/on.py tpaserve/runner/sampler.py
