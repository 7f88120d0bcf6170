#!/usr/bin/env bash
# Two builds of riskserve against each other, in one run: Score (and ModelInfer, one row a
# call) with durable sync logging at c=8 and c=32, the two servers alternated ROUNDS times.
# Server on core 0, load generator on core 1. For a change on the request path or the log:
#   bench/compare.sh BASELINE_BIN VARIANT_BIN     (env: DURATION=5 WARMUP=1 ROUNDS=3)
# Build the baseline from another checkout (`cargo build --release`) and pass its binary.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh

BASE=${1:?baseline binary}
VARIANT=${2:?variant binary}
OUT=bench/out/compare
rm -rf "$OUT" && mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"

serve() { # binary port data-dir
  taskset -c 0 "$1" serve --listen 127.0.0.1:$2 --data "$3" > /dev/null 2>> "$OUT/server.log" &
  PIDS+=($!)
  for _ in $(seq 100); do
    "$BIN" models list --server 127.0.0.1:$2 > /dev/null 2>&1 && return
    sleep 0.1
  done
  echo "server on $2 did not start" >&2; exit 1
}
stop() { kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'; }

for round in $(seq "$ROUNDS"); do
  for side in baseline variant; do
    bin=$BASE; [ "$side" = variant ] && bin=$VARIANT
    serve "$bin" 50091 "$OUT/$side-$round"
    for c in 8 32; do
      load "$side-score-c$c" 50091 "$c"
      load "$side-infer-c$c" 50091 "$c" --protocol v2
    done
    stop
  done
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
from collections import defaultdict
rows = defaultdict(list)
for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line); rows[r["label"]].append(r)
med = lambda l, k: statistics.median(r[k] for r in rows[l])
print("| load | baseline req/s | variant req/s | ratio | baseline p99 µs | variant p99 µs |")
print("| --- | --- | --- | --- | --- | --- |")
for load in ("score-c8", "score-c32", "infer-c8", "infer-c32"):
    b, v = f"baseline-{load}", f"variant-{load}"
    print(f"| {load} | {med(b,'throughput_rps'):,.0f} | {med(v,'throughput_rps'):,.0f} "
          f"| {med(v,'throughput_rps')/med(b,'throughput_rps'):.2f} "
          f"| {med(b,'p99_us'):.0f} | {med(v,'p99_us'):.0f} |")
PY
