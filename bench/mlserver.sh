#!/usr/bin/env bash
# riskserve against MLServer in one run: batch scoring over the Open Inference Protocol's gRPC
# ModelInfer (64 rows a call, 8 in flight, closed loop), the same logistic regression in both.
# It checks the issue's claim that riskserve with durable decision logging is slower than
# MLServer, a Python server that records nothing.
#
# - MLServer 1.7.1 with mlserver-sklearn comes from PyPI, pinned in bench/mlserver/requirements.txt,
#   into a venv outside the repo (MLVENV, default /tmp/mlserver-venv), installed if missing.
# - The model: bench/mlserver/make_model.py turns the shipped bundle's parameters.toml
#   (intercept, and per feature mean, scale, coefficient) into a scikit-learn Pipeline
#   (StandardScaler with mean_/scale_ set by hand, LogisticRegression with coef_/intercept_
#   set by hand), saved with joblib, served by mlserver_sklearn.SKLearnModel with predict_proba,
#   inference in the server's own process (parallel_workers 0), log level INFO (not DEBUG).
# - Before measuring, bench/mlserver/check.py sends the same CHECK_ROWS rows of the CSV to all
#   three servers as the load sends them and fails unless every probability of default agrees
#   to TOL (and with the bundle's formula in numpy).
# - The load: `riskserve bench --protocol v2 --batch 64 --concurrency 8` against all three
#   (MLServer takes its request as it is: the model name, an FP64 [64, 21] tensor `features`
#   in raw_input_contents, and the `customer_ids` / `current_limits` parameters, which it
#   ignores); a run with an error or no request fails the script.
# - Servers on core 0, the load on core 1. Three servers measured alternately in ROUNDS rounds,
#   the order rotated each round: riskserve with default (sync, durable) decision logging,
#   riskserve with logging off (--unrecorded-benchmark-only), MLServer. Each riskserve server
#   on a fresh data directory under a temporary directory that is removed at exit, with every
#   server started here. Then one LONG run each of the logged riskserve and MLServer: the
#   steady state, where riskserve's indexer keeps up on the same core.
#
# Usage: bench/mlserver.sh
# env: DURATION=10 WARMUP=2 ROUNDS=3 LONG=60 (0: none) BATCH=64 CONCURRENCY=8 MLVENV=/tmp/mlserver-venv
#      PYTHON=python3.11 PORT_BASE=50091 (uses PORT_BASE..PORT_BASE+4) ML_WORKERS=0
#      CHECK_ROWS=256 TOL=1e-9 NO_BUILD=1 (use target/release/riskserve as it is)
# ML_WORKERS=1 is MLServer's own default: inference in one worker process, fed over IPC.
# Writes bench/out/mlserver/{results.jsonl,summary.md,*.log}.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-3}
LONG=${LONG:-60}
BATCH=${BATCH:-64}
CONCURRENCY=${CONCURRENCY:-8}
MLVENV=${MLVENV:-/tmp/mlserver-venv}
PYTHON=${PYTHON:-python3.11}
PORT_BASE=${PORT_BASE:-50091}
ML_WORKERS=${ML_WORKERS:-0}
CHECK_ROWS=${CHECK_ROWS:-256}
TOL=${TOL:-1e-9}
MODEL=credit-limit
BUNDLE=models/credit-limit/v1
DATA=data/taiwan_credit_default.csv
SYNC_PORT=$PORT_BASE
OFF_PORT=$((PORT_BASE + 1))
ML_PORT=$((PORT_BASE + 2))
ML_HTTP_PORT=$((PORT_BASE + 3))
ML_METRICS_PORT=$((PORT_BASE + 4))

source bench/common.sh
[ -x "$BIN" ] || { echo "mlserver.sh: no $BIN (cargo build --release)" >&2; exit 1; }

OUT=bench/out/mlserver
rm -rf "$OUT" && mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"

