#!/usr/bin/env bash
# Shadow scoring's cost on the served path, for BENCHMARKS.md: Score throughput and p99 with a
# rollout held in its shadow step (every request also scored by the candidate, recorded, never
# returned) against no rollout, alternating in one run. Server on core 0, load on core 1.
# Usage: bench/rollout.sh   (env: DURATION=5 WARMUP=1 ROUNDS=3)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh

OUT=bench/out/rollout

rm -rf "$OUT" && mkdir -p "$OUT"
cp -r models "$OUT/models"
train_version "$OUT/models" v2 11
printf '[serving]\ncredit-limit = "v1"\n' > "$OUT/config.toml"
cat > "$OUT/shadow-plan.toml" <<'PLAN'
auto_advance = false
[[steps]]
share_bp = 0
shadow = true
[[steps]]
share_bp = 10000
PLAN
RESULTS="$OUT/results.jsonl"

MODELS_AND_CONFIG=(--models "$OUT/models" --config "$OUT/config.toml")
start 50091 "$OUT/plain" "${MODELS_AND_CONFIG[@]}"
start 50092 "$OUT/shadow" "${MODELS_AND_CONFIG[@]}"
"$BIN" rollout start credit-limit --candidate v2 --plan "$OUT/shadow-plan.toml" \
  --server 127.0.0.1:50092 > /dev/null

for round in $(seq "$ROUNDS"); do
  for c in 8 32; do
    load "noshadow-c$c" 50091 "$c"
    load "shadow-c$c" 50092 "$c"
  done
done
"$BIN" rollout status credit-limit --server 127.0.0.1:50092 | tee "$OUT/status.txt"

python3 bench/summarize.py "$RESULTS"
