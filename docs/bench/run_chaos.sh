#!/bin/bash
# Issue 10 benchmark: goodput, errors and recovery with and without faults (README "Faults under load").
# A local `up --prefill 2 --decode 2` on the tiny checkpoint, then one loadtest per mode on it.
# Usage: docs/bench/run_chaos.sh [OUT_DIR]   (from the repository root)
set -u
OUT=${1:-loadtest_results/chaos}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
.venv/bin/python -m dsv32_serve.cli up --model checkpoints/tiny --prefill 2 --decode 2 --port 0 \
  --log-dir "$OUT/up" > "$OUT/up.out" 2> "$OUT/up.err" &
UP=$!
trap 'kill -TERM $UP; wait $UP' EXIT
for _ in $(seq 1 300); do grep -q "^ready " "$OUT/up.out" && break; sleep 1; done
TARGET=$(grep "^ready " "$OUT/up.out" | awk '{print $2}')
REDIS=$(grep -o "redis redis://[^,]*" "$OUT/up.err" | awk '{print $2}')
LT=(--target "$TARGET" --num-prompts 60 --request-rate 1.5 --input-len 128 --output-len 32 --seed 1 --temperature 0
    --no-plots --no-progress --request-timeout 120 --chaos-redis-url "$REDIS")
for mode in none kill-decode stop-decode kill-prefill; do
  extra=()
  [ "$mode" != none ] && extra=(--chaos "$mode" --chaos-every 15 --chaos-stop 8)
  .venv/bin/python -m dsv32_serve.cli loadtest "${LT[@]}" "${extra[@]}" --output-dir "$OUT/$mode" > "$OUT/$mode.txt" 2>&1
  echo "== $mode"; grep -E "Successful|Failed req|Request throughput|Mean TTFT|P99 TTFT|P99 E2E|^chaos" "$OUT/$mode.txt"
  sleep 15  # restarts settle before the next mode
done
grep -c "attempt 1 failed" "$OUT/up/router.log" | sed 's/^/retried attempts: /'
