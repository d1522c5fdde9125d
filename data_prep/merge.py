"""`seer-shards merge PART_DIR... --out DIR`: one shard set from the N `--part I/N` builds.

Shards are moved (renamed, same filesystem; copied otherwise) into DIR and renumbered
contiguously: part 0's shards first, then part 1's, ... The move plan is written before any
move, so a merge killed half-way is finished by running it again. The merge holds the same
lock as a build of DIR, refuses a DIR that already holds files unless `force`, and moves only
files that lie in their part's folder with the size and sha256 its manifest records.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from collections import Counter
from typing import Sequence

from seer_pipeline.core.io_utils import atomic_write_json, fsync_dir
from seer_pipeline.shards import format as fmt

from data_prep import near_build
from data_prep.lock import STATE, lock_out

_PLAN = os.path.join(STATE, "merge-plan.json")


def _check_parts(parts: Sequence[str]) -> tuple[list[tuple[str, dict]], dict]:
    mans = [(p, fmt.load_manifest(p)) for p in parts]
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
    for p, m in mans:
        for e in m["shards"]:
            _check_shard(p, e)
    return sorted(mans, key=lambda pm: pm[1]["part"][0]), base


def _check_shard(part: str, e: dict) -> None:
    """A part's shard must be a regular file in the part's own folder, as its manifest records it."""
    path = os.path.join(part, e["name"])  # the manifest check already refused names with a path
    real = os.path.realpath(path)
    if os.path.dirname(real) != os.path.realpath(part) or os.path.islink(path):
        raise ValueError(f"{path}: not a file in the part folder {part} (a link?)")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: listed in {part}'s manifest but missing or not a file")
    size = os.path.getsize(path)
    if "bytes" not in e or "sha256" not in e or size != e["bytes"]:
        raise ValueError(f"{path}: {size} bytes, manifest says {e.get('bytes')}")
    if fmt.file_sha256(path) != e["sha256"]:
        raise ValueError(f"{path}: sha256 differs from {part}'s manifest")


def _clear_out(out: str, parts: Sequence[str], force: bool) -> None:
    """Refuse an output that holds anything but our state folder and the parts being merged
    (slurm/shards-array.sbatch builds them in OUT/parts); with `force`, drop a previous set."""
    holders = {os.path.relpath(os.path.abspath(p), os.path.abspath(out)).split(os.sep)[0] for p in parts}
    there = sorted(fn for fn in os.listdir(out) if fn != STATE and fn not in holders)
    if not there:
        return
    if not force:
        raise ValueError(f"{out} is not empty ({', '.join(there[:3])}{', ...' if len(there) > 3 else ''}); "
                         "merge into a new folder, or pass --force to replace its shard set")
    old = []
    try:
        old = [e["name"] for e in fmt.load_manifest(out)["shards"]]
    except (OSError, ValueError):
        pass
    for fn in set(old) | {fmt.MANIFEST, fmt.SKIPPED}:  # only what a shard set consists of
        try:
            os.unlink(os.path.join(out, fn))
        except FileNotFoundError:
            pass


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


def merge(parts: Sequence[str], out: str, force: bool = False) -> dict:
    """Move every part's shards into `out` and write the combined manifest and skipped.tsv."""
    out_abs = os.path.abspath(out)
    if any(os.path.abspath(p) == out_abs for p in parts):
        raise ValueError("--out must be a new directory, not one of the parts")
    lock = lock_out(out, "merge")
    try:
        return _merge(parts, out, out_abs, force)
    finally:
        os.close(lock)


def _merge(parts: Sequence[str], out: str, out_abs: str, force: bool) -> dict:
    plan_path = os.path.join(out, _PLAN)
    if os.path.exists(plan_path):  # a rerun: the parts' shards may already be moved

        with open(plan_path, "r", encoding="utf-8") as f:
            plan = json.load(f)
        if sorted(plan["parts"]) != sorted(out_p for out_p in map(os.path.abspath, parts)):
            raise ValueError(f"{out} holds a merge of other parts: {plan['parts']}")
    else:
        mans, base = _check_parts(parts)
        _clear_out(out, parts, force)
        prefix = base.get("prefix", "shard")
        moves, shards, skipped = [], [], []
        sums: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        near = base.get("dedup") == "near"
        # near-duplicates across parts: data_prep.near_build rewrites the shards that lose samples
        nx = near_build.merge_plan(mans, os.path.join(out, STATE)) if near else {"replace": {}}
        for p, m in mans:
            for s in m["shards"]:
                src = os.path.join(os.path.abspath(p), s["name"])
                if f"{os.path.abspath(p)}/{s['name']}" in nx["replace"]:
                    r = nx["replace"][f"{os.path.abspath(p)}/{s['name']}"]
                    src, s = r["path"], dict(s, count=r["count"], bytes=r["bytes"], sha256=r["sha256"])
                    if not s["count"]:
                        continue
                name = fmt.shard_name(prefix, len(shards))
                moves.append([src, os.path.join(out_abs, name)])
                shards.append(dict(s, name=name))
            for k in ("inputs_seen", "written", "skipped", "duplicates", "excluded"):
                sums[k] += m.get(k, 0)
            reasons.update(m.get("reasons", {}))
            skipped.extend(fmt.read_skipped(os.path.join(p, fmt.SKIPPED), raw=True, dup=near))
        if near:
            sums["written"] -= nx["dropped"]
            sums["skipped"] += nx["dropped"]
            reasons["near_duplicate"] += nx["dropped"]
            # a part's row may name a copy that the merge dropped: name the one finally kept
            final = {fmt.escape_name(a): fmt.escape_name(c) for a, _, c in nx["skipped"]}
            skipped = [[r[0], r[1], final.get(r[2], r[2])] for r in skipped]
            skipped.extend([fmt.escape_name(a), b, fmt.escape_name(c)] for a, b, c in nx["skipped"])
        manifest = {
            "format": "seer-shards/1",
            **{k: sums[k] for k in ("inputs_seen", "written", "skipped", "duplicates", "excluded")},
            "reasons": dict(sorted(reasons.items())),
            "part": [0, 1],
            "merged_parts": len(mans),
            # Dedup ran inside each part only: the same bytes under two paths may land in two parts.
            "dedup_scope": "per part",
            **({"near_dedup_scope": "merged set"} if near else {}),
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
    fmt.write_skipped(os.path.join(out, fmt.SKIPPED), 
                      ((fmt.unescape_name(r[0]), r[1], *map(fmt.unescape_name, r[2:])) for r in plan["skipped"]))
    return fmt.write_manifest(out, plan["manifest"])
