"""The on-disk bookkeeping of a build: one SQLite row per input, the shard plan, finished shards.

Sources are stored escaped (`format.escape_name`): SQLite text must be UTF-8, names need not be.

Per-input state lives here, not in memory, so a dump of any size fits, and a rerun after a
crash picks up from the last commit.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from typing import Any, Iterator, Optional

from seer_pipeline.shards.format import escape_name, member_bytes, sample_json, tar_bytes

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT);
CREATE TABLE IF NOT EXISTS items (
  ordinal INTEGER PRIMARY KEY, source TEXT NOT NULL, key TEXT, pos INTEGER,
  sha256 TEXT, size INTEGER, reason TEXT, spool TEXT, off INTEGER, len INTEGER,
  width INTEGER, height INTEGER, orig_width INTEGER, orig_height INTEGER);
CREATE INDEX IF NOT EXISTS items_sha ON items (sha256) WHERE reason IS NULL;
CREATE INDEX IF NOT EXISTS items_pos ON items (pos, ordinal) WHERE reason IS NULL;
CREATE TABLE IF NOT EXISTS plan (
  idx INTEGER PRIMARY KEY, first_pos INTEGER, first_ordinal INTEGER, count INTEGER, bytes INTEGER);
CREATE TABLE IF NOT EXISTS shards (idx INTEGER PRIMARY KEY, name TEXT, count INTEGER, bytes INTEGER, sha256 TEXT);
"""


def sample_key(ordinal: int, source: str) -> str:
    """Unique per input across the whole enumeration, hence across `--part` runs too."""
    return hashlib.blake2b(f"{ordinal}\0{source}".encode("utf-8", "surrogateescape"), digest_size=12).hexdigest()


def shuffle_pos(seed: int, key: str) -> int:
    """A sample's place in the global shuffle: a seeded hash, so order is a pure function."""
    h = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big", signed=True)


class Index:
    """SQLite state of one build directory."""

    def __init__(self, path: str) -> None:
        self.folder = os.path.dirname(os.path.abspath(path))  # scratch files of a stage go beside it
        self.db = sqlite3.connect(path, isolation_level="DEFERRED")
        self.db.row_factory = sqlite3.Row
        # WAL + NORMAL: a commit survives kill -9 of this process (the OS keeps the log).
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    def get(self, k: str, default: Optional[str] = None) -> Optional[str]:
        row = self.db.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()
        return default if row is None else row[0]

    def put(self, k: str, v: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (k, str(v)))

    def commit(self) -> None:
        self.db.commit()

    def has_sha(self, sha: str) -> bool:
        q = "SELECT 1 FROM items WHERE sha256=? AND reason IS NULL LIMIT 1"
        return self.db.execute(q, (sha,)).fetchone() is not None

    def add_skip(self, ordinal: int, source: str, reason: str, sha: str = "", size: int = 0) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO items (ordinal, source, sha256, size, reason) VALUES (?,?,?,?,?)",
            (ordinal, escape_name(source), sha or None, size, reason))

    def add_ok(self, r: Any, seed: int) -> None:
        key = sample_key(r.ordinal, r.source)
        self.db.execute(
            "INSERT OR REPLACE INTO items VALUES (?,?,?,?,?,?,NULL,?,?,?,?,?,?,?)",
            (r.ordinal, escape_name(r.source), key, shuffle_pos(seed, key), r.sha256, r.size, r.spool, r.off,
             r.length, r.width, r.height, r.orig_width, r.orig_height))

    def ok_rows(self, first: Optional[tuple[int, int]] = None, limit: int = -1) -> Iterator[sqlite3.Row]:
        """Stored samples in shuffle order, optionally from (pos, ordinal) on."""
        if first is None:
            q, args = "SELECT * FROM items WHERE reason IS NULL ORDER BY pos, ordinal LIMIT ?", (limit,)
        else:
            q = ("SELECT * FROM items WHERE reason IS NULL AND (pos, ordinal) >= (?, ?) "
                 "ORDER BY pos, ordinal LIMIT ?")
            args = (first[0], first[1], limit)
        if getattr(self, "near", False):  # data_prep.near_build: the signature joins each row
            q = q.replace("SELECT * FROM items", "SELECT items.*, near.sig AS phash FROM items "
                          "LEFT JOIN near USING (ordinal)").replace("reason IS NULL", "items.reason IS NULL")
        yield from self.db.execute(q, args)

    def make_plan(self, maxcount: int, maxsize: Optional[int]) -> None:
        """Cut the shuffled sample sequence into shards at --maxcount / --maxsize."""
        if self.get("plan_done") == "1":
            return
        self.db.execute("DELETE FROM plan")
        cur: Optional[list[int]] = None  # [first_pos, first_ordinal, count, payload]
        plans: list[list[int]] = []
        for row in self.ok_rows():
            size = member_bytes(row["len"]) + member_bytes(len(sample_json(row)))
            if cur is not None and (cur[2] >= maxcount or (
                    maxsize is not None and tar_bytes(cur[3] + size) > maxsize)):
                plans.append(cur)
                cur = None
            if cur is None:
                cur = [row["pos"], row["ordinal"], 0, 0]
            cur[2] += 1
            cur[3] += size
            if len(plans) >= 1024:  # keep memory flat on huge builds
                self._insert_plans(plans)
                plans = []
        if cur is not None:
            plans.append(cur)
        self._insert_plans(plans)
        self.put("plan_done", 1)
        self.commit()

    def _insert_plans(self, plans: list[list[int]]) -> None:
        start = self.db.execute("SELECT COUNT(*) FROM plan").fetchone()[0]
        self.db.executemany("INSERT INTO plan VALUES (?,?,?,?,?)",
                            [(start + i, p[0], p[1], p[2], tar_bytes(p[3])) for i, p in enumerate(plans)])

    def plan(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM plan ORDER BY idx").fetchall()

    def done_shard(self, idx: int) -> Optional[sqlite3.Row]:
        return self.db.execute("SELECT * FROM shards WHERE idx=?", (idx,)).fetchone()

    def record_shard(self, idx: int, name: str, count: int, nbytes: int, sha: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO shards VALUES (?,?,?,?,?)", (idx, name, count, nbytes, sha))
        self.db.commit()

    def counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT COALESCE(reason, 'ok'), COUNT(*) FROM items GROUP BY 1").fetchall()
        return {r[0]: r[1] for r in rows}

    def skipped(self) -> Iterator[sqlite3.Row]:
        yield from self.db.execute("SELECT source, reason FROM items WHERE reason IS NOT NULL ORDER BY ordinal")

    def config(self) -> Optional[dict]:
        c = self.get("config")
        return None if c is None else json.loads(c)
