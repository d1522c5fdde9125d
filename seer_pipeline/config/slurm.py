"""SLURM resources of a run: part of the training config so `seer-submit` and the trainer
(which counts its own requeues against `max_requeues`) read the same values."""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Dict, List


@dataclass
class SlurmConfig:
    partition: str = ""  # SLURM partition ("" = cluster default)
    account: str = ""  # --account
    qos: str = ""  # --qos
    constraint: str = ""  # --constraint (e.g. a GPU type)
    nodes: int = 1  # --nodes
    tasks_per_node: int = 1  # one task per GPU
    gpus_per_node: int = 0  # 0 on CPU clusters; usually == tasks_per_node on GPU nodes
    cpus_per_task: int = 2  # data.workers + 1-2 for the rank itself
    mem_gb: int = 0  # 0: let SLURM decide
    timeout_min: int = 60  # job time limit; the run continues across requeued jobs
    exclusive: bool = False  # --exclusive
    job_name: str = "seer"  # --job-name
    # Seconds before the time limit at which SLURM sends USR2 (submitit's default signal);
    # 120 s is dinov2's choice and fits a sharded save of the 10B model on fast storage.
    signal_delay_s: int = 120
    # Cap on automatic requeues (timeouts + preemptions); dinov2 uses 30.
    max_requeues: int = 30
    additional_parameters: Dict[str, Any] = field(default_factory=dict)  # extra sbatch flags
    setup: List[str] = field(default_factory=list)  # shell lines run before the task (module load, ...)


# An sbatch flag name as sbatch spells them (`--mail-type`, `gres`, `exclusive`).
_FLAG = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def has_control(text: str) -> bool:
    """A character that ends or rewrites a line of the batch script: C0/C1 controls (newline,
    carriage return, tab, NUL, ...) and the Unicode line/paragraph separators."""
    return any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in text)


def slurm_errors(slurm: Any) -> list[str]:
    """Every `slurm.*` value that reaches the sbatch script or srun, checked. A newline in a
    string value would inject a line into the script and silently drop the #SBATCH lines after
    it (issue #13): refused with the key's name."""
    get = slurm.get if hasattr(slurm, "get") else lambda k, d=None: getattr(slurm, k, d)
    errs = []
    for key in ("partition", "account", "qos", "constraint", "job_name"):
        if has_control(str(get(key, "") or "")):
            errs.append(f"slurm.{key} contains a control character (newline, tab, ...)")
    if not str(get("job_name", "") or "").strip():
        errs.append("slurm.job_name must not be empty")
    for key in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min"):
        if int(get(key, 1)) < 1:
            errs.append(f"slurm.{key} must be >= 1")
    for key in ("gpus_per_node", "mem_gb", "signal_delay_s", "max_requeues"):
        if int(get(key, 0)) < 0:
            errs.append(f"slurm.{key} must be >= 0")
    for i, line in enumerate(get("setup", None) or []):
        if has_control(str(line)):
            errs.append(f"slurm.setup[{i}] contains a control character (one shell line per entry)")
    for k, v in dict(get("additional_parameters", None) or {}).items():
        if not _FLAG.match(str(k)):
            errs.append(f"slurm.additional_parameters key {str(k)!r} is not an sbatch flag name")
        if isinstance(v, (dict, list)) or has_control(str(v)):
            errs.append(f"slurm.additional_parameters.{k} must be one line of text, a number or a bool")
    return errs
