#!/usr/bin/env bash
# Backtest benchmarks for BENCHMARKS.md: re-scoring throughput over the last 1 million
# recorded decisions of a filled log (server and backtest thread pinned to core 0; the
# figure includes reading and parsing the records), and the served p99
# while a backtest runs against none, alternating in one run (load generator on core 1).
# Needs a filled log: FILL_DIR (default: the one bench/decision_log.sh makes).
# Usage: bench/backtest.sh   (env: FILL_DIR=... DURATION=5 WARMUP=1 ROUNDS=3)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh

FILL_DIR=${FILL_DIR:-bench/out/decision-log/fill}
OUT=bench/out/backtest
PORT=50101

[ -f "$FILL_DIR/decisions.db" ] || { echo "no filled log in $FILL_DIR (run bench/decision_log.sh)" >&2; exit 1; }
rm -rf "$OUT" && mkdir -p "$OUT"
cp -r models "$OUT/models"
train_version "$OUT/models" v2 11
printf '[serving]\ncredit-limit = "v1"\n' > "$OUT/config.toml"
RESULTS="$OUT/results.jsonl"

taskset -c 0 "$BIN" serve --listen 127.0.0.1:$PORT --models "$OUT/models" --data "$FILL_DIR" \
  --config "$OUT/config.toml" > /dev/null 2>> "$OUT/server.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  "$BIN" models list --server 127.0.0.1:$PORT > /dev/null 2>&1 && break
  sleep 0.1
done

# The window holding the last 1,000,000 decisions, found through the time index.
SINCE=$(python3 - "$FILL_DIR/decisions.db" <<'PY'
import sqlite3, sys
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
print(db.execute("SELECT recorded_at FROM decisions WHERE seq = "
                 "(SELECT max(seq) FROM decisions) - 999999").fetchone()[0])
PY
)
backtest() { # label
  local start end
  start=$(date +%s.%N)
  "$BIN" backtest credit-limit --candidate v2 --all-decisions --since "$SINCE" --json \
    --server 127.0.0.1:$PORT > "$OUT/$1.json" || true
  end=$(date +%s.%N)
  python3 - "$1" "$start" "$end" "$OUT/$1.json" <<'PY' | tee -a "$RESULTS"
import json, sys
label, start, end, path = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
report = json.load(open(path))
seconds = end - start
print(json.dumps({"label": label, "rescored": report["compared"], "duration_s": seconds,
                  "decisions_per_s": report["compared"] / seconds}))
PY
}
load() { # label
  taskset -c 1 "$BIN" bench --server 127.0.0.1:$PORT --concurrency 8 \
    --duration "$DURATION" --warmup "$WARMUP" --label "$1" | tee -a "$RESULTS"
}

backtest "backtest-alone"
for round in $(seq "$ROUNDS"); do
  load "served-no-backtest"
  backtest "backtest-under-load" &
  BT=$!
  sleep 1
  load "served-during-backtest"
  wait $BT
done

python3 bench/summarize.py "$RESULTS"
