"""What a run folder records about where it ran: provenance.json and requeues.json."""
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

import torch

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


def provenance(world_size: int, threads: int) -> dict[str, Any]:
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


def requeue_job(run_dir: Path, max_requeues: int, step: int, reason: str) -> bool:
    """Under SLURM, `scontrol requeue` this job unless `max_requeues` is used up.

    Counts live in RUN/requeues.json ({"count", "history"}) so the cap survives requeues.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        log.info("not under SLURM: exiting after the save; re-run the same command to resume")
        return False
    path = Path(run_dir) / "requeues.json"
    data: dict[str, Any] = {"count": 0, "history": []}
    if path.exists():
        data = json.loads(path.read_text())
    entry = {"time": time.time(), "step": step, "reason": reason, "job_id": job}
    if data["count"] >= max_requeues:
        log.error("requeue cap reached (%d of slurm.max_requeues=%d): not requeueing job %s; "
                  "resubmit by hand to continue from step %d", data["count"], max_requeues, job, step)
        entry["requeued"] = False
        data["history"].append(entry)
        atomic_write_json(path, data)
        return False
    res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    ok = res.returncode == 0
    entry["requeued"] = ok
    if ok:
        data["count"] += 1
        log.warning("requeued SLURM job %s (%d of %d)", job, data["count"], max_requeues)
    else:
        log.error("scontrol requeue %s failed: %s", job, res.stderr.strip())
    data["history"].append(entry)
    atomic_write_json(path, data)
    return ok
