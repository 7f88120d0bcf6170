"""Summarise bench/run.sh's JSON lines: medians per label and the ratios BENCHMARKS.md quotes."""
import json
import statistics
import sys
from collections import defaultdict

rows = defaultdict(list)
for line in open(sys.argv[1]):
    line = line.strip()
    if line.startswith("{"):
        r = json.loads(line)
        rows[r["label"]].append(r)


def med(label, key):
    values = [r[key] for r in rows.get(label, []) if key in r]
    return statistics.median(values) if values else float("nan")


print("| label | runs | throughput req/s (median) | p50 µs | p90 µs | p99 µs | p99.9 µs | errors |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for label, rs in rows.items():
    if "throughput_rps" in rs[0]:
        print(
            f"| {label} | {len(rs)} | {med(label, 'throughput_rps'):,.0f} | {med(label, 'p50_us'):.0f} "
            f"| {med(label, 'p90_us'):.0f} | {med(label, 'p99_us'):.0f} | {med(label, 'p999_us'):.0f} "
            f"| {sum(r['errors'] for r in rs)} |"
        )
print()
def ratio(a, b, key="throughput_rps"):
    return med(a, key) / med(b, key)


for c in (1, 8, 32):
    if f"score-c{c}" in rows:
        print(f"Score / empty handler throughput at concurrency {c}: {ratio(f'score-c{c}', f'empty-c{c}'):.2f}")
if "swaps-c8" in rows:
    steady, swaps = med("steady-c8", "p99_us"), med("swaps-c8", "p99_us")
    print(f"p99 during swap storm / steady p99 (c=8): {swaps / steady:.2f}  ({swaps:.0f} µs vs {steady:.0f} µs; "
          f"{sum(r.get('swaps', 0) for r in rows.get('swaps-c8', []))} swaps)")
for label in ("rss-3-versions", "rss-after-10-cycles", "rss-after-1000-cycles"):
    if label in rows:
        print(f"{label}: {med(label, 'rss_kib') / 1024:.1f} MiB")
for c in (8, 32):
    if f"sync-c{c}" in rows:
        print(f"c={c}: sync-logged / unlogged throughput {ratio(f'sync-c{c}', f'off-c{c}'):.2f}, "
              f"async / unlogged {ratio(f'async-c{c}', f'off-c{c}'):.2f}; "
              f"p99 added by sync logging {med(f'sync-c{c}', 'p99_us') - med(f'off-c{c}', 'p99_us'):.0f} µs")
if "fdatasync-600B" in rows and "sync-c1" in rows:
    sync_ = med("fdatasync-600B", "p50_us")
    added = med("sync-c1", "p50_us") - med("off-c1", "p50_us")
    print(f"c=1: sync logging adds {added:.0f} µs to the p50, {added / sync_:.2f} fdatasyncs "
          f"(one 600-byte pwrite + fdatasync on the servers' core: p50 {sync_:.0f} µs)")
if "fill" in rows:
    print(f"fill: {med('fill', 'decisions'):,.0f} decisions at {med('fill', 'decisions_per_s'):,.0f}/s, "
          f"{med('fill', 'bytes_per_decision'):,.0f} bytes per decision")
for c in (8, 32):
    if f"shadow-c{c}" in rows:
        print(f"c={c}: shadow / no shadow throughput {ratio(f'shadow-c{c}', f'noshadow-c{c}'):.2f}; "
              f"p99 {med(f'shadow-c{c}', 'p99_us'):.0f} µs vs {med(f'noshadow-c{c}', 'p99_us'):.0f} µs "
              f"({med(f'shadow-c{c}', 'p99_us') / med(f'noshadow-c{c}', 'p99_us'):.2f}x)")
if "served-during-backtest" in rows:
    print(f"served p99 during a backtest / without: "
          f"{med('served-during-backtest', 'p99_us') / med('served-no-backtest', 'p99_us'):.2f} "
          f"({med('served-during-backtest', 'p99_us'):.0f} µs vs {med('served-no-backtest', 'p99_us'):.0f} µs); "
          f"throughput {ratio('served-during-backtest', 'served-no-backtest'):.2f}")
if "backtest-alone" in rows:
    print(f"backtest alone: {med('backtest-alone', 'rescored'):,.0f} decisions in "
          f"{med('backtest-alone', 'duration_s'):.1f} s = {med('backtest-alone', 'decisions_per_s'):,.0f}/s")
for c in (1, 32):
    if f"sync-c{c}" in rows and f"off-c{c}" in rows:
        line = f"c={c}: sync / off throughput {ratio(f'sync-c{c}', f'off-c{c}'):.2f}"
        if f"base-sync-c{c}" in rows:
            line += (f", previous log (SQLite) / off {ratio(f'base-sync-c{c}', f'off-c{c}'):.2f}, "
                     f"journal / previous {ratio(f'sync-c{c}', f'base-sync-c{c}'):.2f}")
        print(line)
for proto, unit in (("v2-c32", "throughput_rps"), ("v2b64-c8", "rows_per_s")):
    if f"sync-{proto}" in rows:
        line = f"ModelInfer {proto}: sync / off {ratio(f'sync-{proto}', f'off-{proto}', unit):.2f}"
        if f"base-sync-{proto}" in rows:
            line += (f", previous / off {ratio(f'base-sync-{proto}', f'off-{proto}', unit):.2f}, "
                     f"this / previous {ratio(f'sync-{proto}', f'base-sync-{proto}', unit):.2f}")
        print(line + f" ({med(f'sync-{proto}', unit):,.0f} vs {med(f'off-{proto}', unit):,.0f} {unit})")
if "off-c32-long" in rows and "sync-c32-long" in rows:
    line = (f"steady state, Score c=32 for {med('sync-c32-long', 'duration_s'):.0f} s: sync / off "
            f"{ratio('sync-c32-long', 'off-c32-long'):.2f}")
    if "base-sync-c32-long" in rows:
        line += (f", previous / off {ratio('base-sync-c32-long', 'off-c32-long'):.2f}, "
                 f"this / previous {ratio('sync-c32-long', 'base-sync-c32-long'):.2f}")
    print(line)
if "sync-v2b64-c8-long" in rows and "off-v2b64-c8-long" in rows:
    line = (f"steady state, ModelInfer 64 rows c=8 for {med('sync-v2b64-c8-long', 'duration_s'):.0f} s: "
            f"sync / off {ratio('sync-v2b64-c8-long', 'off-v2b64-c8-long', 'rows_per_s'):.2f}")
    if "base-sync-v2b64-c8-long" in rows:
        line += (f", previous / off {ratio('base-sync-v2b64-c8-long', 'off-v2b64-c8-long', 'rows_per_s'):.2f}, "
                 f"this / previous {ratio('sync-v2b64-c8-long', 'base-sync-v2b64-c8-long', 'rows_per_s'):.2f}")
    print(line)
for who, run in [(w, r) for r in ("c32-long", "v2b64-c8-long") for w in ("sync", "base-sync")]:
    label = f"{who}-{run}"
    if label in rows:
        r = rows[label][0]
        print(f"{label}: p99 {r['p99_us']} µs, p99.9 {r['p999_us']} µs, p99.9/p99 {r['p999_us'] / r['p99_us']:.2f}")
    for cpu in (f"{label}-cpu", "log-cpu" if label == "sync-c32-long" else None):
        if cpu in rows:
            r = rows[cpu][0]
            print(f"{cpu}: writer {r['writer_us_per_decision']} µs, indexer {r['indexer_us_per_decision']} µs "
                  f"per decision ({r['decisions']:,} decisions)")
            if "view_lag_at_end" in r:
                print(f"{cpu}: the view trailed by {r['view_lag_at_end']:,} records when the load stopped, "
                      f"caught up in {r['catch_up_s']} s" + ("" if r["caught_up_by_itself"] else " (not by itself)"))
for label in ("fill", "base-fill"):
    if label in rows:
        r = rows[label][0]
        print(f"{label}: {r['decisions']:,} decisions, journal {r.get('journal_bytes_per_decision', 0):,.0f} + "
              f"view {r.get('view_bytes_per_decision', 0):,.0f} = {r['bytes_per_decision']:,.0f} bytes per decision")
for kind in ("xgboost", "lightgbm"):
    for c in (1, 8, 32):
        if f"{kind}-c{c}" in rows:
            print(f"{kind} (150 trees, depth 5) / logistic throughput at concurrency {c}: "
                  f"{ratio(f'{kind}-c{c}', f'logistic-c{c}'):.2f}; p99 {med(f'{kind}-c{c}', 'p99_us'):.0f} µs "
                  f"vs {med(f'logistic-c{c}', 'p99_us'):.0f} µs")
