#!/usr/bin/env bash
# Overload behaviour, for BENCHMARKS.md: a server limited to 8 requests in flight, loaded at
# the limit (c=8) and at 4x the limit (c=32), alternating in one run. Reports how fast the
# excess is refused (RESOURCE_EXHAUSTED), the accepted requests' p99 against the unloaded
# p99 (clients retrying at once, backing off 10 ms, and waiting the grpc-retry-pushback-ms the
# server asks for), and the server's peak RSS. Server on core 0, load on core 1.
# Usage: bench/overload.sh   (env: DURATION=5 WARMUP=1 ROUNDS=3 LIMIT=8)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh

LIMIT=${LIMIT:-8}
OUT=bench/out/overload

rm -rf "$OUT" && mkdir -p "$OUT"
cp -r models "$OUT/models"
printf 'max_concurrent_requests = %d\n[serving]\ncredit-limit = "v1"\n' "$LIMIT" > "$OUT/config.toml"
RESULTS="$OUT/results.jsonl"

start 50095 "$OUT/data" --models "$OUT/models" --config "$OUT/config.toml"
SERVER=${PIDS[-1]}
for round in $(seq "$ROUNDS"); do
  load "at-limit-c$LIMIT" 50095 "$LIMIT"
  load "overload-c$((LIMIT * 4))" 50095 "$((LIMIT * 4))"
  load "overload-backoff-c$((LIMIT * 4))" 50095 "$((LIMIT * 4))" --backoff-ms 10
  load "overload-pushback-c$((LIMIT * 4))" 50095 "$((LIMIT * 4))" --honour-pushback
  printf '{"label": "rss-after-round-%d", "rss_kib": %d}\n' "$round" \
    "$(awk '/VmHWM/ {print $2}' /proc/$SERVER/status)" | tee -a "$RESULTS"
done
"$BIN" trace verify --server 127.0.0.1:50095 | tee "$OUT/verify.txt"

python3 - "$RESULTS" "$LIMIT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
limit = int(sys.argv[2])
def med(label, key):
    return statistics.median(r[key] for r in rows if r["label"] == label)
calm, busy, polite = f"at-limit-c{limit}", f"overload-c{limit * 4}", f"overload-backoff-c{limit * 4}"
obedient = f"overload-pushback-c{limit * 4}"
print("| label | runs | accepted req/s | p50 µs | p99 µs | shed req/s | shed p50 µs | shed p99 µs |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for label in (calm, busy, polite, obedient):
    rs = [r for r in rows if r["label"] == label]
    print(f"| {label} | {len(rs)} | {med(label, 'throughput_rps'):,.0f} | {med(label, 'p50_us'):,.0f} "
          f"| {med(label, 'p99_us'):,.0f} | {med(label, 'shed') / med(label, 'duration_s'):,.0f} "
          f"| {med(label, 'shed_p50_us'):,.0f} | {med(label, 'shed_p99_us'):,.0f} |")
def ratio(label):  # per round, against the same round's at-limit p99; median over rounds
    pairs = zip((r for r in rows if r["label"] == calm), (r for r in rows if r["label"] == label))
    return statistics.median(b["p99_us"] / a["p99_us"] for a, b in pairs)
print(f"\naccepted p99 at 4x / at the limit, median of rounds: {ratio(busy):.2f} (clients retrying "
      f"at once), {ratio(polite):.2f} (backing off 10 ms), {ratio(obedient):.2f} (waiting as the server asks)")
rss = [r["rss_kib"] for r in rows if r["label"].startswith("rss-")]
print(f"server peak RSS after each round: {', '.join(f'{k / 1024:.1f} MiB' for k in rss)}")
PY
