#!/usr/bin/env bash
# `riskserve demo` end to end, for BENCHMARKS.md: wall time of the whole incident (three
# trainings, 30,000-customer day, backtest, guardrail rollback, trace, v3 to 100%, reports) on
# this machine. The demo's server and its traffic share the process, so it runs on both cores.
# Usage: bench/demo.sh   (env: RUNS=3)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh

RUNS=${RUNS:-3}
OUT=bench/out/demo

rm -rf "$OUT" && mkdir -p "$OUT"
for run in $(seq 1 "$RUNS"); do
  start=$(date +%s%N)
  "$BIN" demo --dir "$OUT/run-$run" > "$OUT/run-$run.log" 2> "$OUT/run-$run.err" \
    || { tail -3 "$OUT/run-$run.err"; exit 1; }
  end=$(date +%s%N)
  decisions=$(sed -n 's/^done in .*: \([0-9]*\) decisions.*/\1/p' "$OUT/run-$run.log")
  ms=$(( (end - start) / 1000000 ))
  printf '{"run": %d, "wall_secs": %d.%03d, "decisions": %s}\n' "$run" $((ms / 1000)) $((ms % 1000)) \
    "$decisions" | tee -a "$OUT/results.jsonl"
done
python3 - "$OUT/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
secs = [r["wall_secs"] for r in rows]
print(f"demo: {len(rows)} runs, wall time median {statistics.median(secs):.1f} s "
      f"(min {min(secs):.1f}, max {max(secs):.1f}), "
      f"{statistics.median(r['decisions'] for r in rows):.0f} decisions per run")
PY
