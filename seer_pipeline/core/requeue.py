"""SLURM requeues, in one place: the requeue book RUN/requeues.json and `scontrol requeue`.

The trainer's requeue after a preemption save (`requeue_job`, rank 0) and the launcher's
requeue before training started (launch.job) both book through `book_requeue`, so the count
that `slurm.max_requeues` caps survives requeues and has one record shape and one writer.
`scontrol_requeue` is the only place the project runs `scontrol requeue`. In `core` so that
both the trainer and the torch-free launcher can call it without crossing the layering
(docs/architecture.md): train never imports launch, launch never imports train.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from seer_pipeline.core.io_utils import atomic_write_json

log = logging.getLogger(__name__)

REQUEUES = "requeues.json"
# Ctrl-C (SIGINT: a terminal's, srun's forward of one, `scancel --signal=INT`) is an operator
# stopping the run: it saves and ends like a preemption, but is never requeued, which would start
# it again behind the operator's back. SIGTERM and SIGUSR2 are the scheduler's: requeued.
OPERATOR_STOP = "SIGINT"
# The signals that stop a run with a save, in one place: the trainer's handlers take them
# (train.signals) and loader workers are started deaf to them (data.loader).
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
# `scontrol` talks to slurmctld; a hung controller must not hang a preemption save's exit.
_SCONTROL_TIMEOUT_S = 60.0


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


def scontrol_requeue(job_id: str) -> tuple[bool, str]:
    """`scontrol requeue JOB`: (accepted, slurmctld's message when not)."""
    try:
        res = subprocess.run(["scontrol", "requeue", str(job_id)], capture_output=True, text=True,
                             timeout=_SCONTROL_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as e:
        return False, str(e)
    return res.returncode == 0, res.stderr.strip()


def slurm_fate(job_id: str) -> str:
    """What SLURM is doing with this job, seen from one of its tasks after a SIGTERM.

    "cancelled": `scancel` ended it. Its tasks get the SIGTERM a preemption sends, but the job
    left RUNNING while its restart count is still the one this run started with
    (SLURM_RESTART_COUNT): SLURM is not requeueing it, and requeueing it would bring back a job
    its owner cancelled (found by the chaos soak, seed 1).
    "requeued": the scheduler requeues it already (preemption, `scontrol requeue`): it left
    RUNNING and its restart count moved on (measured on the local SLURM: COMPLETING, Restarts
    0 -> 1). A second `scontrol requeue` then fails with "Job is pending execution".
    "": running, or no answer from slurmctld: a preemption must still requeue."""
    try:
        res = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True,
                             text=True, timeout=_SCONTROL_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return ""
    fields = dict(re.findall(r"(\w+)=(\S*)", res.stdout))
    state, restarts = fields.get("JobState", ""), fields.get("Restarts", "")
    if res.returncode != 0 or not state or not restarts.isdigit() or state == "RUNNING":
        return ""
    own = os.environ.get("SLURM_RESTART_COUNT", "0")
    if restarts == own:
        return "cancelled"
    return "requeued" if own.isdigit() and int(restarts) > int(own) else ""


def requeue_job(run_dir: str | os.PathLike, max_requeues: int, step: int, reason: str) -> bool:
    """Under SLURM, `scontrol requeue` this job unless `max_requeues` is used up, `reason` is
    OPERATOR_STOP, the job was cancelled or SLURM requeues it already; booked either way."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        log.info("not under SLURM: exiting after the save; re-run the same command to resume")
        return False
    count = read_requeues(run_dir)["count"]
    entry = {"time": time.time(), "step": step, "reason": reason, "job_id": job}
    if reason == OPERATOR_STOP:
        log.warning("stopped by Ctrl-C (%s): saved at step %d, not requeueing job %s (an operator's "
                    "stop); re-run the same command to resume", reason, step, job)
        book_requeue(run_dir, entry, requeued=False)
        return False
    fate = slurm_fate(job)
    if fate == "cancelled":
        log.warning("job %s was cancelled (scancel): saved step %d, not requeueing; submit again "
                    "to continue", job, step)
        book_requeue(run_dir, {**entry, "cancelled": True}, requeued=False)
        return False
    if fate == "requeued":  # counted: the cap is on timeouts and preemptions alike
        data = book_requeue(run_dir, {**entry, "by_scheduler": True}, requeued=True)
        log.warning("saved step %d; SLURM is requeueing job %s itself (%d of %d)", step, job,
                    data["count"], max_requeues)
        return True
    if count >= max_requeues:
        log.error("requeue cap reached (%d of slurm.max_requeues=%d): not requeueing job %s; "
                  "resubmit by hand to continue from step %d", count, max_requeues, job, step)
        book_requeue(run_dir, entry, requeued=False)
        return False
    ok, err = scontrol_requeue(job)
    data = book_requeue(run_dir, entry, requeued=ok)
    if ok:
        log.warning("requeued SLURM job %s (%d of %d)", job, data["count"], max_requeues)
    else:
        log.error("scontrol requeue %s failed: %s", job, err)
    return ok
