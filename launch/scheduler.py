"""Asking SLURM about jobs with squeue/scontrol (never sacct: clusters without accounting lack it).

Every call has a timeout: a hung slurmctld must not hang `seer-status` or a test.
"""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass

from seer_pipeline.core.requeue import scontrol_requeue

log = logging.getLogger(__name__)

_TIMEOUT_S = 20.0
# States after which a job will not run again without a user's action.
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED",
})


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, ... ("UNKNOWN" once SLURM forgot it)
    restarts: int = 0  # SLURM's own requeue count of this job id
    exit_code: str = ""  # "rc:signal", as scontrol prints it
    reason: str = ""

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


def _run(cmd: list[str], timeout: float = _TIMEOUT_S) -> subprocess.CompletedProcess[str] | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("%s failed: %s", " ".join(cmd), e)
        return None


def slurm_available(timeout: float = 10.0) -> tuple[bool, str]:
    """Whether a slurmctld answers (`scontrol ping`), with the reason when it does not."""
    if shutil.which("scontrol") is None:
        return False, "scontrol not found (apt-get install slurm-wlm munge)"
    res = _run(["scontrol", "ping"], timeout=timeout)
    if res is None:
        return False, f"scontrol ping did not answer within {timeout:.0f} s"
    if res.returncode == 0 and "is UP" in res.stdout:
        return True, "slurmctld is UP"
    why = (res.stdout + res.stderr).strip().splitlines()
    return False, "slurmctld is not answering: " + (why[0] if why else f"rc {res.returncode}")


def _parse_scontrol(text: str) -> dict[str, str]:
    """`Key=Value` pairs of `scontrol show job` (values without spaces are all we read)."""
    return dict(re.findall(r"(\w+)=(\S*)", text))


def job_info(job_id: str) -> JobInfo | None:
    """State of one job, or None if SLURM cannot be asked. UNKNOWN once MinJobAge passed."""
    res = _run(["scontrol", "show", "job", str(job_id)])
    if res is None:
        return None
    if res.returncode != 0:
        if "Invalid job id" in res.stderr:
            return JobInfo(str(job_id), "UNKNOWN", reason="no longer known to slurmctld")
        return None
    kv = _parse_scontrol(res.stdout)
    return JobInfo(
        job_id=str(job_id),
        state=kv.get("JobState", "UNKNOWN"),
        restarts=int(kv.get("Restarts", "0") or 0),
        exit_code=kv.get("ExitCode", ""),
        reason=kv.get("Reason", ""),
    )


def cancel(job_id: str, signal_name: str | None = None) -> bool:
    """scancel a job (or only send it a signal); True if scancel accepted."""
    cmd = ["scancel"] + ([f"--signal={signal_name}"] if signal_name else []) + [str(job_id)]
    res = _run(cmd)
    return res is not None and res.returncode == 0


def requeue(job_id: str) -> bool:
    """`scontrol requeue`: what a preempting scheduler does (SIGTERM, KillWait, requeue)."""
    ok, err = scontrol_requeue(job_id)
    if not ok:
        log.warning("scontrol requeue %s: %s", job_id, err)
    return ok


def kill_wait_s() -> int:
    """The cluster's KillWait (`scontrol show config`): seconds between SIGTERM and SIGKILL."""
    res = _run(["scontrol", "show", "config"])
    for line in (res.stdout if res is not None else "").splitlines():
        if line.split("=")[0].strip() == "KillWait":
            return int(line.split("=", 1)[1].split()[0])
    raise RuntimeError("KillWait not in `scontrol show config`")


def sbatch_test_only(script_path: str) -> tuple[bool, str]:
    """`sbatch --test-only SCRIPT`: does the scheduler accept it (nothing is submitted)."""
    return sbatch_test_only_args([script_path])


def sbatch_test_only_args(args: list[str]) -> tuple[bool, str]:
    """`sbatch --test-only ARGS...` (options, then the script and its arguments)."""
    res = _run(["sbatch", "--test-only", *args])
    if res is None:
        return False, "sbatch not available or timed out"
    text = (res.stdout + res.stderr).strip()
    return res.returncode == 0, text
