"""What a run folder records about where it ran: RUN/provenance.json, one entry per start.

(RUN/requeues.json, the requeue book, lives with `scontrol requeue` in seer_pipeline.core.requeue.)
Torch-free at import.
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
