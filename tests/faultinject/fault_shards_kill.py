"""SIGKILL a `seer-shards build` at the worst moment of a stage: value "scan:N" or "write:I".

scan:N   after the N-th input's row is recorded in the index but before it is committed
         (seam: data_prep.build._record, called once per input result);
write:I  after shard I is renamed into place but before it is recorded as done
         (seam: data_prep.index.Index.record_shard, called once per finished shard).
"""
from __future__ import annotations

import os
import signal


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(value: str) -> None:
    stage, _, n = value.partition(":")
    at = int(n)
    if stage == "scan":
        import data_prep.build as build

        real = build._record
        seen = [0]

        def record(*a, **k):
            real(*a, **k)
            seen[0] += 1
            if seen[0] == at:
                _die()

        build._record = record
    elif stage == "write":
        from data_prep.index import Index

        real_rec = Index.record_shard

        def record_shard(self, idx, *a, **k):
            if idx == at:
                _die()
            return real_rec(self, idx, *a, **k)

        Index.record_shard = record_shard
    else:
        raise ValueError(f"shards_kill: stage must be scan or write, got {value!r}")
