#!/usr/bin/env bash
# Where a loaded server's time goes: py-spy samples each of its processes (the API
# process(es) and the engine core) while bench.serve keeps it busy.
#     bash bench/profile_serve.sh CKPT NAME CONCURRENCY NUM_PROMPTS [server flags...]
# Writes $OUT/spy-<pid>.txt (py-spy's raw collapsed stacks, one file per process; the first
# line of each says which process) and $OUT/profile-server.log. Needs py-spy (the GPU
# machine: scripts/device_wheels.sh carries it) and ptrace permission (root there).
set -u
OUT=${OUT:-/tmp}
CKPT=$1; NAME=$2; CONC=$3; NUM=$4; shift 4
PORT=8093
python3 -m tpaserve --model "$CKPT" --served-model-name "$NAME" --port $PORT "$@" \
  > "$OUT/profile-server.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 600); do
  curl -s -o /dev/null -w "%{http_code}" localhost:$PORT/health 2>/dev/null | grep -q 200 && break
  sleep 0.5
done
sleep 1
CORE=$(grep -o "engine core process [0-9]*" "$OUT/profile-server.log" | grep -o "[0-9]*$")
API=$(grep -o "API processes: [0-9, ]*" "$OUT/profile-server.log" | grep -o "[0-9]*" | tail -n +2)
API=${API:-$SERVER}
python3 -m bench.serve --base-url http://127.0.0.1:$PORT --model "$NAME" --token-ids \
  --vocab-size 1000 --temperature 1.0 --input-len 512 --output-len 256 --concurrency "$CONC" \
  --num-prompts "$NUM" --no-progress > "$OUT/profile-load.txt" 2>&1 &
LOAD=$!
sleep 6                                     # past the first admissions
for pid in $CORE $API; do
  py-spy record -p "$pid" -d 6 -r 250 -f raw -o "$OUT/spy-$pid.txt" > /dev/null 2>&1 &
done
wait $LOAD
sleep 1
for pid in $CORE; do sed -i "1i # engine core $pid" "$OUT/spy-$pid.txt" 2>/dev/null; done
for pid in $API; do sed -i "1i # API process $pid" "$OUT/spy-$pid.txt" 2>/dev/null; done
kill -TERM $SERVER; wait $SERVER
grep "output token throughput" "$OUT/profile-load.txt"
