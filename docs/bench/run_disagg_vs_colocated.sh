#!/usr/bin/env bash
# Disaggregated (1 prefill + 1 decode) vs colocated (2 workers) on the tiny checkpoint:
# the same rate sweep of the mixed workload against each cluster in turn, then --compare.
#   docs/bench/run_disagg_vs_colocated.sh [WORK_DIR]     (full reports; default /tmp/dsv32-bench-<time>)
# The small artifacts (summaries, comparison table and plot, load and CPU accounting) are copied to
# $OUT (default docs/bench/disagg_vs_colocated/run-<time>).
# Knobs (environment): RATES, NUM_PROMPTS, SLO, WORKLOAD, ENGINE, OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-/tmp/dsv32-bench-$(date +%s)}
OUT=${OUT:-docs/bench/disagg_vs_colocated/run-$(date +%Y%m%d-%H%M)}
CLI=${CLI:-.venv/bin/dsv32-serve}
RATES=${RATES:-0.25,0.5,1,1.5}
NUM_PROMPTS=${NUM_PROMPTS:-32}
SLO=${SLO:-ttft=5000,tpot=200}
WORKLOAD=${WORKLOAD:---workload mixed --input-len 64 --output-len 32 --long-input-len 1024 --long-output-len 8 --long-fraction 0.25}
ENGINE=${ENGINE:---max-num-batched-tokens 256}
export OMP_NUM_THREADS=1
mkdir -p "$WORK" "$OUT"

run_mode() {  # name, up flags...
  local name=$1; shift
  local logs=$WORK/$name-logs
  mkdir -p "$logs"
  $CLI up --model checkpoints/tiny --port 0 $ENGINE "$@" --log-dir "$logs" >"$logs/up.out" 2>"$logs/up.err" &
  local up=$!
  for _ in $(seq 600); do grep -q '^ready ' "$logs/up.out" && break; kill -0 $up || { cat "$logs/up.err"; exit 1; }; sleep 0.2; done
  local target; target=$(awk '/^ready /{print $2}' "$logs/up.out")
  echo "== $name (up $ENGINE $*) before: $(uptime)" | tee -a "$WORK/load.txt"
  .venv/bin/python docs/bench/cpu_times.py $up >"$logs/cpu.json"
  local t0=$SECONDS
  /usr/bin/time -f "  loadtest (the harness)       %U user + %S sys CPU s" -a -o "$WORK/load.txt" \
    $CLI loadtest --target "$target" $WORKLOAD --num-prompts "$NUM_PROMPTS" --request-rate "$RATES" \
    --slo "$SLO" --seed 0 --request-timeout 300 --no-progress --output-dir "$WORK/$name" || true
  { echo "  $((SECONDS - t0)) s wall; CPU seconds used during the sweep:"
    .venv/bin/python docs/bench/cpu_times.py $up "$logs/cpu.json"
    echo "   after: $(uptime)"; } >>"$WORK/load.txt"
  kill -INT $up; wait $up || true
}

run_mode disagg --prefill 1 --decode 1
run_mode colocated --colocated --workers 2
$CLI loadtest --compare "$WORK/disagg/report.json" "$WORK/colocated/report.json" --output-dir "$WORK" \
  | tee "$WORK/compare.txt"

# small copies for the README: summaries without the per-request records, the plot (256 colours), the load
for m in disagg colocated; do
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); [r.pop("requests", None) for r in d["runs"]]; json.dump(d, open(sys.argv[2], "w"), indent=1)' \
    "$WORK/$m/report.json" "$OUT/$m.json"
done
cp "$WORK/compare.txt" "$WORK/load.txt" "$OUT/"
.venv/bin/python -c 'import sys; from PIL import Image; Image.open(sys.argv[1]).convert("RGB").quantize(256).save(sys.argv[2], optimize=True)' \
  "$WORK/compare.png" "$OUT/compare.png" || cp "$WORK/compare.png" "$OUT/"
echo "full reports in $WORK; summaries and plots in $OUT"
