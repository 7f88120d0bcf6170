#!/usr/bin/env bash
# CPU the decision log's threads spend per decision: the writer (acknowledgement path) and the
# indexer (query view), from /proc/<pid>/task/<tid>/stat (utime + stime) around one load run
# of Score at c=32, sync durability. Server on core 0, load on core 1.
# Usage: bench/log_cpu.sh   env: DURATION=10 WARMUP=2
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
source bench/common.sh
OUT=bench/out/log-cpu
rm -rf "$OUT" && mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
start 50091 "$OUT/data"
pid=${PIDS[-1]}
ticks() { # thread-name → utime+stime in clock ticks
  for t in /proc/$pid/task/*; do
    if [ "$(cat "$t/comm")" = "$1" ]; then
      awk '{print $14 + $15}' "$t/stat"
      return
    fi
  done
  echo 0
}
w0=$(ticks decision-log-wr); i0=$(ticks decision-log-in)
load "cpu-c32" 50091 32
sleep 1 # the indexer catches up
w1=$(ticks decision-log-wr); i1=$(ticks decision-log-in)
records=$("$BIN" trace verify --json --server 127.0.0.1:50091 | python3 -c 'import json,sys; print(json.load(sys.stdin)["records"])')
hz=$(getconf CLK_TCK)
python3 - "$w0" "$w1" "$i0" "$i1" "$records" "$hz" <<'PY' | tee -a "$RESULTS"
import json, sys
w0, w1, i0, i1, n, hz = map(int, sys.argv[1:])
us = lambda a, b: (b - a) / hz * 1e6 / n
print(json.dumps({"label": "log-cpu", "decisions": n,
                  "writer_us_per_decision": round(us(w0, w1), 2),
                  "indexer_us_per_decision": round(us(i0, i1), 2)}))
PY
