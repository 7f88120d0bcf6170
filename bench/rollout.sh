#!/usr/bin/env bash
# Shadow scoring's cost on the served path, for BENCHMARKS.md: Score throughput and p99 with a
# rollout held in its shadow step (every request also scored by the candidate, recorded, never
# returned) against no rollout, alternating in one run. Server on core 0, load on core 1.
# Usage: bench/rollout.sh   (env: DURATION=5 WARMUP=1 ROUNDS=3)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh

DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
ROUNDS=${ROUNDS:-3}
OUT=bench/out/rollout
BIN=target/release/riskserve

cargo build --release --quiet
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

PIDS=()
trap 'kill ${PIDS[@]} 2>/dev/null || true' EXIT
start() { # port data-dir
  taskset -c 0 "$BIN" serve --listen 127.0.0.1:$1 --models "$OUT/models" --data "$2" \
    --config "$OUT/config.toml" > /dev/null 2>> "$OUT/server.log" &
  PIDS+=($!)
  for _ in $(seq 100); do
    "$BIN" models list --server 127.0.0.1:$1 > /dev/null 2>&1 && return
    sleep 0.1
  done
  exit 1
}
load() { # label port concurrency
  taskset -c 1 "$BIN" bench --server 127.0.0.1:$2 --concurrency "$3" \
    --duration "$DURATION" --warmup "$WARMUP" --label "$1" | tee -a "$RESULTS"
}

start 50091 "$OUT/plain"
start 50092 "$OUT/shadow"
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
