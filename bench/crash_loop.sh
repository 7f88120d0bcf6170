#!/usr/bin/env bash
# The SIGKILL crash loop at length: CRASH_CYCLES (default 1000) rounds of start, load from 8
# clients, SIGKILL at a random moment; after every restart the last round's acknowledged
# decisions must be in the log unchanged and the chain must verify, and at the end every
# acknowledged decision of every round. Prints one JSON line with the counts (lost is 0, or
# the run fails naming the first lost decision). Usage: bench/crash_loop.sh
set -euo pipefail
cd "$(dirname "$0")/.."
.ci/deps > /dev/null
CRASH_CYCLES=${CRASH_CYCLES:-1000} cargo test --quiet --test it \
  durability::sigkill_under_load_loses_no_acknowledged_decision -- --exact --nocapture 2>&1 \
  | grep -oE '\{"label":"crash-loop"[^}]*\}|panicked.*|FAILED.*' | tee -a bench/out/crash-loop.jsonl
