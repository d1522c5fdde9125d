"""`seer-shards merge PART_DIR... --out DIR`: one shard set from the N `--part I/N` builds.

Shards are moved (renamed, same filesystem; copied otherwise) into DIR and renumbered
contiguously: part 0's shards first, then part 1's, ... Copies of one image in several parts
are dropped (data_prep.dedup): shards holding them are rewritten without them, skipped.tsv
lists them as `duplicate`. The move plan is written before any move, so a merge killed half-way is finished by running it again. The merge holds the same
lock as a build of DIR, refuses a DIR that already holds files unless `force`, and moves only
files that lie in their part's folder with the size and sha256 its manifest records.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections import Counter
from typing import Sequence

from seer_pipeline.core.io_utils import atomic_write_json, fsync_dir
from seer_pipeline.shards import format as fmt

from data_prep import near_build
from data_prep.dedup import cross_part_duplicates
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

    base = _strip(mans[0][1]["config"])
    for p, m in mans:
        if _strip(m["config"]) != base:
            diff = sorted(k for k in base if base.get(k) != _strip(m["config"]).get(k))
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


def merge(parts: Sequence[str], out: str, force: bool = False, workers: int = 1) -> dict:
    """Move every part's shards into `out` and write the combined manifest and skipped.tsv."""
    out_abs = os.path.abspath(out)
    if any(os.path.abspath(p) == out_abs for p in parts):
        raise ValueError("--out must be a new directory, not one of the parts")
    lock = lock_out(out, "merge")
    try:
        return _merge(parts, out, out_abs, force, workers)
    finally:
        os.close(lock)


def _merge(parts: Sequence[str], out: str, out_abs: str, force: bool, workers: int = 1) -> dict:
    plan_path = os.path.join(out, _PLAN)
    if os.path.exists(plan_path):  # a rerun: the parts' shards may already be moved
        plan = _load_plan(plan_path, parts, out_abs, workers)
    else:
        mans, base = _check_parts(parts)
        _clear_out(out, parts, force)
        # near-duplicates across parts: data_prep.near_build rewrites the shards that lose samples
        nx = (near_build.merge_plan(mans, os.path.join(out, STATE), workers) if base.get("dedup") == "near"
              else None)
        plan = _make_plan(mans, base, out_abs, workers, nx)
        atomic_write_json(plan_path, plan)
    drop = plan["drop"]
    for src, dst in plan["moves"]:
        if os.path.exists(dst) and not os.path.exists(src):
            continue  # moved by an earlier, interrupted merge
        if not os.path.exists(src):
            raise FileNotFoundError(f"{src} is gone and {dst} was never written")
        if os.path.basename(dst) in drop:
            _filter(src, dst, set(drop[os.path.basename(dst)]))
        else:
            _move(src, dst)
    fsync_dir(out)
    manifest = plan["manifest"]
    for s in manifest["shards"]:
        if s["name"] in drop:  # rewritten without its dropped copies: record what was written
            path = os.path.join(out, s["name"])
            s.update(bytes=os.path.getsize(path), sha256=fmt.file_sha256(path))
    fmt.write_skipped(os.path.join(out, fmt.SKIPPED),
                      ((fmt.unescape_name(r[0]), r[1], *map(fmt.unescape_name, r[2:])) for r in plan["skipped"]))
    return fmt.write_manifest(out, manifest)


def _filter(src: str, dst: str, drop: set[str]) -> None:
    """Rewrite shard `src` as `dst` without the samples keyed in `drop` (atomic), then remove src."""
    fmt.write_shard(dst, ((k, g["jpg"], g["json"]) for _, k, g in fmt.read_samples(src) if k not in drop))
    os.unlink(src)


