#!/usr/bin/env bash
# The journal-backed decision log (issue 16) in one run: Score and ModelInfer with durable
# (sync) logging against the same binary with logging off, and, if BASE_BIN is given, against
# a build of an earlier log in the same run; ModelInfer one row per call (c=32) and 64 rows per
# call (c=8); then long runs per binary (Score c=32, and ModelInfer 64 rows c=8) for the
# steady-state ratios and p99.9 / p99, with the CPU the writer and indexer threads spent per
# decision; last, bytes per decision of a filled log.
# Servers on core 0, load on core 1.
# Usage: [BASE_BIN=/path/to/old/riskserve] bench/journal.sh
# env: DURATION=10 WARMUP=2 ROUNDS=3 LONG=60 FILL=200000
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
  BASE_PID=${PIDS[-1]}
  BIN=$NEW_BIN
fi

# utime + stime, in clock ticks, of process $1's thread named $2 (comm, 15 characters).
ticks() {
  for t in /proc/$1/task/*; do
    if [ "$(cat "$t/comm")" = "$2" ]; then awk '{print $14 + $15}' "$t/stat"; return; fi
  done
  echo 0
}

# The long run against server $2 (pid $3) labelled $1, at concurrency $4 with the load's
# further arguments: latency tails, and the CPU its writer and indexer threads spent per
# decision recorded meanwhile (read once `trace verify` says the view has caught up).
long_run() {
  local label=$1 port=$2 pid=$3 c=$4
  shift 4
  local before after w0 w1 i0 i1
  before=$("$BIN" trace verify --json --server 127.0.0.1:$port | python3 -c 'import json,sys; print(json.load(sys.stdin)["records"])')
  w0=$(ticks "$pid" decision-log-wr); i0=$(ticks "$pid" decision-log-in)
  DURATION=$LONG load "$label" "$port" "$c" "$@"
  after=$("$BIN" trace verify --json --server 127.0.0.1:$port | python3 -c 'import json,sys; print(json.load(sys.stdin)["records"])')
  w1=$(ticks "$pid" decision-log-wr); i1=$(ticks "$pid" decision-log-in)
  python3 - "$label" "$w0" "$w1" "$i0" "$i1" "$((after - before))" "$(getconf CLK_TCK)" <<'PY' | tee -a "$RESULTS"
import json, sys
label = sys.argv[1]
w0, w1, i0, i1, n, hz = map(int, sys.argv[2:])
us = lambda a, b: round((b - a) / hz * 1e6 / n, 2)
print(json.dumps({"label": f"{label}-cpu", "decisions": n,
                  "writer_us_per_decision": us(w0, w1), "indexer_us_per_decision": us(i0, i1)}))
PY
}

# A logged server's indexer works off what a run left in its tail afterwards, on the same
# core: `trace verify` waits for it, so that no run pays for the one before. The short runs
# therefore leave out most of the indexing; the long runs (60 s, far past what the tail
# absorbs) show the steady state.
quiet() { "$BIN" trace verify --json --server 127.0.0.1:$1 > /dev/null; }
for round in $(seq "$ROUNDS"); do
  for c in 1 32; do
    load "off-c$c" 50082 "$c"
    load "sync-c$c" 50081 "$c"; quiet 50081
    if [ -n "${BASE_BIN:-}" ]; then load "base-sync-c$c" 50083 "$c"; quiet 50083; fi
  done
  load "off-v2-c32" 50082 32 --protocol v2
  load "sync-v2-c32" 50081 32 --protocol v2; quiet 50081
  if [ -n "${BASE_BIN:-}" ]; then load "base-sync-v2-c32" 50083 32 --protocol v2; quiet 50083; fi
  load "off-v2b64-c8" 50082 8 --protocol v2 --batch 64
  load "sync-v2b64-c8" 50081 8 --protocol v2 --batch 64; quiet 50081
  if [ -n "${BASE_BIN:-}" ]; then load "base-sync-v2b64-c8" 50083 8 --protocol v2 --batch 64; quiet 50083; fi
done

DURATION=$LONG load off-c32-long 50082 32
long_run sync-c32-long 50081 "$SYNC_PID" 32
if [ -n "${BASE_BIN:-}" ]; then long_run base-sync-c32-long 50083 "$BASE_PID" 32; fi
DURATION=$LONG load off-v2b64-c8-long 50082 8 --protocol v2 --batch 64
long_run sync-v2b64-c8-long 50081 "$SYNC_PID" 8 --protocol v2 --batch 64
if [ -n "${BASE_BIN:-}" ]; then
  long_run base-sync-v2b64-c8-long 50083 "$BASE_PID" 8 --protocol v2 --batch 64
fi
# Bytes per decision: a log filled through the recorder, its view caught up.
FILL=${FILL:-200000}
"$BIN" bench-fill-log --data "$OUT/fill" --decisions "$FILL" --customers 20000 | tee -a "$RESULTS"
if [ -n "${BASE_BIN:-}" ]; then
  "$BASE_BIN" bench-fill-log --data "$OUT/base-fill" --decisions "$FILL" --customers 20000 \
    | sed 's/"label":"fill"/"label":"base-fill"/' | tee -a "$RESULTS"
fi
python3 bench/summarize.py "$RESULTS"
