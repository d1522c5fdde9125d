"""`seer-submit --config PRESET [key=value ...] [--dry-run] [--local]`: start training on SLURM.

The config is loaded with the trainer's own loader (unknown keys fail here, before anything is
queued); its `slurm` section sizes the job. Every task runs `seer_pipeline.train.cli:main` with
`--config PRESET overrides... run.dir=ABS`, so a requeued job, which reruns the same pickled
callable, resumes from the same run folder.

One job per run folder: a folder whose lock (seer_pipeline.core.runlock) is held, or whose last
recorded SLURM job is still pending or running, is refused unless `--after-holder` queues the
new job behind that one (`--dependency=afterany:JOB`). Torch-free: `--dry-run` starts fast.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from launch.executor import build_executor, describe_environment, describe_resources, sbatch_script
from launch.job import DEFAULT_ENTRY, TrainJob, check_entry
from launch import scheduler  # module reference: tests patch scheduler.job_info
from seer_pipeline.core import runlock
from seer_pipeline.core.exit_codes import USAGE
from seer_pipeline.core.io_utils import atomic_write_json
from seer_pipeline.core.shard_check import local_shards_problem

log = logging.getLogger(__name__)
LAUNCH_RECORD = "launch.json"  # RUN/launch.json: the jobs submitted for this run, newest last


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seer-submit",
        description="Submit SEER training to SLURM with submitit (slurm.* keys size the job).",
    )
    p.add_argument("--config", required=True, help="preset name (e.g. seer_32gf) or a .yaml path")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. slurm.nodes=8)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the sbatch script and resources; submit nothing")
    p.add_argument("--local", action="store_true",
                   help="run with submitit's LocalExecutor on this machine and wait for it")
    p.add_argument("--entry", default=DEFAULT_ENTRY,
                   help="training entry point as module:function, called with the argv list")
    p.add_argument("--after-holder", action="store_true",
                   help="if another SLURM job owns run.dir, queue this one to start after it ends "
                        "(--dependency=afterany:JOB) instead of refusing")
    return p


class RunFolderBusy(RuntimeError):
    """run.dir belongs to a live or queued job and --after-holder was not given (or cannot work)."""


def _live_recorded_job(run_dir: Path) -> dict[str, Any] | None:
    """The last SLURM job RUN/launch.json records, if slurmctld says it may still run."""
    try:
        jobs = json.loads((run_dir / LAUNCH_RECORD).read_text()).get("jobs", [])
    except (OSError, ValueError, AttributeError):
        return None
    last = jobs[-1] if jobs and isinstance(jobs[-1], dict) else None
    if not last or last.get("executor") != "slurm" or not last.get("job_id"):
        return None
    info = scheduler.job_info(str(last["job_id"]))
    if info is None or info.state == "UNKNOWN" or info.state.split()[0] in scheduler.FINAL_STATES:
        return None
    return {"job_id": str(last["job_id"]), "host": "(queued: " + info.state + ")", "pid": "-"}


def holder_dependency(run_dir: str | Path, after_holder: bool, local: bool = False) -> str:
    """'' when run.dir is free, 'afterany:JOB' to queue behind its holder, or RunFolderBusy."""
    run = Path(run_dir)
    if not run.is_dir():
        return ""
    holder = runlock.holder_if_locked(run)
    if holder is None and not local:
        holder = _live_recorded_job(run)
    if holder is None:
        return ""
    who = runlock.describe(holder)
    if not after_holder:
        raise RunFolderBusy(f"run folder {run} is in use by {who}; pass --after-holder to queue "
                            "behind it, or use another run.dir")
    job = str(holder.get("job_id") or "")
    if local or not job.isdigit():
        raise RunFolderBusy(f"run folder {run} is in use by {who}, which is not a SLURM job this "
                            "submission could depend on; wait for it to end")
    return f"afterany:{job}"


def build_job(preset: str, overrides: Sequence[str], entry: str = DEFAULT_ENTRY) -> tuple[Any, TrainJob]:
    """Load the config and make the task callable; run.dir becomes absolute for every task."""
    from seer_pipeline.config.train import load_train_config  # lazy: config only, no model code

    cfg = load_train_config(preset, list(overrides))
    run_dir = Path(cfg.run.dir).expanduser().resolve()
    kept = [o for o in overrides if not o.split("=", 1)[0].strip() == "run.dir"]
    config_arg = str(Path(preset).resolve()) if Path(preset).suffix in (".yaml", ".yml") else preset
    argv = ["--config", config_arg, *kept, f"run.dir={run_dir}"]
    check_entry(entry)
    return cfg, TrainJob(argv=argv, run_dir=str(run_dir), max_requeues=int(cfg.slurm.max_requeues),
                         entry=entry)


def record_submission(run_dir: str | Path, entry: dict[str, Any]) -> None:
    """Append a job to RUN/launch.json (atomically), so seer-status knows whom to ask."""
    path = Path(run_dir) / LAUNCH_RECORD
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {"jobs": []}
    data.setdefault("jobs", []).append(entry)
    atomic_write_json(path, data)


def _dry_run(cfg: Any, job: TrainJob, dependency: str = "") -> int:
    ex = build_executor(cfg.slurm, job.run_dir)
    if dependency:
        ex.update_parameters(slurm_dependency=dependency)
    script = sbatch_script(ex).splitlines()
    header = ["# seer-submit --dry-run: nothing was submitted. Resources:"]
    header += [f"#   {line}" for line in describe_resources(cfg.slurm).splitlines()]
    header += [f"#   each task runs {job.entry}({shlex.join(job.argv)})"]
    header += [f"#   {line}" for line in describe_environment(cfg.slurm).splitlines()]
    # Comments after the shebang keep the whole output a valid sbatch script.
    print("\n".join([script[0], *header, *script[1:]]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # Intermixed: overrides may sit on both sides of a flag (`--config X a=1 --dry-run b=2`).
    args = _parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg, job = build_job(args.config, args.overrides, args.entry)
    except (ValueError, OSError) as e:  # ConfigError is a ValueError
        print(f"seer-submit: {e}", file=sys.stderr)
        return USAGE
    # A training job that cannot start is not queued (the path as this host sees it); a dry run
    # only warns, and another --entry may not read data.shards at all.
    problem = local_shards_problem(str(cfg.data.shards or "")) if job.entry == DEFAULT_ENTRY else ""
    if problem and args.dry_run:
        print(f"seer-submit: warning: {problem}; the job would fail at start", file=sys.stderr)
    elif problem:
        print(f"seer-submit: {problem}", file=sys.stderr)
        return USAGE
    if args.dry_run and args.local:
        print("seer-submit: --dry-run shows a SLURM script; drop --local", file=sys.stderr)
        return USAGE
    try:
        dependency = holder_dependency(job.run_dir, args.after_holder, args.local) if cfg.run.lock else ""
    except (RunFolderBusy, runlock.RunLockError, OSError) as e:
        print(f"seer-submit: {e}", file=sys.stderr)
        return USAGE
    if dependency:
        print(f"seer-submit: run.dir is in use; this job waits for it ({dependency})", file=sys.stderr)
    if args.dry_run:
        return _dry_run(cfg, job, dependency)
    try:
        ex = build_executor(cfg.slurm, job.run_dir, local=args.local)
        if dependency:
            ex.update_parameters(slurm_dependency=dependency)
    except (ValueError, RuntimeError) as e:
        print(f"seer-submit: {e}", file=sys.stderr)
        return USAGE
    created = not Path(job.run_dir).exists()
    Path(job.run_dir).mkdir(parents=True, exist_ok=True)
    try:
        submitted = ex.submit(job)
    except Exception as e:  # submitit's FailedJobError carries sbatch's own message
        if created:  # submitit wrote its job files into the folder; nothing was queued
            shutil.rmtree(job.run_dir, ignore_errors=True)
        print(f"seer-submit: submission failed: {e}", file=sys.stderr)
        return 1
    job_id = str(submitted.job_id)
    record_submission(job.run_dir, {
        "job_id": job_id, "executor": "local" if args.local else "slurm",
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "entry": job.entry,
        "argv": job.argv, "folder": str(Path(job.run_dir) / "slurm" / job_id),
        "cwd": os.getcwd(),
    })
    out = Path(job.run_dir) / "slurm" / job_id / f"{job_id}_0_log.out"
    print(f"job {job_id}", flush=True)
    print(f"follow the logs:  tail -F {out} {Path(job.run_dir) / 'logs' / 'rank0.log'}")
    print(f"status:           seer-status {job.run_dir}")
    if not args.local:
        return 0
    # --local is for debugging: wait here and report the result (or the task's traceback).
    try:
        results = submitted.results()
    except KeyboardInterrupt:
        submitted.cancel()
        return 130
    except Exception as e:  # submitit re-raises the task's failure with its traceback
        print(f"seer-submit: local job {job_id} failed: {e}", file=sys.stderr)
        return 1
    print(f"local job {job_id} finished: {results[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
