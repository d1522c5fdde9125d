"""Is a local shard set there and readable? Asked before a run starts or a job is queued.

Torch-free and import-free (core), so `seer-submit` can ask it on the login node before sbatch,
and `seer-train` before it creates the run folder or starts a rank. It answers for what can be
known cheaply: an empty spec, a missing path, a folder that is not a finished `seer-shards build`
output (no or unreadable manifest.json), listed shard files that are missing or unreadable.
Patterns and remote sets (s3://, https://) are the caller's or the loader's to check.
"""
from __future__ import annotations

import json
import os

MANIFEST = "manifest.json"  # the name data_prep writes (docs/shards-format.md)


def is_pattern(spec: str) -> bool:
    return any(c in spec for c in "{},")


def local_shards_problem(spec: str) -> str:
    """One line saying why `data.shards=spec` cannot be read, or ''."""
    if not spec:
        return ("data.shards is empty: pass data.shards=DIR (a `seer-shards build` output folder) "
                "or a shard pattern")
    if "://" in spec or is_pattern(spec):
        return ""
    if not os.path.exists(spec):
        return f"data.shards={spec}: no such folder or file"
    if not os.path.isdir(spec):
        return "" if os.access(spec, os.R_OK) else f"data.shards={spec}: not readable"
    path = os.path.join(spec, MANIFEST)
    if not os.path.exists(path):
        return (f"data.shards={spec}: the folder has no {MANIFEST} (not a finished "
                "`seer-shards build` output)")
    try:
        with open(path, encoding="utf-8") as f:
            names = [str(e["name"]) for e in json.load(f)["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"data.shards={spec}: cannot read {path}: {e}"
    if not names:
        return f"data.shards={spec}: {path} lists no shards"
    bad = [n for n in names if not os.access(os.path.join(spec, n), os.R_OK)]
    if bad:
        return (f"data.shards={spec}: {len(bad)} of {len(names)} shard file(s) missing or "
                f"unreadable, first: {os.path.join(spec, bad[0])}")
    return ""
