#!/usr/bin/env bash
# Decision-log benchmarks for BENCHMARKS.md: Score with durable (sync) logging against no
# logging at all, in one run, and CustomerHistory lookups on a log of many decisions, alone
# and while batch scoring loads the server.
# Server on core 0, load generator on core 1. Usage: bench/decision_log.sh
# env: DURATION=5 WARMUP=1 ROUNDS=3 FILL_DIR=<dir with a filled log> FILL=10000000 CUSTOMERS=1000000
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh

FILL=${FILL:-10000000}
CUSTOMERS=${CUSTOMERS:-1000000}
OUT=bench/out/decision-log
FILL_DIR=${FILL_DIR:-$OUT/fill}

rm -rf "$OUT/sync" "$OUT/async" "$OUT/off" && mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"

start 50081 "$OUT/sync"
start 50082 "$OUT/off" --unrecorded-benchmark-only
start 50083 "$OUT/async" --durability async

for round in $(seq "$ROUNDS"); do
  for c in 8 32; do
    load "off-c$c" 50082 "$c"
    load "sync-c$c" 50081 "$c"
    load "async-c$c" 50083 "$c"
  done
done

if [ ! -f "$FILL_DIR/decisions.db" ]; then
  "$BIN" bench-fill-log --data "$FILL_DIR" --decisions "$FILL" --customers "$CUSTOMERS" | tee -a "$RESULTS"
fi
start 50084 "$FILL_DIR"
for round in $(seq "$ROUNDS"); do
  load "history-c1" 50084 1 --history-customers "$CUSTOMERS"
  load "history-c8" 50084 8 --history-customers "$CUSTOMERS"
done
# History lookups while ModelInfer 64 rows c=8 keeps the server's core busy (both clients on
# core 1): the tail then holds thousands of records the view lacks, which lookups must see.
for round in $(seq "$ROUNDS"); do
  DURATION=$((DURATION + 2)) load "busy-v2b64-c8" 50084 8 --protocol v2 --batch 64 > /dev/null &
  sleep 1
  load "history-busy-c1" 50084 1 --history-customers "$CUSTOMERS"
  wait
done
records=$(ls -l "$FILL_DIR"/decisions.db* | awk '{s += $5} END {print s}')
echo "{\"label\":\"fill-size\",\"bytes_on_disk\":$records}" | tee -a "$RESULTS"

python3 bench/summarize.py "$RESULTS"
