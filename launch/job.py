"""The callable that submitit runs in every SLURM task: the trainer's entry point, by module path.

Preemption belongs to the trainer: once training starts it replaces submitit's SIGUSR2/SIGTERM
handlers with flag-setting ones, all ranks agree at a step boundary, save collectively, and
rank 0 runs `scontrol requeue` itself, counting against `slurm.max_requeues`. So `checkpoint()`
here is only reached while submitit's handler is still installed, i.e. before training started
(nothing to save): it books the requeue in RUN/requeues.json and asks submitit to requeue, or
refuses at the cap. A requeued job reruns this callable, and the trainer resumes from
RUN/checkpoints/latest.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import submitit

from launch import scheduler  # module reference: tests patch scheduler.job_info
from seer_pipeline.checkpoint.integrity import read_latest
from seer_pipeline.core.exit_codes import PREEMPTED
from seer_pipeline.core.requeue import OPERATOR_STOP, book_requeue, read_requeues

DEFAULT_ENTRY = "seer_pipeline.train.cli:main"
# How long a rank that saw PREEMPTED waits for rank 0's `scontrol requeue` to show in the job state.
_REQUEUE_WAIT_S = 15.0


def _logger() -> logging.Logger:
    """Launcher messages on stderr (submitit's per-task .err log), independent of the trainer's setup."""
    lg = logging.getLogger("launch")
    if not any(getattr(h, "_launch", False) for h in lg.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s launch: %(message)s"))
        h._launch = True  # type: ignore[attr-defined]
        lg.addHandler(h)
        lg.setLevel(logging.INFO)
        lg.propagate = False
    return lg


class TrainingFailed(RuntimeError):
    """The entry point returned a non-zero exit code other than PREEMPTED."""


class NotRequeued(RuntimeError):
    """Training saved on a preemption signal but the job will not run again (cap, or no SLURM)."""


def check_entry(entry: str) -> None:
    """Fail at submission, not in the job, if `module:function` cannot be found (no import)."""
    module, sep, func = entry.partition(":")
    if not sep or not module or not func:
        raise ValueError(f"entry must be 'module:function', got {entry!r}")
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"entry module {module!r} not found on sys.path")


def load_entry(entry: str) -> Callable[[list[str]], Any]:
    module, _, func = entry.partition(":")
    return getattr(importlib.import_module(module), func)


def latest_checkpoint(run_dir: str | os.PathLike) -> str:
    """Name of the step directory RUN/checkpoints/latest points to ('' if none or not a step
    folder name: a `latest` symlinked to another file is never echoed)."""
    return read_latest(Path(run_dir) / "checkpoints")


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    return e.code if isinstance(e.code, int) else 1


def _requeue_underway(job_id: str, run_dir: str, since: float, wait_s: float) -> bool:
    """Whether SLURM is requeueing this job (after the trainer saved on a signal).

    While this task still runs, any job state but RUNNING means SLURM is requeueing or killing
    the job (rank 0's `scontrol requeue`, or the scheduler's own preemption). A RUNNING job whose
    rank 0 booked a refused requeue in RUN/requeues.json since this task started will not be.
    """
    deadline = time.monotonic() + wait_s
    while True:
        info = scheduler.job_info(job_id)
        if info is not None and info.state not in ("RUNNING", "UNKNOWN"):
            return True
        mine = [h for h in read_requeues(run_dir)["history"] if isinstance(h, dict)
                and str(h.get("job_id", "")) == job_id and float(h.get("time", 0)) >= since]
        if mine and mine[-1].get("requeued") is False:
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


@dataclass
class TrainJob:
    """Runs `entry(argv)` in one task; pickled by submitit, rerun as-is after a requeue."""

    argv: list[str]
    run_dir: str
    max_requeues: int
    entry: str = DEFAULT_ENTRY
    # Set by checkpoint() when submitit requeues; submitit then exits this task via SystemExit.
    _requeue_requested: bool = field(default=False, init=False, repr=False, compare=False)

    def __call__(self) -> dict[str, Any]:
        from seer_pipeline.distributed.setup import resolve_env  # lazy: imports torch, only inside the task

        log = _logger()
        started = time.time()
        self._requeue_requested = False
        denv = resolve_env()
        log.info("rank %d/%d (%s, job %s): %s %s", denv.rank, denv.world_size, denv.source,
                 denv.job_id or "-", self.entry, " ".join(self.argv))
        _drop_stale_result()
        try:
            rc = load_entry(self.entry)(list(self.argv))
        except SystemExit as e:
            if self._requeue_requested:
                raise  # submitit's handler requeued the job and is ending this task: not a failure
            rc = _exit_code(e)
        except (Exception, KeyboardInterrupt):
            raise
        except BaseException as e:
            # e.g. torch.distributed.checkpoint's CheckpointException: submitit records only
            # Exception subclasses, and the job would look finished without an error.
            raise TrainingFailed(f"{self.entry} raised {type(e).__name__}: {e}") from e
        finally:
            # submitit's USR2 handler is back once the trainer restores its own: a late signal
            # must not requeue a finished run.
            try:
                signal.signal(signal.SIGUSR2, _log_late_signal)
            except ValueError:  # not the main thread (only when called outside submitit)
                pass
        rc = 0 if rc is None else int(rc)
        result = {"rank": denv.rank, "exit_code": rc, "run_dir": self.run_dir,
                  "checkpoint": latest_checkpoint(self.run_dir)}
        if rc == 0:
            return result
        if rc != PREEMPTED:
            raise TrainingFailed(f"{self.entry} exited with code {rc} (see {self.run_dir}/logs/)")
        if denv.source == "slurm" and _requeue_underway(denv.job_id, self.run_dir, started,
                                                           _REQUEUE_WAIT_S):
            log.info("preempted: saved %s; SLURM is requeueing job %s", result["checkpoint"],
                     denv.job_id)
            return {**result, "requeued": True}
        rq = read_requeues(self.run_dir)
        last = rq["history"][-1] if rq["history"] and isinstance(rq["history"][-1], dict) else {}
        why = ("stopped by Ctrl-C (SIGINT), an operator's stop, which is never requeued"
               if last.get("reason") == OPERATOR_STOP and float(last.get("time", 0)) >= started
               else f"requeue cap reached ({rq['count']}/{self.max_requeues} requeues, slurm.max_requeues)"
               if rq["count"] >= self.max_requeues else "no SLURM requeue followed the save")
        raise NotRequeued(
            f"training stopped on a preemption signal and saved {result['checkpoint'] or 'nothing'}"
            f" in {self.run_dir}, but the job was not requeued: {why}. Submit the same command "
            "again (same run.dir) to resume."
        )

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's hook on SIGUSR2, rank 0 only, before the trainer took over the signals.

        Nothing is saved here; the requeued job resumes from the last checkpoint. Returns the
        resubmission, or None at the requeue cap (submitit then ends the job, not requeued).
        """
        log = _logger()
        rq = read_requeues(self.run_dir)
        if rq["count"] >= self.max_requeues:
            log.error("requeue cap reached (%d/%d, slurm.max_requeues): not requeueing; submit "
                      "again with the same run.dir to resume", rq["count"], self.max_requeues)
            return None
        rq = book_requeue(self.run_dir, {
            "time": time.time(), "job_id": os.environ.get("SLURM_JOB_ID", ""),
            "reason": "signal before training started (launch.job.TrainJob.checkpoint)",
            "checkpoint": latest_checkpoint(self.run_dir),
        }, requeued=True)
        self._requeue_requested = True
        log.warning("preemption signal before training started: requeueing (%d/%d)",
                    rq["count"], self.max_requeues)
        return submitit.helpers.DelayedSubmission(self)


def _drop_stale_result() -> None:
    """A requeued job reuses its id: remove this task's result file from the previous run, so
    that a crash of this run is not read as the old run's outcome."""
    try:
        path = submitit.JobEnvironment().paths.result_pickle
    except (RuntimeError, KeyError):  # not inside a submitit job
        return
    path.unlink(missing_ok=True)


def _log_late_signal(signum: int, frame: Any) -> None:
    _logger().warning("ignoring %s: training already finished", signal.Signals(signum).name)
