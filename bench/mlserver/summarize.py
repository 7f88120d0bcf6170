"""bench/mlserver.sh's JSON lines as a markdown table: medians per server over the rounds, and
riskserve's rows/s against MLServer's."""
import json
import statistics
import sys
from collections import defaultdict

runs, extra = defaultdict(list), {}
for line in open(sys.argv[1]):
    line = line.strip()
    if line.startswith("{"):
        r = json.loads(line)
        (runs[r["label"]].append(r) if "rows_per_s" in r else extra.__setitem__(r["label"], r))


def med(label, key):
    return statistics.median(r[key] for r in runs[label])


servers = [
    ("riskserve-sync", "riskserve, decisions logged (sync, durable)"),
    ("riskserve-off", "riskserve, logging off (--unrecorded-benchmark-only)"),
    ("mlserver", "MLServer + SKLearnModel, predict_proba, parallel_workers "
     + str(extra.get("versions", {}).get("mlserver_parallel_workers", "?")) + " (records nothing)"),
    ("riskserve-sync-long", "riskserve, decisions logged, one long run (steady state)"),
    ("mlserver-long", "MLServer, one long run"),
]
first = next(iter(runs.values()))[0]
v = extra.get("versions", {})
print(f"ModelInfer, {first['batch']} rows a call, {first['concurrency']} in flight, closed loop; "
      f"servers on core 0, load (`riskserve bench --protocol v2`) on core 1; "
      f"{first['duration_s']:.0f} s a run. riskserve {v.get('riskserve_commit', '?')} (binary built {v.get('riskserve_binary_built', '?')}), "
      f"MLServer {v.get('mlserver', '?')} (mlserver-sklearn {v.get('mlserver-sklearn', '?')}, "
      f"scikit-learn {v.get('scikit-learn', '?')}, numpy {v.get('numpy', '?')}, Python {v.get('python', '?')}).")
eq = extra.get("equivalence")
if eq:
    print(f"Equivalence: {eq['rows']} rows, max |PD difference| against {eq['reference']}: "
          + ", ".join(f"{k} {d:.2g}" for k, d in eq["max_abs_diff"].items()) + f" (tolerance {eq['tolerance']:g}).")
print()
print("| server | runs | rows/s (median) | calls/s | p50 ms | p99 ms | p99.9 ms | errors |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for label, name in servers:
    if runs[label]:
        print(f"| {name} | {len(runs[label])} | {med(label, 'rows_per_s'):,.0f} | {med(label, 'throughput_rps'):,.0f} "
              f"| {med(label, 'p50_us') / 1000:.2f} | {med(label, 'p99_us') / 1000:.2f} "
              f"| {med(label, 'p999_us') / 1000:.2f} | {sum(r['errors'] for r in runs[label])} |")
print()
if runs["mlserver"]:
    for label in ("riskserve-sync", "riskserve-off"):
        if runs[label]:
            ratios = [a["rows_per_s"] / b["rows_per_s"] for a, b in zip(runs[label], runs["mlserver"])]
            print(f"{label} / MLServer rows/s: {med(label, 'rows_per_s') / med('mlserver', 'rows_per_s'):.2f} "
                  f"(per round: {', '.join(f'{x:.2f}' for x in ratios)})")
if runs["riskserve-sync-long"] and runs["mlserver-long"]:
    long = runs["riskserve-sync-long"][0]
    print(f"riskserve-sync / MLServer rows/s over one {long['duration_s']:.0f} s run each: "
          f"{med('riskserve-sync-long', 'rows_per_s') / med('mlserver-long', 'rows_per_s'):.2f}")
