"""Lookups by decision id in a filled view (layout 5), as the server makes them: the blocks
whose v7-millisecond range holds the id's, then that block's rows by primary key.
Usage: python3 bench/lookup_by_id.py DATA_DIR [N]   (after `riskserve bench-fill-log`)
Prints p50 / p99 / max in µs over N random decisions, and the blocks read per lookup."""
import random
import sqlite3
import sys
import time

data, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2000
db = sqlite3.connect(f"file:{data}/decisions.db?mode=ro", uri=True)
top = db.execute("SELECT MAX(seq) FROM decision_rows").fetchone()[0]
random.seed(7)
ids = [db.execute("SELECT decision_id FROM decision_rows WHERE seq = ?", (random.randint(1, top),)).fetchone()[0]
       for _ in range(n)]
lat, reads = [], []
for id_ in ids:
    t = time.perf_counter_ns()
    ms = int.from_bytes(id_[:6], "big")
    blocks = [b for (b,) in db.execute("SELECT block FROM blocks WHERE id_min <= ?1 AND id_max >= ?1", (ms,))]
    found = None
    for b in blocks:
        found = db.execute("SELECT * FROM decision_rows WHERE seq >= ? AND seq <= ? AND decision_id = ?",
                           (b << 10, ((b + 1) << 10) - 1, id_)).fetchone()
        if found:
            break
    lat.append((time.perf_counter_ns() - t) / 1000)
    reads.append(len(blocks))
    assert found is not None
lat.sort()
reads.sort()
print(f"{n} lookups of {top:,} decisions: p50 {lat[n // 2]:.0f} µs, p99 {lat[int(n * .99)]:.0f} µs, "
      f"max {lat[-1]:.0f} µs; blocks that may hold the id: median {reads[n // 2]}, max {reads[-1]}")