def _make_plan(mans: list[tuple[str, dict]], base: dict, out_abs: str, workers: int = 1,
               nx: dict | None = None) -> dict:
    """Every move (part shard -> renumbered name in `out`), the merged manifest and skipped rows:
    a pure function of the parts' manifests and skipped.tsv, so a rerun can recompute it."""
    prefix = base.get("prefix", "shard")
    moves, shards, skipped = [], [], []
    sums: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    # A near merge: near_build groups every copy across parts, byte-identical ones included
    # (same signature), so the exact pass would only count them twice.
    near = nx is not None
    nx = nx or {"replace": {}, "dropped": 0, "skipped": []}
    dups, dup_rows = (cross_part_duplicates([p for p, _ in mans], prefix, workers)
                      if base.get("dedup", True) and not near else ({}, []))
    drop: dict[str, list[str]] = {}  # new shard name -> keys of the copies it loses
    for p, m in mans:
        for s in m["shards"]:
            src = os.path.join(os.path.abspath(p), s["name"])
            r = nx["replace"].get(f"{os.path.abspath(p)}/{s['name']}")
            if r is not None:  # near_build's copy of this shard without the dropped samples
                src, s = r["path"], dict(s, count=r["count"], bytes=r["bytes"], sha256=r["sha256"])
                if not s["count"]:
                    continue
            gone = dups.get((p, s["name"]), [])
            if len(gone) == s["count"]:
                continue  # every sample a copy of one kept elsewhere: no shard
            name = fmt.shard_name(prefix, len(shards))
            moves.append([src, os.path.join(out_abs, name)])
            shards.append(dict(s, name=name, count=s["count"] - len(gone)))
            if gone:
                drop[name] = gone
        for k in ("inputs_seen", "written", "skipped", "duplicates", "excluded"):
            sums[k] += m.get(k, 0)
        reasons.update(m.get("reasons", {}))
        skipped.extend([list(r) for r in fmt.read_skipped(os.path.join(p, fmt.SKIPPED), raw=True, dup=near)])
    if near:
        sums["written"] -= nx["dropped"]
        sums["skipped"] += nx["dropped"]
        reasons["near_duplicate"] += nx["dropped"]
        # a part's row may name a copy that the merge dropped: name the one finally kept
        final = {fmt.escape_name(a): fmt.escape_name(c) for a, _, c in nx["skipped"]}
        skipped = [[r[0], r[1], final.get(r[2], r[2])] for r in skipped]
        skipped.extend([fmt.escape_name(a), b, fmt.escape_name(c)] for a, b, c in nx["skipped"])
    # Copies across parts (data_prep.dedup): skipped as `duplicate`, as a single build skips them.
    sums["written"] -= len(dup_rows)
    sums["skipped"] += len(dup_rows)
    sums["duplicates"] += len(dup_rows)
    if dup_rows:
        reasons["duplicate"] += len(dup_rows)
    skipped.extend(dup_rows)
    manifest = {
        "format": "seer-shards/1",
        **{k: sums[k] for k in ("inputs_seen", "written", "skipped", "duplicates", "excluded")},
        "reasons": dict(sorted(reasons.items())),
        "part": [0, 1],
        "merged_parts": len(mans),
        "dedup_scope": "whole set" if base.get("dedup", True) else "none",
        **({"near_dedup_scope": "merged set"} if near else {}),
        "shards": shards,
        "config": dict(base, part=[0, 1], parts=len(mans)),
    }
    return {"parts": [os.path.abspath(p) for p, _ in mans], "moves": moves, "drop": drop,
            "manifest": manifest, "skipped": skipped, **({"near": nx} if near else {})}


