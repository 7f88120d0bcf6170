#!/usr/bin/env bash
# The journal-backed decision log (issue 16) in one run: Score and ModelInfer with durable
# (sync) logging against the same binary with logging off, and, if BASE_BIN is given, against
# a build of an earlier log in the same run; ModelInfer one row per call (c=32) and 64 rows per
# call (c=8); then long runs per binary (Score c=32, and ModelInfer 64 rows c=8) for the
# steady-state ratios and p99.9 / p99, with the CPU the writer and indexer threads spent per
# decision; last, bytes per decision of a filled log. Each round first measures one
# fdatasync of this disk (fsync_probe), which the c=1 p50 is held against.
# Servers on core 0, load on core 1.
# Usage: [BASE_BIN=/path/to/old/riskserve] bench/journal.sh
# env: DURATION=10 WARMUP=2 ROUNDS=3 LONG=60 LONG_ROUNDS=1 FILL=200000
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
source bench/common.sh
LONG=${LONG:-60}
LONG_ROUNDS=${LONG_ROUNDS:-1}
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

# How far the view of the log in $1 trailed its journal when a run ended, and how long the
# indexer took to catch up: the view's checkpoint, read-only beside the running server, every
# 20 ms until it has not moved for 2 s (the indexer lingers at most 200 ms for a batch).
# Prints "first_seq last_seq seconds_until_last_move".
catch_up() {
  python3 - "$1/decisions.db" <<'PY'
import sqlite3, sys, time
c = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
seq = lambda: c.execute("SELECT seq FROM journal_checkpoint").fetchone()[0]
start = time.monotonic()
first = last = seq()
moved = start
while time.monotonic() - moved < 2:
    time.sleep(0.02)
    now = seq()
    if now != last:
        last, moved = now, time.monotonic()
print(first, last, round(moved - start, 2))
PY
}

# The long run against server $2 (pid $3, data in $4) labelled $1, at concurrency $5 with the
# load's further arguments: latency tails; the CPU its writer and indexer threads spent per
# decision recorded meanwhile (read once `trace verify` says the view has caught up); how
# far the view trailed the journal when the load stopped, and how long it took to catch up
# on its own (before `trace verify`, which would hurry it).
long_run() {
  local label=$1 port=$2 pid=$3 dir=$4 c=$5
  shift 5
  local before after w0 w1 i0 i1 lag
  before=$("$BIN" trace verify --json --server 127.0.0.1:$port | python3 -c 'import json,sys; print(json.load(sys.stdin)["records"])')
  w0=$(ticks "$pid" decision-log-wr); i0=$(ticks "$pid" decision-log-in)
  DURATION=$LONG load "$label" "$port" "$c" "$@"
  lag=$(catch_up "$dir")
  after=$("$BIN" trace verify --json --server 127.0.0.1:$port | python3 -c 'import json,sys; print(json.load(sys.stdin)["records"])')
  w1=$(ticks "$pid" decision-log-wr); i1=$(ticks "$pid" decision-log-in)
  # shellcheck disable=SC2086
  python3 - "$label" "$w0" "$w1" "$i0" "$i1" "$((after - before))" "$(getconf CLK_TCK)" "$after" $lag <<'PY' | tee -a "$RESULTS"
import json, sys
label = sys.argv[1]
w0, w1, i0, i1, n, hz, head, first, last = map(int, sys.argv[2:11])
us = lambda a, b: round((b - a) / hz * 1e6 / n, 2) if n else None  # none recorded: no figure
print(json.dumps({"label": f"{label}-cpu", "decisions": n,
                  "writer_us_per_decision": us(w0, w1), "indexer_us_per_decision": us(i0, i1),
                  # No retention here: the count verified is the journal's last seq.
                  "view_lag_at_end": head - first, "caught_up_by_itself": last == head,
                  "catch_up_s": float(sys.argv[11])}))
PY
}

# A logged server's indexer works off what a run left in its tail afterwards, on the same
# core: `trace verify` waits for it, so that no run pays for the one before. The short runs
# therefore leave out most of the indexing; the long runs (60 s, far past what the tail
# absorbs) show the steady state.
quiet() { "$BIN" trace verify --json --server 127.0.0.1:$1 > /dev/null; }
# One fdatasync of this disk, measured where the journal is, in the same run: what the c=1
# target ("p50 about one fdatasync") is held against. A 600-byte pwrite (one record and its
# frame) into a preallocated file, then fdatasync, 2,000 times; the p50 in µs. On the
# servers' core: here the disk's interrupt is on core 1, and a sync waited for on core 0
# takes ~50 µs longer (160-200 against ~115 µs), as the writer's does.
fsync_probe() {
  taskset -c 0 python3 - "$OUT/fsync-probe" <<'PY' | tee -a "$RESULTS"
import json, os, statistics, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
os.posix_fallocate(fd, 0, 64 << 20)
os.fsync(fd)
lat, block = [], os.urandom(600)
for i in range(2000):
    t = time.perf_counter()
    os.pwrite(fd, block, i * 600)
    os.fdatasync(fd)
    lat.append((time.perf_counter() - t) * 1e6)
os.close(fd)
os.unlink(sys.argv[1])
print(json.dumps({"label": "fdatasync-600B", "p50_us": round(statistics.median(lat))}))
PY
}
for round in $(seq "$ROUNDS"); do
  fsync_probe
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

# LONG_ROUNDS rounds of long runs; with BASE_BIN, the two logged servers swap places every
# round, so that neither always runs on the machine the other has just warmed or drained.
for round in $(seq "$LONG_ROUNDS"); do
  for load_args in "32" "8 --protocol v2 --batch 64"; do
    # shellcheck disable=SC2086
    set -- $load_args
    tag=$([ "$1" = 32 ] && echo c32 || echo v2b64-c8)
    DURATION=$LONG load "off-$tag-long" 50082 "$@"
    if [ -n "${BASE_BIN:-}" ] && [ $((round % 2)) -eq 0 ]; then
      long_run "base-sync-$tag-long" 50083 "$BASE_PID" "$OUT/base" "$@"
      long_run "sync-$tag-long" 50081 "$SYNC_PID" "$OUT/sync" "$@"
    else
      long_run "sync-$tag-long" 50081 "$SYNC_PID" "$OUT/sync" "$@"
      if [ -n "${BASE_BIN:-}" ]; then long_run "base-sync-$tag-long" 50083 "$BASE_PID" "$OUT/base" "$@"; fi
    fi
  done
done
# Bytes per decision: a log filled through the recorder, its view caught up.
FILL=${FILL:-200000}
"$BIN" bench-fill-log --data "$OUT/fill" --decisions "$FILL" --customers 20000 | tee -a "$RESULTS"
if [ -n "${BASE_BIN:-}" ]; then
  "$BASE_BIN" bench-fill-log --data "$OUT/base-fill" --decisions "$FILL" --customers 20000 \
    | sed 's/"label":"fill"/"label":"base-fill"/' | tee -a "$RESULTS"
fi
python3 bench/summarize.py "$RESULTS"
