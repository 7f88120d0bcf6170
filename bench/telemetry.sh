#!/usr/bin/env bash
# Telemetry and protocol costs, for BENCHMARKS.md, in one run:
# - Score throughput with traces and metrics exported over OTLP to a local receiver
#   (examples/otlp_sink.rs) against telemetry off, with the decision log as shipped and
#   without it (--unrecorded-benchmark-only, where the spans' share of the work is largest),
#   and there also with 10% of traces sampled (OTEL_TRACES_SAMPLER=traceidratio);
# - the inference protocol's ModelInfer (bench --protocol v2) against Score, telemetry off.
# Each round starts fresh servers; the paired ratios are taken per round and their median
# reported. Server on core 0; load generator and receiver on core 1.
# Usage: bench/telemetry.sh   (env: DURATION=5 WARMUP=1 ROUNDS=3 CONCURRENCY=8)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
cargo build --release --quiet --example otlp_sink

C=${CONCURRENCY:-8}
OUT=bench/out/telemetry
SINK_PORT=54317
rm -rf "$OUT" && mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"

taskset -c 1 target/release/examples/otlp_sink 127.0.0.1:$SINK_PORT > "$OUT/sink.json" &
SINK=$!
stop_last() { kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; }
with_otel() { # start's arguments, with telemetry exported to the sink
  export OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$SINK_PORT OTEL_SERVICE_NAME=riskserve-bench
  start "$@"
  unset OTEL_EXPORTER_OTLP_ENDPOINT OTEL_SERVICE_NAME
}

for round in $(seq "$ROUNDS"); do
  start 50101 "$OUT/off-$round"
  load score-off 50101 "$C"
  load v2-off 50101 "$C" --protocol v2
  stop_last
  with_otel 50102 "$OUT/on-$round"
  load score-otel 50102 "$C"
  stop_last
  start 50103 "$OUT/unrec-off-$round" --unrecorded-benchmark-only
  load unrecorded-off 50103 "$C"
  stop_last
  with_otel 50104 "$OUT/unrec-on-$round" --unrecorded-benchmark-only
  load unrecorded-otel 50104 "$C"
  stop_last
  export OTEL_TRACES_SAMPLER=traceidratio OTEL_TRACES_SAMPLER_ARG=0.1
  with_otel 50105 "$OUT/unrec-sampled-$round" --unrecorded-benchmark-only
  unset OTEL_TRACES_SAMPLER OTEL_TRACES_SAMPLER_ARG
  load unrecorded-otel-10pct 50105 "$C"
  stop_last
done
kill -TERM "$SINK"; wait "$SINK" || true
cat "$OUT/sink.json"

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
by = {}
for r in rows:
    by.setdefault(r["label"], []).append(r)
med = lambda label, key: statistics.median(r[key] for r in by[label])
print("| label | runs | median req/s | p50 µs | p99 µs | errors |")
print("| --- | --- | --- | --- | --- | --- |")
for label in ("score-off", "score-otel", "v2-off", "unrecorded-off", "unrecorded-otel",
              "unrecorded-otel-10pct"):
    print(f"| {label} | {len(by[label])} | {med(label, 'throughput_rps'):,.0f} | {med(label, 'p50_us'):,.0f} "
          f"| {med(label, 'p99_us'):,.0f} | {sum(r['errors'] for r in by[label])} |")
def ratio(a, b):
    per_round = [x["throughput_rps"] / y["throughput_rps"] for x, y in zip(by[a], by[b])]
    return statistics.median(per_round), per_round
for a, b, what in (("score-otel", "score-off", "telemetry exporting / off (decision log on)"),
                   ("unrecorded-otel", "unrecorded-off", "telemetry exporting / off (no decision log)"),
                   ("unrecorded-otel-10pct", "unrecorded-off",
                    "telemetry exporting, 10% of traces sampled / off (no decision log)"),
                   ("v2-off", "score-off", "ModelInfer / Score")):
    m, rounds = ratio(a, b)
    print(f"{what}: median {m:.2f} (rounds: {', '.join(f'{x:.2f}' for x in rounds)})")
PY
