"""From the `slurm` config section to a submitit executor (SLURM or local), and back to text.

One task per GPU; logs and submitit's pickles go to RUN/slurm/<job id>/. The generated sbatch
script is what `seer-submit --dry-run` prints, so what a user reviews is what would be submitted.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import submitit
from omegaconf import DictConfig, OmegaConf

from seer_pipeline.config.slurm import has_control, slurm_errors

log = logging.getLogger(__name__)

# Extra sbatch flags set unless the user's `slurm.additional_parameters` overrides them.
_DEFAULT_SBATCH_FLAGS: dict[str, Any] = {
    # Requeue on preemption/node failure even where the cluster's JobRequeue default is 0.
    "requeue": True,
}
# A task that dies kills its step at once instead of leaving its peers in a collective until
# the gloo/NCCL timeout.
_SRUN_ARGS = ["--kill-on-bad-exit=1"]


def _as_dict(slurm: Any) -> dict[str, Any]:
    if isinstance(slurm, DictConfig):
        return OmegaConf.to_container(slurm, resolve=True)  # type: ignore[return-value]
    if isinstance(slurm, Mapping):
        return dict(slurm)
    return dict(vars(slurm))


def executor_parameters(slurm: Any) -> dict[str, Any]:
    """AutoExecutor parameters (generic names + `slurm_` ones) for a SlurmConfig-shaped section."""
    s = _as_dict(slurm)
    errs = slurm_errors(s)
    if errs:  # every value that reaches the script or srun, also when called directly
        raise ValueError("invalid slurm config: " + "; ".join(errs))
    if s["nodes"] < 1 or s["tasks_per_node"] < 1 or s["cpus_per_task"] < 1:
        raise ValueError("slurm.nodes, slurm.tasks_per_node and slurm.cpus_per_task must be >= 1")
    if s["timeout_min"] < 1:
        raise ValueError("slurm.timeout_min must be >= 1")
    if not 0 <= s["signal_delay_s"] < s["timeout_min"] * 60:
        raise ValueError(
            f"slurm.signal_delay_s={s['signal_delay_s']} must be in [0, timeout_min*60): the signal "
            "has to arrive before the time limit"
        )
    params: dict[str, Any] = {
        "name": s["job_name"],
        "nodes": int(s["nodes"]),
        "tasks_per_node": int(s["tasks_per_node"]),
        "cpus_per_task": int(s["cpus_per_task"]),
        "timeout_min": int(s["timeout_min"]),
        "slurm_signal_delay_s": int(s["signal_delay_s"]),
        "slurm_srun_args": list(_SRUN_ARGS),
        "slurm_additional_parameters": {**_DEFAULT_SBATCH_FLAGS,
                                        **dict(s.get("additional_parameters") or {})},
    }
    if s.get("gpus_per_node"):
        params["gpus_per_node"] = int(s["gpus_per_node"])
    if s.get("mem_gb"):
        params["mem_gb"] = float(s["mem_gb"])
    for key in ("partition", "account", "qos", "constraint"):
        if s.get(key):
            params[f"slurm_{key}"] = str(s[key])
    if s.get("exclusive"):
        params["slurm_exclusive"] = True
    if s.get("setup"):
        params["slurm_setup"] = list(s["setup"])
    return params


def job_folder(run_dir: str | Path) -> Path:
    """Where submitit writes a job's pickles and per-task logs (%j: the SLURM job id)."""
    return Path(run_dir) / "slurm" / "%j"


def build_executor(slurm: Any, run_dir: str | Path, local: bool = False) -> submitit.AutoExecutor:
    """A submitit AutoExecutor for the run: SLURM, or the LocalExecutor for debugging."""
    s = _as_dict(slurm)
    params = executor_parameters(s)
    if local:
        if s["nodes"] != 1:
            raise ValueError("--local runs on this machine: slurm.nodes must be 1")
        ex = submitit.AutoExecutor(folder=job_folder(run_dir), cluster="local")
        # The local executor takes only the generic keys it understands.
        ex.update_parameters(timeout_min=params["timeout_min"],
                             tasks_per_node=params["tasks_per_node"], nodes=1)
        return ex
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise RuntimeError("SLURM client tools (sbatch, srun) not found: run on a SLURM login "
                           "node, or use --local to debug on this machine")
    # submitit's own timeout requeue counter gets the same cap as the trainer's.
    ex = submitit.AutoExecutor(folder=job_folder(run_dir), cluster="slurm",
                               slurm_max_num_timeout=int(s["max_requeues"]))
    ex.update_parameters(**params)
    return ex


