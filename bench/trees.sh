#!/usr/bin/env bash
# Tree ensembles against the logistic model, in one run: Score throughput and latency at 1, 8
# and 32 in flight (server on core 0, load on core 1, alternating ROUNDS times), the CPU cost
# of one decision's model work with and without TreeSHAP, and the memory of a loaded version.
# The 150-tree, depth-5 models are trained here with the real libraries (.ci/venv, made by
# .ci/deps) on the Taiwan data. Usage: bench/trees.sh   (env: DURATION=5 WARMUP=1 ROUNDS=3)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
cargo build --release --quiet --example model_cost

OUT=bench/out/trees
PORT=50081
RESULTS="$OUT/results.jsonl"
rm -rf "$OUT" && mkdir -p "$OUT"
cp -r models "$OUT/models"

.ci/venv/bin/python - "$OUT" <<'PY'
import csv, sys
import numpy as np, xgboost as xgb, lightgbm as lgb
out = sys.argv[1]
with open("data/taiwan_credit_default.csv") as f:
    rows = list(csv.DictReader(f))
skip = {"USER_ID", "SEX", "MARITALSTATUS", "DID_DEFAULT_PAYMENT"}
names = [c for c in rows[0] if c not in skip]
x = np.array([[float(r[c]) for c in names] for r in rows])
y = np.array([int(r["DID_DEFAULT_PAYMENT"]) for r in rows])
d = xgb.DMatrix(x, label=y, feature_names=names)
b = xgb.train({"objective": "binary:logistic", "max_depth": 5, "eta": 0.1, "seed": 7,
               "tree_method": "hist"}, d, num_boost_round=150)
b.save_model(f"{out}/xgb150.json")
m = lgb.train({"objective": "binary", "max_depth": 5, "num_leaves": 32, "learning_rate": 0.1,
               "seed": 7, "verbose": -1, "num_threads": 1},
              lgb.Dataset(x, label=y, feature_name=names), num_boost_round=150)
m.save_model(f"{out}/lgb150.txt")
PY
for kind in xgboost lightgbm; do
  file=$OUT/xgb150.json; [ $kind = lightgbm ] && file=$OUT/lgb150.txt
  "$BIN" import $kind "$file" --model credit-$kind --version v1 --models "$OUT/models" \
    --data data/taiwan_credit_default.csv --label DID_DEFAULT_PAYMENT \
    --created-at 2026-12-01T00:00:00Z > "$OUT/import-$kind.txt"
done
printf '[serving]\ncredit-limit = "v1"\ncredit-xgboost = "v1"\ncredit-lightgbm = "v1"\n' > "$OUT/config.toml"

# 1. The model work alone, one thread on core 0: ns per decision, and KiB per loaded version.
taskset -c 0 target/release/examples/model_cost data/taiwan_credit_default.csv \
  "$OUT/models/credit-limit/v1" "$OUT/models/credit-xgboost/v1" "$OUT/models/credit-lightgbm/v1" \
  | sed 's/^{/{"label":"model-cost",/' | tee -a "$RESULTS"

# 2. Score over gRPC, decisions recorded (durability sync), same server, alternating models.
start $PORT "$OUT/data" --models "$OUT/models" --config "$OUT/config.toml"
for round in $(seq "$ROUNDS"); do
  for c in 1 8 32; do
    load "logistic-c$c" $PORT "$c" --model credit-limit --bundle "$OUT/models/credit-limit/v1"
    load "xgboost-c$c" $PORT "$c" --model credit-xgboost --bundle "$OUT/models/credit-xgboost/v1"
    load "lightgbm-c$c" $PORT "$c" --model credit-lightgbm --bundle "$OUT/models/credit-lightgbm/v1"
  done
done
python3 bench/summarize.py "$RESULTS" | tee "$OUT/summary.md"