def _near_table(planted: dict, mans: list[tuple[str, dict]], out_abs: str) -> dict:
    """The near-duplicate rewrite table of a planted plan, accepted only where it can do no
    harm: keys are shards of the parts, and every rewritten file lies in OUT's state folder
    under near_build's naming (the rest of the plan is then recomputed and compared)."""
    nx = planted.get("near")
    state = os.path.realpath(os.path.join(out_abs, STATE))
    shards = {f"{os.path.abspath(p)}/{e['name']}" for p, m in mans for e in m["shards"]}
    ok = isinstance(nx, dict) and isinstance(nx.get("replace"), dict) and isinstance(nx.get("dropped"), int)
    ok = ok and isinstance(nx.get("skipped"), list) and all(
        isinstance(r, list) and len(r) == 3 and all(isinstance(x, str) for x in r) for r in nx["skipped"])
    for key, r in (nx.get("replace", {}).items() if ok else ()):
        ok = ok and key in shards and isinstance(r, dict) and isinstance(r.get("path"), str) and \
            os.path.dirname(os.path.realpath(r["path"])) == state and \
            re.fullmatch(r"near-\d{6}\.tar", os.path.basename(r["path"])) is not None and \
            all(isinstance(r.get(k), int) for k in ("count", "bytes")) and isinstance(r.get("sha256"), str)
    if not ok:
        raise ValueError(f"{os.path.join(out_abs, _PLAN)}: its near-duplicate table names files outside "
                         f"{state} or shards of no part; refusing to move anything")
    return nx


def _load_plan(plan_path: str, parts: Sequence[str], out_abs: str, workers: int = 1) -> dict:
    """The plan of an interrupted merge, trusted only as far as it matches the one this merge
    would make: a planted plan file (issue #24) could otherwise rename any file to any place.

    The parts' manifests and skipped.tsv stay in place during a merge, so the plan is recomputed
    from them and the file must agree move for move; every source still in its part folder is
    checked (regular file, size, sha256) as on the first run, and a destination already there
    must be the shard its manifest entry describes."""
    try:
        with open(plan_path, "r", encoding="utf-8") as f:
            planted = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{plan_path}: unreadable merge plan ({e}); remove it and merge into a new folder") from None
    want = sorted(map(os.path.abspath, parts))
    if not isinstance(planted, dict) or sorted(planted.get("parts") or []) != want:
        raise ValueError(f"{os.path.dirname(os.path.dirname(plan_path))} holds a merge of other parts: "
                         f"{planted.get('parts') if isinstance(planted, dict) else planted!r}")
    mans = sorted(((p, fmt.load_manifest(p)) for p in parts), key=lambda pm: pm[1]["part"][0])
    base = _strip(mans[0][1]["config"])
    nx = _near_table(planted, mans, out_abs) if base.get("dedup") == "near" else None
    plan = _make_plan(mans, base, out_abs, workers, nx)
    if planted.get("moves") != plan["moves"] or planted.get("drop") != plan["drop"]:
        raise ValueError(f"{plan_path} does not match the parts' manifests (a move outside the part "
                         "folders or the output?); refusing to move anything")
    by_src = {os.path.join(os.path.abspath(p), e["name"]): (p, e) for p, m in mans for e in m["shards"]}
    by_src.update({r["path"]: (os.path.dirname(r["path"]), dict(r, name=os.path.basename(r["path"])))
                   for r in (nx or {"replace": {}})["replace"].values()})
    for src, dst in plan["moves"]:
        part, e = by_src[src]
        if os.path.lexists(src):
            _check_shard(part, e)
        elif os.path.lexists(dst) and os.path.basename(dst) in plan["drop"]:
            _check_filtered(out_abs, os.path.basename(dst), e["count"], plan["drop"][os.path.basename(dst)])
        elif os.path.lexists(dst):
            _check_shard(out_abs, dict(e, name=os.path.basename(dst)))
    return plan


def _check_filtered(out: str, name: str, count: int, gone: list[str]) -> None:
    """A shard rewritten without its copies: a plain file of `out` holding the rest of its samples."""
    path = os.path.join(out, name)
    if os.path.islink(path) or not os.path.isfile(path):
        raise ValueError(f"{path}: not a file in {out} (a link?)")
    keys = fmt.shard_keys(path)
    if len(keys) != count - len(gone) or set(keys) & set(gone):
        raise ValueError(f"{path}: not the shard this merge wrote ({len(keys)} samples)")


def _strip(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k != "part"}