def sbatch_script(executor: submitit.AutoExecutor) -> str:
    """The exact batch script this SLURM executor would hand to sbatch."""
    inner = executor._executor
    if not isinstance(inner, submitit.SlurmExecutor):
        raise TypeError("sbatch_script needs a SLURM executor (not --local)")
    return inner._make_submission_file_text(inner._submitit_command_str, uid="dry-run")


def describe_resources(slurm: Any) -> str:
    """One human-readable paragraph of what the job asks for."""
    s = _as_dict(slurm)
    tasks = s["nodes"] * s["tasks_per_node"]
    lines = [
        f"nodes={s['nodes']} tasks/node={s['tasks_per_node']} (one per GPU) -> {tasks} ranks",
        f"cpus/task={s['cpus_per_task']} gpus/node={s.get('gpus_per_node', 0)} "
        f"mem={str(s['mem_gb']) + 'GB' if s.get('mem_gb') else 'site default (slurm.mem_gb=0)'}",
        f"time limit={s['timeout_min']} min, USR2 {s['signal_delay_s']} s before it, "
        f"max requeues={s['max_requeues']}",
        f"partition={s.get('partition') or '(default)'} account={s.get('account') or '-'} "
        f"qos={s.get('qos') or '-'} constraint={s.get('constraint') or '-'} "
        f"exclusive={bool(s.get('exclusive'))}",
    ]
    return "\n".join(lines)


# What a rank reads from its environment at start-up, beyond SLURM's own variables: the
# interfaces NCCL and gloo bind to (gloo serves the async checkpoint's group on GPU runs and the
# whole run on CPU), NCCL/torch tuning, the GPUs and threads a task sees, the interpreter.
_RANK_ENV_PREFIXES = ("NCCL_", "GLOO_", "TORCH_", "TP_SOCKET_")
_RANK_ENV = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "PYTHONPATH", "SEER_PYTHON")
# A multi-NIC node picks the interface by itself for neither library (docs/slurm.md).
_IFNAME = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")
# resolve_env prefers these over the SLURM-derived rendezvous: a stale value breaks the job.
_OVERRIDES = ("MASTER_ADDR", "MASTER_PORT")


def describe_environment(slurm: Any, environ: Mapping[str, str] | None = None) -> str:
    """Which of the submitting shell's variables reach every task, as `--dry-run` prints them.

    sbatch exports the whole environment of the shell that runs `seer-submit` (`--export=ALL`,
    SLURM's default, which submitit keeps) unless `slurm.additional_parameters.export` narrows it.
    """
    env = os.environ if environ is None else environ
    export = str(dict(_as_dict(slurm).get("additional_parameters") or {}).get("export", "ALL"))
    if export.upper().split(",")[0] != "ALL":
        head = (f"environment: only what --export={export} names reaches the tasks (plus SLURM_*); "
                "the variables below are passed only if listed there")
    else:
        head = "environment: this shell's whole environment reaches every task (sbatch --export=ALL)"
    seen = sorted(k for k in env if k.startswith(_RANK_ENV_PREFIXES) or k in _RANK_ENV + _OVERRIDES)
    # ascii() for a value with a newline: this text becomes comment lines of the batch script.
    shown = [f"{k}={ascii(env[k]) if has_control(env[k]) else env[k]}" for k in seen]
    lines = [head, "passed on: " + (" ".join(shown) or "(none of note)")]
    unset = [k for k in _IFNAME if k not in env]
    if unset:
        lines.append(f"not set: {' '.join(unset)} (multi-NIC nodes: name the interface ranks "
                     "reach each other on, docs/slurm.md)")
    for k in _OVERRIDES:
        if k in env:
            lines.append(f"warning: {k} is set and overrides the rendezvous derived from the job; "
                         "unset it unless you mean it")
    return "\n".join(lines)
