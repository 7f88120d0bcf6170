"""Lookups by decision id in a filled view, as the server makes them: the blocks whose
v7-millisecond range holds the id's (layout 6: those listed in `block_ids` under the id time's
bucket at each width, as src/decision_log/blocks.rs lists them; layout 5: read from every
summary), then those blocks' rows by primary key.
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
layout = db.execute("PRAGMA user_version").fetchone()[0]
WIDTHS = [10, 16, 22, 28, 34, 40, 48]
BY_BUCKETS = ("SELECT DISTINCT b.block FROM block_ids i JOIN blocks b ON b.block = i.block "
              "WHERE i.bucket IN (?, ?, ?, ?, ?, ?, ?) AND b.id_min <= ? AND b.id_max >= ? ORDER BY b.block")


def candidates(ms):
    if layout >= 6:
        buckets = [(level << 48) | (ms >> w) for level, w in enumerate(WIDTHS)]
        return [b for (b,) in db.execute(BY_BUCKETS, (*buckets, ms, ms))]
    return [b for (b,) in db.execute("SELECT block FROM blocks WHERE id_min <= ?1 AND id_max >= ?1", (ms,))]


lat, reads = [], []
for id_ in ids:
    t = time.perf_counter_ns()
    ms = int.from_bytes(id_[:6], "big")
    blocks = candidates(ms)
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
print(f"layout {layout}: {n} lookups of {top:,} decisions: p50 {lat[n // 2]:.0f} µs, p99 {lat[int(n * .99)]:.0f} µs, "
      f"max {lat[-1]:.0f} µs; blocks that may hold the id: median {reads[n // 2]}, max {reads[-1]}")
