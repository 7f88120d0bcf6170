# Shared by the bench/ scripts (sourced, not run, from the repository root): the release build,
# the measuring window (env DURATION=5 WARMUP=1 ROUNDS=3) and the helpers below.

DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
ROUNDS=${ROUNDS:-3}
BIN=target/release/riskserve
# NO_BUILD=1 measures the release binary as it is.
[ "${NO_BUILD:-0}" = 1 ] || cargo build --release --quiet

# train_version MODELS_DIR VERSION SEED: a credit-limit version trained like the shipped v1
# but on another seed, into MODELS_DIR.
train_version() {
  "$BIN" train --data data/taiwan_credit_default.csv --label DID_DEFAULT_PAYMENT \
    --model credit-limit --version "$2" --seed "$3" --schema data/taiwan_schema.toml \
    --exclude USER_ID SEX MARITALSTATUS --created-at 2026-11-28T00:00:00Z \
    --models "$1" > /dev/null
}

# Servers on core 0 (killed on exit), load from core 1; OUT, BIN, DURATION, WARMUP and RESULTS
# come from the script.
PIDS=()
trap 'kill ${PIDS[@]} 2>/dev/null || true' EXIT
start() { # port data-dir [flags...]
  local port=$1 dir=$2; shift 2
  taskset -c 0 "$BIN" serve --listen 127.0.0.1:$port --data "$dir" "$@" > /dev/null 2>> "$OUT/server.log" &
  PIDS+=($!)
  for _ in $(seq 200); do
    "$BIN" models list --server 127.0.0.1:$port > /dev/null 2>&1 && return
    kill -0 "${PIDS[-1]}" 2>/dev/null || break
    sleep 0.1
  done
  echo "server on $port did not start (see $OUT/server.log)" >&2; exit 1
}
load() { # label port concurrency [args...]
  local label=$1 port=$2 c=$3; shift 3
  taskset -c 1 "$BIN" bench --server 127.0.0.1:$port --concurrency "$c" \
    --duration "$DURATION" --warmup "$WARMUP" --label "$label" "$@" | tee -a "$RESULTS"
}
