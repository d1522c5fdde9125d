"""SLURM resources of a run: part of the training config so `seer-submit` and the trainer
(which counts its own requeues against `max_requeues`) read the same values."""
from __future__ import annotations

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
