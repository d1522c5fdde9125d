"""What a run folder records about where it ran: provenance.json and requeues.json.

This module is the one writer of RUN/requeues.json ({"count", "history"}): the trainer's own
requeue after a preemption save and the launcher's requeue before training started
(launch.job) both book through `book_requeue`. Torch-free at import (the launcher reads it).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from seer_pipeline.core.io_utils import atomic_write_json

log = logging.getLogger(__name__)

_PACKAGES = ("torch", "numpy", "webdataset", "submitit", "omegaconf", "Pillow", "Pillow-SIMD")


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip()
        return commit + ("-dirty" if dirty.stdout.strip() else "") if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    # Throughput figures are only comparable on the same CPU: the dev box's host once ran the
    # same code 3.5x slower from one day to the next (docs/demo.md), so runs record it.
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def provenance(world_size: int, threads: int) -> dict[str, Any]:
    import torch  # here, not at import: the launcher imports this module without torch

    versions = {}
    for p in _PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": _git_commit(),
        "packages": versions,
        "pil": "pillow-simd" if "Pillow-SIMD" in versions else "pillow",
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "world_size": world_size,
        "torch_threads": threads,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def record_start(run_dir: Path, world_size: int, threads: int, resumed_from: int | None) -> None:
    """Rank 0: append this start to RUN/provenance.json (the first start is `starts[0]`)."""
    path = Path(run_dir) / "provenance.json"
    data: dict[str, Any] = {"starts": []}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            log.warning("provenance.json unreadable; starting a new one")
    entry = provenance(world_size, threads)
    entry["resumed_from"] = resumed_from
    data.setdefault("starts", []).append(entry)
    data.update({k: v for k, v in entry.items() if k != "resumed_from"})  # latest at top level
    atomic_write_json(path, data)


REQUEUES = "requeues.json"


def read_requeues(run_dir: str | os.PathLike) -> dict[str, Any]:
    """RUN/requeues.json as {"count": n, "history": [...]}; absent gives an empty record, and a
    truncated or foreign one too, with one warning line (a preemption must still requeue)."""
    path = Path(run_dir) / REQUEUES
    empty: dict[str, Any] = {"count": 0, "history": []}
    if not path.exists():
        return empty
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: `[[[[...` (issue #24)
        log.warning("%s unreadable (%s); counting requeues from 0", path, type(e).__name__)
        return empty
    if (not isinstance(data, dict) or not isinstance(data.get("count", 0), int)
            or isinstance(data.get("count"), bool) or not isinstance(data.get("history", []), list)):
        log.warning("%s is not a requeue record; counting requeues from 0", path)
        return empty
    data.setdefault("count", 0)
    data.setdefault("history", [])
    return data


def book_requeue(run_dir: str | os.PathLike, entry: dict[str, Any], requeued: bool) -> dict[str, Any]:
    """Append one requeue decision to RUN/requeues.json (atomically); count it if it requeued."""
    data = read_requeues(run_dir)
    data["history"].append({**entry, "requeued": bool(requeued)})
    if requeued:
        data["count"] += 1
    atomic_write_json(Path(run_dir) / REQUEUES, data)
    return data


def requeue_job(run_dir: Path, max_requeues: int, step: int, reason: str) -> bool:
    """Under SLURM, `scontrol requeue` this job unless `max_requeues` is used up.

    Counts live in RUN/requeues.json ({"count", "history"}) so the cap survives requeues.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        log.info("not under SLURM: exiting after the save; re-run the same command to resume")
        return False
    count = read_requeues(run_dir)["count"]
    entry = {"time": time.time(), "step": step, "reason": reason, "job_id": job}
    if count >= max_requeues:
        log.error("requeue cap reached (%d of slurm.max_requeues=%d): not requeueing job %s; "
                  "resubmit by hand to continue from step %d", count, max_requeues, job, step)
        book_requeue(run_dir, entry, requeued=False)
        return False
    try:
        res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        ok, err = res.returncode == 0, res.stderr.strip()
    except (OSError, subprocess.SubprocessError) as e:
        ok, err = False, str(e)
    data = book_requeue(run_dir, entry, requeued=ok)
    if ok:
        log.warning("requeued SLURM job %s (%d of %d)", job, data["count"], max_requeues)
    else:
        log.error("scontrol requeue %s failed: %s", job, err)
    return ok
