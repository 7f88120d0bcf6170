#!/usr/bin/env bash
# Several replicas on one PostgreSQL (issue 19), in one run: Score c=32 on one replica whose
# decisions go to PostgreSQL against the same binary on the embedded store, alternated ROUNDS
# times; then three replicas, each loaded at c=11, against the one (same machine, so this
# shows the cost of sharing, not scale); the commit groups' sizes (one transaction per group,
# so rows per xmin); and how long a rollback through one replica takes to reach the others.
# PostgreSQL (fsync on, synchronous_commit on: the defaults) and the servers on core 0, load
# on core 1. Needs PostgreSQL 15's server binaries (PG_BIN, default Debian's path).
# Usage: bench/replicas.sh   (env: DURATION=10 WARMUP=2 ROUNDS=3 ROLLBACKS=10)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
source bench/common.sh
ROLLBACKS=${ROLLBACKS:-10}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
OUT=bench/out/replicas
rm -rf "$OUT" && mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"

# PostgreSQL refuses root: under root the cluster belongs to nobody.
AS=()
if [ "$(id -u)" = 0 ]; then
  AS=(setpriv --reuid=65534 --regid=65534 --clear-groups)
  chown 65534:65534 "$OUT"
fi
PG_PORT=55432
"${AS[@]}" "$PG_BIN/initdb" -D "$OUT/pg" -U riskserve --auth=trust -E UTF8 --no-locale -N \
  > "$OUT/initdb.log"
"${AS[@]}" taskset -c 0 "$PG_BIN/pg_ctl" -D "$OUT/pg" -w -l "$OUT/pg/server.log" \
  -o "-p $PG_PORT -k $OUT -c listen_addresses=127.0.0.1 -c max_connections=100" start > /dev/null
trap 'kill ${PIDS[@]} 2>/dev/null || true; "${AS[@]}" "$PG_BIN/pg_ctl" -D "$OUT/pg" -m fast stop > /dev/null 2>&1 || true' EXIT
"$PG_BIN/psql" -X -q -h 127.0.0.1 -p $PG_PORT -U riskserve -d postgres -c "CREATE DATABASE riskserve"
STORE="postgres://riskserve@127.0.0.1:$PG_PORT/riskserve"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$OUT/customer.key"
REPLICA=(--store "$STORE" --customer-key-files "$OUT/customer.key")
# v1 serves everywhere (pinned); v2 is the candidate of the rollbacks below.
cp -r models "$OUT/models"
train_version "$OUT/models" v2 11
printf '[serving]\ncredit-limit = "v1"\n' > "$OUT/riskserve.toml"
SERVE=(--models "$OUT/models" --config "$OUT/riskserve.toml")

start 50091 "$OUT/embedded" "${SERVE[@]}"
start 50092 "$OUT/r1" "${SERVE[@]}" "${REPLICA[@]}" --replica-id r1
for round in $(seq "$ROUNDS"); do
  load "embedded-c32" 50091 32
  load "postgres-1replica-c32" 50092 32
done

start 50093 "$OUT/r2" "${SERVE[@]}" "${REPLICA[@]}" --replica-id r2
start 50094 "$OUT/r3" "${SERVE[@]}" "${REPLICA[@]}" --replica-id r3
for round in $(seq "$ROUNDS"); do
  load "postgres-1replica-c32" 50092 32
  LOADS=()
  for port in 50092 50093 50094; do
    load "postgres-3replicas-c11-$port" "$port" 11 &
    LOADS+=($!)
  done
  wait "${LOADS[@]}"  # not the servers, which run on in the background
done

"$PG_BIN/psql" -X -q -t -A -h 127.0.0.1 -p $PG_PORT -U riskserve -d riskserve -c \
  "SELECT json_build_object('label', 'commit-groups', 'groups', COUNT(*),
     'mean', round(AVG(n), 1), 'p50', percentile_disc(0.5) WITHIN GROUP (ORDER BY n),
     'p99', percentile_disc(0.99) WITHIN GROUP (ORDER BY n), 'max', MAX(n))
   FROM (SELECT COUNT(*) AS n FROM decisions GROUP BY replica_id, xmin::text) g" \
  | tee -a "$RESULTS"

# A rollback through r1, timed until r2 and r3 report it: a client's view of propagation
# (each poll is a CLI process, about 5 ms).
cat > "$OUT/plan.toml" <<'EOF'
auto_advance = false
[[steps]]
share_bp = 5000
min_bake_secs = 0
[[steps]]
share_bp = 10000
min_bake_secs = 0
EOF
state() { "$BIN" rollout --json --server 127.0.0.1:$1 status credit-limit | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])'; }
for i in $(seq "$ROLLBACKS"); do
  "$BIN" rollout --server 127.0.0.1:50092 start credit-limit --candidate v2 \
    --plan "$OUT/plan.toml" --skip-backtest > /dev/null
  for port in 50093 50094; do
    until [ "$(state $port)" = active ]; do sleep 0.01; done
  done
  t0=$(date +%s%N)
  "$BIN" rollout --server 127.0.0.1:50092 rollback credit-limit > /dev/null
  t1=$(date +%s%N)
  for port in 50093 50094; do
    until [ "$(state $port)" = rolled_back ]; do :; done
  done
  t2=$(date +%s%N)
  echo "{\"label\": \"rollback-propagation\", \"rollback_ms\": $(( (t1 - t0) / 1000000 )), \"reached_all_ms\": $(( (t2 - t0) / 1000000 ))}" | tee -a "$RESULTS"
done
python3 bench/summarize.py "$RESULTS" 2>/dev/null || true