# Everything started here is stopped at exit, and the temporary directory removed.
TMP=$(mktemp -d /tmp/riskserve-mlserver.XXXXXX)
ML_PID=
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  # MLServer runs in its own session (setsid): its whole process group goes.
  if [ -n "$ML_PID" ]; then kill -TERM -- "-$ML_PID" 2>/dev/null || true; fi
  for _ in $(seq 100); do
    local alive=0
    for pid in "${PIDS[@]}" $ML_PID; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  if [ -n "$ML_PID" ]; then kill -KILL -- "-$ML_PID" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  rm -rf "$TMP"
  exit $status
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for port in $SYNC_PORT $OFF_PORT $ML_PORT $ML_HTTP_PORT $ML_METRICS_PORT; do
  if [ -n "$(ss -Hltn "sport = :$port")" ]; then
    echo "mlserver.sh: port $port is taken (PORT_BASE=$PORT_BASE); set PORT_BASE" >&2; exit 1
  fi
done

# 1. MLServer's venv, outside the repo; (re)installed unless it holds the pinned versions.
venv_ok() { # every package of requirements.txt importable at its pinned version
  "$MLVENV/bin/python" - bench/mlserver/requirements.txt > /dev/null 2>&1 <<'PY'
import sys
from importlib.metadata import version
import mlserver, mlserver_sklearn, sklearn, grpc  # noqa: F401
for line in open(sys.argv[1]):
    if "==" in line and not line.startswith("#"):
        name, pin = line.strip().split("==")
        assert version(name) == pin, (name, version(name), pin)
PY
}
if ! venv_ok; then
  echo "mlserver.sh: installing MLServer into $MLVENV" >&2
  [ -x "$MLVENV/bin/pip" ] || "$PYTHON" -m venv "$MLVENV"
  "$MLVENV/bin/pip" install --quiet --disable-pip-version-check -r bench/mlserver/requirements.txt
  venv_ok || { echo "mlserver.sh: $MLVENV does not import the pinned MLServer" >&2; exit 1; }
fi
PY="$MLVENV/bin/python"
"$PY" - "$BIN" "$ML_WORKERS" <<'PY' | tee -a "$RESULTS"
import datetime, json, os, platform, subprocess, sys
from importlib.metadata import version
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
print(json.dumps({"label": "versions", "python": platform.python_version(),
                  **{p: version(p) for p in ("mlserver", "mlserver-sklearn", "scikit-learn", "numpy", "grpcio")},
                  "mlserver_parallel_workers": int(sys.argv[2]),
                  "riskserve_commit": rev + ("+changes" if dirty else ""),
                  "riskserve_binary_built": datetime.datetime.fromtimestamp(
                      os.path.getmtime(sys.argv[1]), datetime.timezone.utc).isoformat(timespec="seconds")}))
PY

# 2. MLServer's copy of the bundle, and MLServer on core 0 in its own process group.
"$PY" bench/mlserver/make_model.py "$BUNDLE" "$TMP/mlserver-repo" "$MODEL" \
  "$ML_PORT" "$ML_HTTP_PORT" "$ML_METRICS_PORT" "$ML_WORKERS" > "$OUT/make_model.json"
(cd "$TMP" && exec setsid taskset -c 0 "$MLVENV/bin/mlserver" start "$TMP/mlserver-repo") \
  > "$OUT/mlserver.log" 2>&1 &
ML_PID=$!

# 3. The two riskserve servers on core 0 (common.sh's start), each on a new data directory.
start $SYNC_PORT "$TMP/riskserve-sync"
start $OFF_PORT "$TMP/riskserve-off" --unrecorded-benchmark-only

# MLServer is ready once its model is (it imports for a few seconds first).
for i in $(seq 1200); do
  if "$PY" - "$ML_PORT" "$MODEL" > /dev/null 2>&1 <<'PY'
