"""Time and memory of the cross-part exact dedup that `seer-shards merge` runs (data_prep/dedup.py).

    python benchmarks/bench_merge_dedup.py [--rows 1000000] [--parts 4] [--dup 0.1] [--workers 1 2]

Writes --parts synthetic build indexes (the schema `seer-shards build` leaves in
PART/.seer-shards/index.sqlite: stored rows with sha256, ordinal, shuffle position, key, source,
and a shard plan of 10,000 samples a shard) holding --rows samples in all, a fraction --dup of them
byte-identical copies of samples in other parts, then times `cross_part_duplicates` at each
--workers and reports rows/s and the peak RSS of the process tree (the bucket-at-a-time design
should hold about 1/256 of the hashes at once). The last line of output is JSON.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_prep.dedup import cross_part_duplicates  # noqa: E402
from data_prep.index import Index, sample_key, shuffle_pos  # noqa: E402
from data_prep.lock import STATE  # noqa: E402


def write_parts(root: Path, rows: int, parts: int, dup: float, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    dirs = []
    per = rows // parts
    for p in range(parts):
        d = root / f"p{p}"
        (d / STATE).mkdir(parents=True)
        idx = Index(str(d / STATE / "index.sqlite"))
        batch = []
        for j in range(per):
            ordinal = (p * per + j) << 32  # one archive member per entry: the build's numbering
            src = f"/dump/{p:03d}.tar::{j:09d}.jpg"
            # A copy takes the bytes (sha) of a sample of part p-1, so it is a cross-part copy.
            base = (((p - 1) % parts) * per + j) if rng.random() < dup else (p * per + j)
            sha = hashlib.sha256(str(base).encode()).hexdigest()
            key = sample_key(ordinal, src)
            batch.append((ordinal, src, key, shuffle_pos(0, key), sha, 1000, "spool", 0, 1000, 64, 64, 64, 64))
            if len(batch) >= 50_000:
                idx.db.executemany("INSERT INTO items VALUES (?,?,?,?,?,?,NULL,?,?,?,?,?,?,?)", batch)
                batch = []
        idx.db.executemany("INSERT INTO items VALUES (?,?,?,?,?,?,NULL,?,?,?,?,?,?,?)", batch)
        idx.commit()
        idx.make_plan(10_000, None)
        idx.close()
        dirs.append(str(d))
    return dirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--parts", type=int, default=4)
    ap.add_argument("--dup", type=float, default=0.1)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tmp", default=None)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-dedup-", dir=a.tmp))
    try:
        t = time.perf_counter()
        parts = write_parts(root, a.rows, a.parts, a.dup)
        print(f"{a.parts} part indexes, {a.rows} rows, {a.dup:.0%} cross-part copies: written in "
              f"{time.perf_counter() - t:.0f} s")
        res = {"rows": a.rows, "parts": a.parts, "dup": a.dup, "runs": []}
        for w in a.workers:
            t = time.perf_counter()
            drops, rows = cross_part_duplicates(parts, "shard", workers=w)
            dt = time.perf_counter() - t
            rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) >> 10
            n = sum(len(v) for v in drops.values())
            assert n == len(rows)
            res["runs"].append({"workers": w, "s": dt, "rows_per_s": a.rows / dt, "dropped": n, "peak_rss_mib": rss})
            print(f"workers {w}: {dt:.1f} s, {a.rows / dt:,.0f} rows/s, {n} copies dropped, "
                  f"peak RSS {rss} MiB (load {os.getloadavg()[0]:.1f})", flush=True)
        print(json.dumps(res))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
