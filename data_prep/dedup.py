"""Exact dedup across the `--part I/N` builds of one set, for `seer-shards merge` (issue #22).

Each part dedups only itself while it builds. At merge time, every stored sample's sha256 is
read back from the parts' indexes (`PART/.seer-shards/index.sqlite`, where the build recorded it)
one hash-prefix bucket at a time: the memory held is one bucket's hashes (1/256 of the set), never
the whole set's, and each bucket is a range scan of the index the build already keeps on sha256.
Of the copies of one image the one with the smallest ordinal stays: the one a single build of
all inputs keeps (inputs are numbered identically in every part, data_prep.sources), so the
merged set equals the single build's, dropped copies included.
"""
from __future__ import annotations

import bisect
import os
import sqlite3
from collections import defaultdict
from typing import Iterator

from data_prep.lock import STATE
from seer_pipeline.shards import format as fmt

BUCKET_HEX = 2  # 256 buckets by the first two hex digits of the sha256
_Q = ("SELECT sha256, ordinal, pos, key, source FROM items "
      "WHERE reason IS NULL AND sha256 >= ? AND sha256 < ?")


def _index(part: str) -> sqlite3.Connection:
    path = os.path.join(part, STATE, "index.sqlite")
    if not os.path.isfile(path):
        raise ValueError(f"{part}: no build index ({path}); cross-part dedup needs the parts as "
                         "`seer-shards build --part` left them")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)  # read only: never changes a part
    db.row_factory = sqlite3.Row
    return db


def _buckets() -> Iterator[tuple[str, str]]:
    n = 16 ** BUCKET_HEX
    for b in range(n):
        yield f"{b:0{BUCKET_HEX}x}", (f"{b + 1:0{BUCKET_HEX}x}" if b + 1 < n else "g")


class _ShardOf:
    """Which shard of a part holds the sample at (pos, ordinal): the plan cut the shuffled order
    into runs starting at (first_pos, first_ordinal)."""

    def __init__(self, db: sqlite3.Connection, prefix: str) -> None:
        rows = db.execute("SELECT idx, first_pos, first_ordinal FROM plan ORDER BY idx").fetchall()
        self.starts = [(r["first_pos"], r["first_ordinal"]) for r in rows]
        self.names = [fmt.shard_name(prefix, r["idx"]) for r in rows]

    def __call__(self, pos: int, ordinal: int) -> str:
        return self.names[bisect.bisect_right(self.starts, (pos, ordinal)) - 1]


def cross_part_duplicates(parts: list[str], prefix: str,
                          workers: int = 1) -> tuple[dict[tuple[str, str], list[str]], list[list[str]]]:
    """Copies to drop: ({(part, shard name): sorted keys}, skipped.tsv rows [escaped source,
    'duplicate'] in ordinal order). `parts` as the merge lists them. Buckets are independent:
    with `workers` > 1 they are shared out to that many processes (each holds one bucket at a time)."""
    for p in parts:
        _index(p).close()  # a missing index is one clear error, before any work
    buckets = list(_buckets())
    groups = [buckets[i::workers] for i in range(max(1, workers))]
    if len(groups) == 1:
        results = [_scan(parts, prefix, groups[0])]
    else:
        import concurrent.futures as cf  # only a parallel merge pays for the pool

        with cf.ProcessPoolExecutor(len(groups)) as pool:
            results = list(pool.map(_scan, [parts] * len(groups), [prefix] * len(groups), groups))
    drops: dict[tuple[str, str], list[str]] = defaultdict(list)
    dropped: list[tuple[int, str]] = []
    for d, rows in results:
        for k, v in d.items():
            drops[k].extend(v)
        dropped.extend(rows)
    dropped.sort()
    return {k: sorted(v) for k, v in drops.items()}, [[src, "duplicate"] for _, src in dropped]


def _scan(parts: list[str], prefix: str, buckets: list[tuple[str, str]]) -> tuple[dict, list]:
    dbs = [_index(p) for p in parts]
    try:
        where = [_ShardOf(db, prefix) for db in dbs]
        drops: dict[tuple[str, str], list[str]] = defaultdict(list)
        dropped: list[tuple[int, str]] = []
        for lo, hi in buckets:
            best: dict[str, tuple[int, int, int, str, str]] = {}  # sha -> (ordinal, part, pos, key, source)
            for i, db in enumerate(dbs):
                for r in db.execute(_Q, (lo, hi)):
                    cand = (r["ordinal"], i, r["pos"], r["key"], r["source"])
                    old = best.get(r["sha256"])
                    if old is None:
                        best[r["sha256"]] = cand
                        continue
                    keep, drop = (old, cand) if old[0] < cand[0] else (cand, old)
                    best[r["sha256"]] = keep
                    drops[(parts[drop[1]], where[drop[1]](drop[2], drop[0]))].append(drop[3])
                    dropped.append((drop[0], drop[4]))
    finally:
        for db in dbs:
            db.close()
    return dict(drops), dropped