import sys, grpc
from mlserver.grpc import dataplane_pb2 as pb, dataplane_pb2_grpc as pb_grpc
with grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}") as ch:
    assert pb_grpc.GRPCInferenceServiceStub(ch).ModelReady(pb.ModelReadyRequest(name=sys.argv[2]), timeout=2).ready
PY
  then break; fi
  if ! kill -0 "$ML_PID" 2>/dev/null || [ "$i" = 1200 ]; then
    echo "mlserver.sh: MLServer did not start (see $OUT/mlserver.log)" >&2; exit 1
  fi
  sleep 0.1
done

# 4. The same rows scored by all three give the same probability of default, or nothing is
# measured.
if ! "$PY" bench/mlserver/check.py "$BUNDLE" "$DATA" "$MODEL" "$TOL" "$CHECK_ROWS" \
    riskserve=127.0.0.1:$SYNC_PORT riskserve=127.0.0.1:$OFF_PORT mlserver=127.0.0.1:$ML_PORT \
    | tee -a "$RESULTS"; then
  echo "mlserver.sh: FAILED: the servers do not score the same model; nothing measured" >&2
  exit 1
fi

# 5. The load, from core 1: one JSON line per run; a run with errors or no request fails.
load() { # label port [duration]
  local label=$1 port=$2 duration=${3:-$DURATION} line
  line=$(taskset -c 1 "$BIN" bench --server 127.0.0.1:$port --protocol v2 --batch "$BATCH" \
    --concurrency "$CONCURRENCY" --model "$MODEL" --bundle "$BUNDLE" --data "$DATA" \
    --duration "$duration" --warmup "$WARMUP" --label "$label")
  echo "$line"
  if ! jq -e '.errors == 0 and .requests > 0' <<< "$line" > /dev/null; then
    echo "mlserver.sh: FAILED: $label had errors or no answered request" >&2; exit 1
  fi
}
# A logged server's indexer works off what a run left in its tail afterwards, on the same
# core: `trace verify` waits for it, so that no run pays for the one before (as journal.sh).
quiet() { "$BIN" trace verify --json --server 127.0.0.1:$SYNC_PORT > /dev/null; }
# measure NAME: one measured run of that server.
measure() {
  case $1 in
    riskserve-sync) load riskserve-sync $SYNC_PORT | tee -a "$RESULTS"; quiet ;;
    riskserve-off) load riskserve-off $OFF_PORT | tee -a "$RESULTS" ;;
    mlserver) load mlserver $ML_PORT | tee -a "$RESULTS" ;;
  esac
}

# One unrecorded run each first: the first calls to a new MLServer are slow (seconds, as it
# finishes importing), and the logged server's journal starts empty.
for s in riskserve-sync riskserve-off mlserver; do
  case $s in riskserve-sync) p=$SYNC_PORT ;; riskserve-off) p=$OFF_PORT ;; mlserver) p=$ML_PORT ;; esac
  load "prime-$s" $p 1 >> "$OUT/prime.jsonl"
done
quiet

SERVERS=(riskserve-sync riskserve-off mlserver)
for round in $(seq "$ROUNDS"); do
  for k in 0 1 2; do
    measure "${SERVERS[$(((round - 1 + k) % 3))]}"
  done
done

# The steady state: one LONG run each of the logged riskserve and MLServer, in which
# riskserve's indexer cannot wait for a pause and shares the core with the requests.
if [ "$LONG" -gt 0 ]; then
  load riskserve-sync-long $SYNC_PORT "$LONG" | tee -a "$RESULTS"
  load mlserver-long $ML_PORT "$LONG" | tee -a "$RESULTS"
fi

# MLServer stayed up through the runs (an exit would have shown as errors, but say so).
kill -0 "$ML_PID" 2>/dev/null || { echo "mlserver.sh: MLServer exited during the run" >&2; exit 1; }
python3 bench/mlserver/summarize.py "$RESULTS" | tee "$OUT/summary.md"
