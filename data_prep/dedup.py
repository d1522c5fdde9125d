"""Exact dedup across the `--part I/N` builds of one set, for `seer-shards merge` (issue #22).

Each part dedups only itself while it builds. At merge time, every stored sample's sha256 is
read back from the parts' indexes (`PART/.seer-shards/index.sqlite`, where the build recorded it)
one hash-prefix bucket at a time: the memory held is one bucket's hashes (at most ~10^6 of them:
256 buckets or more, `bucket_digits`), never the whole set's, and each bucket is a range scan of
the index the build already keeps on sha256.
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

BUCKET_ROWS = 1_000_000  # at most ~this many hashes per bucket (measured: ~60 MiB at 10^6 rows in all)
# (sha256, ordinal) only: ordinal is the rowid, so the build's partial index on sha256 covers the
# scan (no table lookups). The rest of a row is read for the copies alone.
_Q = "SELECT sha256, ordinal FROM items WHERE reason IS NULL AND sha256 >= ? AND sha256 < ?"
_ROW = "SELECT pos, key, source FROM items WHERE ordinal = ?"


def _index(part: str) -> sqlite3.Connection:
    path = os.path.join(part, STATE, "index.sqlite")
    if not os.path.isfile(path):
        raise ValueError(f"{part}: no build index ({path}); cross-part dedup needs the parts as "
                         "`seer-shards build --part` left them")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)  # read only: never changes a part


def bucket_digits(total: int) -> int:
    """Hex digits of sha256 prefix per bucket: at least 2 (256 buckets), more until a bucket
    holds at most about BUCKET_ROWS hashes (10^9 samples: 3 digits, 4,096 buckets of ~244,000)."""
    d = 2
    while total / 16 ** d > BUCKET_ROWS:
        d += 1
    return d


def _buckets(digits: int = 2) -> Iterator[tuple[str, str]]:
    n = 16 ** digits
    for b in range(n):
        yield f"{b:0{digits}x}", (f"{b + 1:0{digits}x}" if b + 1 < n else "g")


class _ShardOf:
    """Which shard of a part holds the sample at (pos, ordinal): the plan cut the shuffled order
    into runs starting at (first_pos, first_ordinal)."""

    def __init__(self, db: sqlite3.Connection, prefix: str) -> None:
        rows = db.execute("SELECT idx, first_pos, first_ordinal FROM plan ORDER BY idx").fetchall()
        self.starts = [(pos, o) for _, pos, o in rows]
        self.names = [fmt.shard_name(prefix, i) for i, _, _ in rows]

    def __call__(self, pos: int, ordinal: int) -> str:
        return self.names[bisect.bisect_right(self.starts, (pos, ordinal)) - 1]


def cross_part_duplicates(parts: list[str], prefix: str,
                          workers: int = 1) -> tuple[dict[tuple[str, str], list[str]], list[list[str]]]:
    """Copies to drop: ({(part, shard name): sorted keys}, skipped.tsv rows [escaped source,
    'duplicate'] in ordinal order). `parts` as the merge lists them. Buckets are independent:
    with `workers` > 1 they are shared out to that many processes (each holds one bucket at a time),
    sized from the samples the parts' manifests count."""
    for p in parts:
        _index(p).close()  # a missing index is one clear error, before any work
    total = sum(int(fmt.load_manifest(p).get("written", 0)) for p in parts)
    buckets = list(_buckets(bucket_digits(total)))
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
            best: dict[str, tuple[int, int]] = {}  # sha -> (ordinal, part) of the copy kept so far
            for i, db in enumerate(dbs):
                for sha, ordinal in db.execute(_Q, (lo, hi)):
                    old = best.get(sha)
                    if old is None:
                        best[sha] = (ordinal, i)
                        continue
                    keep, (o, j) = (old, (ordinal, i)) if old[0] < ordinal else ((ordinal, i), old)
                    best[sha] = keep
                    pos, key, source = dbs[j].execute(_ROW, (o,)).fetchone()
                    drops[(parts[j], where[j](pos, o))].append(key)
                    dropped.append((o, source))
    finally:
        for db in dbs:
            db.close()
    return dict(drops), dropped
