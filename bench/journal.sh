#!/usr/bin/env bash
# The journal-backed decision log (issue 16) in one run: Score and ModelInfer with durable
# (sync) logging against the same binary with logging off, and, if BASE_BIN is given, against
# a build of the previous log (SQLite acknowledged) in the same run; then one long run for the
# p99.9 / p99 ratio, with the CPU the writer and indexer threads spent per decision.
# Servers on core 0, load on core 1.
# Usage: [BASE_BIN=/path/to/old/riskserve] bench/journal.sh
# env: DURATION=10 WARMUP=2 ROUNDS=3 LONG=60
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
source bench/common.sh
LONG=${LONG:-60}
OUT=bench/out/journal
rm -rf "$OUT" && mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"

start 50081 "$OUT/sync"
SYNC_PID=${PIDS[-1]}
start 50082 "$OUT/off" --unrecorded-benchmark-only
if [ -n "${BASE_BIN:-}" ]; then
  NEW_BIN=$BIN; BIN=$BASE_BIN
  start 50083 "$OUT/base"
  BIN=$NEW_BIN
fi

# utime + stime, in clock ticks, of the sync server's thread named $1 (comm, 15 characters).
ticks() {
  for t in /proc/$SYNC_PID/task/*; do
    if [ "$(cat "$t/comm")" = "$1" ]; then awk '{print $14 + $15}' "$t/stat"; return; fi
  done
  echo 0
}

for round in $(seq "$ROUNDS"); do
  for c in 1 32; do
    load "off-c$c" 50082 "$c"
    load "sync-c$c" 50081 "$c"
    [ -n "${BASE_BIN:-}" ] && load "base-sync-c$c" 50083 "$c"
  done
  load "off-v2-c32" 50082 32 --protocol v2
  load "sync-v2-c32" 50081 32 --protocol v2
  [ -n "${BASE_BIN:-}" ] && load "base-sync-v2-c32" 50083 32 --protocol v2
done

before=$("$BIN" trace verify --json --server 127.0.0.1:50081 | python3 -c 'import json,sys; print(json.load(sys.stdin)["records"])')
w0=$(ticks decision-log-wr); i0=$(ticks decision-log-in)
DURATION=$LONG load "sync-c32-long" 50081 32
sleep 2 # the indexer catches up
w1=$(ticks decision-log-wr); i1=$(ticks decision-log-in)
after=$("$BIN" trace verify --json --server 127.0.0.1:50081 | python3 -c 'import json,sys; print(json.load(sys.stdin)["records"])')
python3 - "$w0" "$w1" "$i0" "$i1" "$((after - before))" "$(getconf CLK_TCK)" <<'PY' | tee -a "$RESULTS"
import json, sys
w0, w1, i0, i1, n, hz = map(int, sys.argv[1:])
us = lambda a, b: round((b - a) / hz * 1e6 / n, 2)
print(json.dumps({"label": "log-cpu", "decisions": n,
                  "writer_us_per_decision": us(w0, w1), "indexer_us_per_decision": us(i0, i1)}))
PY
python3 bench/summarize.py "$RESULTS"
