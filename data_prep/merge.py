"""`seer-shards merge PART_DIR... --out DIR`: one shard set from the N `--part I/N` builds.

Shards are moved (renamed, same filesystem; copied otherwise) into DIR and renumbered
contiguously: part 0's shards first, then part 1's, ... The move plan is written before any
move, so a merge killed half-way is finished by running it again.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from collections import Counter
from typing import Sequence

from seer_pipeline.core.io_utils import atomic_write_json, atomic_write_text, fsync_dir

from data_prep.verify import load_manifest

_PLAN = os.path.join(".seer-shards", "merge-plan.json")


def _check_parts(parts: Sequence[str]) -> tuple[list[tuple[str, dict]], dict]:
    mans = [(p, load_manifest(p)) for p in parts]
    n = {tuple(m["part"])[1] for _, m in mans}
    if len(n) != 1:
        raise ValueError(f"parts disagree on N: {sorted(n)}")
    (total,) = n
    by_i: dict[int, str] = {}
    for p, m in mans:
        i = m["part"][0]
        if i in by_i:
            raise ValueError(f"part {i}/{total} given twice: {by_i[i]} and {p}")
        by_i[i] = p
    missing = [i for i in range(total) if i not in by_i]
    if missing:
        raise ValueError(f"missing parts (of {total}): {missing}")

    def strip(cfg: dict) -> dict:
        return {k: v for k, v in cfg.items() if k != "part"}

    base = strip(mans[0][1]["config"])
    for p, m in mans:
        if strip(m["config"]) != base:
            diff = sorted(k for k in base if base.get(k) != strip(m["config"]).get(k))
            raise ValueError(f"{p} was built with other options: {diff}")
    return sorted(mans, key=lambda pm: pm[1]["part"][0]), base


def _move(src: str, dst: str) -> None:
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.tmp")
        shutil.copyfile(src, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
        os.unlink(src)


def merge(parts: Sequence[str], out: str) -> dict:
    """Move every part's shards into `out` and write the combined manifest and skipped.tsv."""
    out_abs = os.path.abspath(out)
    if any(os.path.abspath(p) == out_abs for p in parts):
        raise ValueError("--out must be a new directory, not one of the parts")
    os.makedirs(os.path.join(out, ".seer-shards"), exist_ok=True)
    plan_path = os.path.join(out, _PLAN)
    if os.path.exists(plan_path):  # a rerun: the parts' shards may already be moved

        with open(plan_path, "r", encoding="utf-8") as f:
            plan = json.load(f)
        if sorted(plan["parts"]) != sorted(out_p for out_p in map(os.path.abspath, parts)):
            raise ValueError(f"{out} holds a merge of other parts: {plan['parts']}")
    else:
        mans, base = _check_parts(parts)
        prefix = base.get("prefix", "shard")
        moves, shards, skipped = [], [], ["source\treason"]
        sums: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        for p, m in mans:
            for s in m["shards"]:
                name = f"{prefix}-{len(shards):06d}.tar"
                moves.append([os.path.join(os.path.abspath(p), s["name"]), os.path.join(out_abs, name)])
                shards.append(dict(s, name=name))
            for k in ("inputs_seen", "written", "skipped", "duplicates", "excluded"):
                sums[k] += m.get(k, 0)
            reasons.update(m.get("reasons", {}))
            with open(os.path.join(p, "skipped.tsv"), "r", encoding="utf-8") as f:
                skipped.extend(line.rstrip("\n") for line in list(f)[1:] if line.strip())
        manifest = {
            "format": "seer-shards/1",
            **{k: sums[k] for k in ("inputs_seen", "written", "skipped", "duplicates", "excluded")},
            "reasons": dict(sorted(reasons.items())),
            "part": [0, 1],
            "merged_parts": len(mans),
            # Dedup ran inside each part only: the same bytes under two paths may land in two parts.
            "dedup_scope": "per part",
            "shards": shards,
            "config": dict(base, part=[0, 1], parts=len(mans)),
        }
        plan = {"parts": [os.path.abspath(p) for p, _ in mans], "moves": moves, "manifest": manifest,
                "skipped": skipped}
        atomic_write_json(plan_path, plan)
    for src, dst in plan["moves"]:
        if os.path.exists(dst) and not os.path.exists(src):
            continue  # moved by an earlier, interrupted merge
        if not os.path.exists(src):
            raise FileNotFoundError(f"{src} is gone and {dst} was never written")
        _move(src, dst)
    fsync_dir(out)
    atomic_write_text(os.path.join(out, "skipped.tsv"), "\n".join(plan["skipped"]) + "\n")
    atomic_write_json(os.path.join(out, "manifest.json"), plan["manifest"])
    return plan["manifest"]
