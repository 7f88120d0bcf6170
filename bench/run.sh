#!/usr/bin/env bash
# Benchmarks for BENCHMARKS.md. The server runs on core 0, the load generator on core 1.
# Each comparison alternates baseline and variant, ROUNDS times, in this one run; the summary
# reports medians and ratios. Usage: bench/run.sh   (env: DURATION=5 WARMUP=1 ROUNDS=3)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh

OUT=bench/out/scoring
PORT=50071
EMPTY_PORT=50072

rm -rf "$OUT" && mkdir -p "$OUT"
cp -r models "$OUT/models"
train_version "$OUT/models" v2 11
train_version "$OUT/models" v3 13
printf '[serving]\ncredit-limit = "v1"\n' > "$OUT/config.toml"

taskset -c 0 "$BIN" serve --listen 127.0.0.1:$PORT --models "$OUT/models" --data "$OUT/data" \
  --config "$OUT/config.toml" 2> "$OUT/server.log" &
SERVER=$!
taskset -c 0 "$BIN" bench-empty-server --listen 127.0.0.1:$EMPTY_PORT &
EMPTY=$!
trap 'kill $SERVER $EMPTY 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  "$BIN" models list --server 127.0.0.1:$PORT > /dev/null 2>&1 && break
  sleep 0.2
done

RESULTS="$OUT/results.jsonl"
load() { # label server concurrency [extra args...]
  local label=$1 server=$2 c=$3; shift 3
  taskset -c 1 "$BIN" bench --server "127.0.0.1:$server" --concurrency "$c" \
    --duration "$DURATION" --warmup "$WARMUP" --label "$label" "$@" | tee -a "$RESULTS"
}
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$SERVER/status"; }
admin() { "$BIN" models "$@" --server 127.0.0.1:$PORT > /dev/null; }

# 1. Score against the empty handler (the ceiling), at 1, 8 and 32 in flight.
for round in $(seq "$ROUNDS"); do
  for c in 1 8 32; do
    load "empty-c$c" $EMPTY_PORT "$c"
    load "score-c$c" $PORT "$c"
  done
done

# 2. Latency during a swap storm (v1 <-> v2 every 10 ms) against steady state.
admin load credit-limit v2
for round in $(seq "$ROUNDS"); do
  load "steady-c8" $PORT 8
  load "swaps-c8" $PORT 8 --swap v1,v2 --swap-every-ms 10
done
admin serve credit-limit v1

# 3. Memory: three versions loaded; then load/unload churn, 10 cycles against 1,000.
admin load credit-limit v3
echo "{\"label\":\"rss-3-versions\",\"rss_kib\":$(rss_kib)}" | tee -a "$RESULTS"
admin unload credit-limit v3
taskset -c 1 "$BIN" bench --server 127.0.0.1:$PORT --churn-cycles 10 --churn-version v3 --label churn-10 | tee -a "$RESULTS"
echo "{\"label\":\"rss-after-10-cycles\",\"rss_kib\":$(rss_kib)}" | tee -a "$RESULTS"
taskset -c 1 "$BIN" bench --server 127.0.0.1:$PORT --churn-cycles 990 --churn-version v3 --label churn-990 | tee -a "$RESULTS"
echo "{\"label\":\"rss-after-1000-cycles\",\"rss_kib\":$(rss_kib)}" | tee -a "$RESULTS"

python3 bench/summarize.py "$RESULTS"
