"""The checkpoint folder: step folder names, which ones to try and in what order, what makes
one complete, and purged folders moved aside (see checkpointer.py for how they are written).

Nothing here opens a data file except `verify_step_dir` (tools inspecting one run folder) and
`verify_share` (one rank's share on resume), so listing and ordering cost the same at any
world size.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from seer_pipeline.checkpoint import integrity

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step_(\d{9})$")
TRASH = ".trash."  # folders moved aside by a purge, deleted in the background


class CheckpointError(RuntimeError):
    pass


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def verify_step_dir(path: Path) -> dict[str, Any]:
    """meta.json of a complete checkpoint, after checking every file's recorded size."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: no meta.json (incomplete save)")
    meta = integrity.read_meta(path)
    for name, size in meta["files"].items():
        f = path / name
        if "/" in name or not f.is_file() or f.stat().st_size != size:
            raise CheckpointError(f"{path}: {name} missing or truncated (expected {size} bytes)")
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: no DCP .metadata")
    return meta


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete-looking step dirs (by name), newest first."""
    if not ckpt_dir.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_RE.match(p.name))]
    return sorted(out, reverse=True)


def candidate_order(ckpt_dir: Path) -> list[Path]:
    """Step dirs to try, best first, by name only (no file is opened or stat'ed): `latest`'s
    target, then anything older."""
    order = [p for _, p in list_checkpoints(ckpt_dir)]
    name = integrity.read_latest(ckpt_dir)
    if name:
        target = ckpt_dir / name
        if target in order:
            order = order[order.index(target):]
        else:
            log.warning("checkpoints/latest names %r, which does not exist; scanning", name)
    return order


def find_resumable(ckpt_dir: Path) -> list[tuple[int, Path, dict[str, Any]]]:
    """Verified checkpoints, best first (tools that inspect one run folder; training resumes
    through `Checkpointer.restore`, which opens only what each rank needs).

    Corrupt or incomplete ones are skipped with a warning in favour of the previous one.
    """
    good = []
    for p in candidate_order(ckpt_dir):
        try:
            meta = verify_step_dir(p)
        except (CheckpointError, ValueError, OSError) as e:
            log.warning("skipping checkpoint %s: %s", p, e)
            continue
        good.append((int(meta["step"]), p, meta))
    return good


def read_meta_only(path: Path) -> dict[str, Any]:
    """meta.json of a step dir, without touching its data files (each rank checks its share)."""
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{path}: no meta.json (incomplete save)")
    meta = integrity.read_meta(path)
    if ".metadata" not in meta["files"] and not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: no DCP .metadata")
    return meta


def verify_share(path: Path, meta: dict[str, Any], rank: int, world: int) -> None:
    """This rank's share of a checkpoint's files (file i goes to rank i % world): size, then
    content hash. Together the ranks check every file once; the load agreement spreads a
    failure to all of them."""
    for i, (name, size) in enumerate(sorted(meta["files"].items())):
        if i % world != rank:
            continue
        f = path / name
        if "/" in name or not f.is_file() or f.stat().st_size != size:
            raise CheckpointError(f"{path}: {name} missing or truncated (expected {size} bytes)")
    integrity.verify_hashes(path, meta, rank, world)


def discard(path: Path) -> None:
    """Move a folder aside under a name no save or scan uses (one rename, not a deletion)."""
    try:
        os.replace(path, path.parent / f"{TRASH}{path.name}.{time.time_ns()}")
    except OSError as e:
        log.warning("could not move %s aside for deletion: %s", path, e)


def empty_trash(ckpt_dir: Path) -> None:
    """Background thread: delete what purges moved aside (a 10B checkpoint is hundreds of
    files: on a parallel filesystem, seconds to minutes that no step or preemption waits for)."""
    while trash := list(ckpt_dir.glob(TRASH + "*")):
        for p in trash:
            shutil.rmtree(p, ignore_errors=True)
            if p.exists():
                log.warning("could not delete %s; left for the next purge", p)
                return
