"""`seer-status RUN`: job state, last checkpoint, restarts and the last metrics line of a run.

The job state comes from SLURM (scontrol) when RUN/launch.json records a job id and slurmctld
answers; otherwise from files (submitit's result pickle, read through the restricted unpickler
so a planted file cannot run code, or "not running" with the last step).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from launch.job import latest_checkpoint, read_requeues
from launch.scheduler import job_info
from launch.submit import LAUNCH_RECORD
from seer_pipeline.core import runlock
from seer_pipeline.core.safe_pickle import UnsafePickleError, load_submitit_result


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_lines(path: Path, max_bytes: int = 1 << 16) -> list[str]:
    """The tail of a (possibly large, possibly being written) text file, as complete lines."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = data.splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first line may be cut
    return [ln for ln in lines if ln.strip()]


def _metrics(run: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(last metrics record, last record carrying `resumed_from`) of RUN/metrics.jsonl."""
    last = resumed = None
    for line in reversed(_last_lines(run / "metrics.jsonl")):
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written
        if last is None:
            last = rec
        if resumed is None and "resumed_from" in rec:
            resumed = rec
        if last is not None and resumed is not None:
            break
    return last, resumed


def _submitit_result(folder: Path, job_id: str) -> tuple[str, str] | None:
    """("success"|"requeued"|"error"|"refused", detail) from rank 0's submitit result file."""
    path = folder / f"{job_id}_0_result.pkl"
    try:
        with open(path, "rb") as f:
            got = load_submitit_result(f)
    except UnsafePickleError as e:
        return "refused", f"{path}: {e}"
    except (OSError, ValueError, EOFError, TypeError, IndexError, KeyError):
        return None  # absent, or being written
    if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], str)):
        return "refused", f"{path}: not a submitit result record"
    outcome, value = got
    if outcome == "error":
        lines = [ln for ln in str(value).splitlines() if ln.strip()]
        return "error", lines[-1] if lines else "unknown error"
    if isinstance(value, dict) and value.get("requeued"):
        return "requeued", str(value)  # saved on a signal; the job reruns under the same id
    return "success", str(value)


def _local_alive(job_id: str) -> bool:
    try:
        os.kill(int(job_id), 0)
    except (ValueError, OSError):
        return False
    stat = Path(f"/proc/{job_id}/stat")
    return not stat.exists() or stat.read_text().split(") ")[-1][:1] != "Z"


def _lock_holder(run: Path) -> str:
    """Who owns the run folder now ('' when nobody holds RUN/.lock)."""
    try:
        holder = runlock.holder_if_locked(run)
    except (OSError, runlock.RunLockError):
        return ""
    return "" if holder is None else runlock.describe(holder)


# SLURM states after which a task's stderr says why (sacct/scontrol names).
_FAILED = ("FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT", "BOOT_FAIL", "DEADLINE", "CANCELLED")


def _task_errors(folder: Path, job_id: str, n: int = 6) -> tuple[str, list[str]]:
    """(file, last lines) of the first task stderr with anything in it, task 0 first:
    submitit writes RUN/slurm/<job>/<job>_<task>_log.err, where a task that could not start
    (bad data.shards, a locked folder) leaves its one-line reason."""
    def task(path: Path) -> int:
        m = re.search(r"_(\d+)_log\.err$", path.name)
        return int(m.group(1)) if m else 1 << 30
    for path in sorted(folder.glob(f"{job_id}_*_log.err"), key=task):
        lines = _last_lines(path)
        if lines:
            return str(path), lines[-n:]
    return "", []


def run_status(run_dir: str | Path) -> dict[str, Any]:
    """Everything `seer-status` prints, as a dict (state, job_id, checkpoint, step, ...)."""
    out = _run_status(run_dir)
    run = Path(out["run_dir"])
    if out["lock_holder"] and out["state"] in ("NOT RUNNING", "UNKNOWN"):
        # A live holder of RUN/.lock is a running job, whatever the files say (a local run).
        out.update(state="RUNNING", state_source="RUN/.lock")
    out["error_file"], out["error_lines"] = "", []
    if out["job_id"] and (out["error"] or out["state"].split()[0] in _FAILED):
        out["error_file"], out["error_lines"] = _task_errors(run / "slurm" / out["job_id"], out["job_id"])
    cands = [run / "logs"] + ([run / "slurm" / out["job_id"]] if out["job_id"] else [])
    out["logs"] = [str(p) for p in cands if p.is_dir()]
    return out


def _run_status(run_dir: str | Path) -> dict[str, Any]:
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"no run folder at {run}")
    jobs = (_read_json(run / LAUNCH_RECORD) or {}).get("jobs", [])
    job = jobs[-1] if jobs else None
    ckpt = latest_checkpoint(run)
    m = re.search(r"(\d+)$", ckpt)
    rq = read_requeues(run)
    last, resumed = _metrics(run)
    out: dict[str, Any] = {
        "run_dir": str(run), "job_id": job["job_id"] if job else "", "state": "UNKNOWN",
        "state_source": "files", "checkpoint": ckpt, "checkpoint_step": int(m.group(1)) if m else None,
        "restarts": int(rq["count"]), "slurm_restarts": None, "exit_code": "", "error": "",
        "last_metrics": last, "last_resume": resumed, "lock_holder": _lock_holder(run),
    }
    result = None
    if job:
        result = _submitit_result(run / "slurm" / job["job_id"], job["job_id"])
        if result and result[0] in ("error", "refused"):
            out["error"] = result[1]
        if job.get("executor") == "slurm":
            info = job_info(job["job_id"])
            if info is not None and info.state != "UNKNOWN":
                out.update(state=info.state, state_source="slurm", slurm_restarts=info.restarts,
                           exit_code=info.exit_code)
                return out
        elif _local_alive(job["job_id"]) and result is None:
            out.update(state="RUNNING", state_source="local process")
            return out
    if result is not None:
        out["state"] = {"success": "COMPLETED", "requeued": "REQUEUED",
                        "refused": "UNKNOWN"}.get(result[0], "FAILED")
        out["state_source"] = "submitit result"
    elif last is not None or ckpt:
        out["state"] = "NOT RUNNING"
    return out


def format_status(st: dict[str, Any]) -> str:
    step = st["checkpoint_step"]
    lines = [
        f"run:        {st['run_dir']}",
        f"job:        {st['job_id'] or '(none recorded)'}",
        f"state:      {st['state']} (from {st['state_source']})"
        + (f", exit code {st['exit_code']}" if st["exit_code"] else ""),
        f"checkpoint: {st['checkpoint'] or '(none)'}" + (f" (step {step})" if step is not None else ""),
        f"restarts:   {st['restarts']} (RUN/requeues.json)"
        + (f", SLURM counts {st['slurm_restarts']}" if st["slurm_restarts"] is not None else ""),
        f"metrics:    {json.dumps(st['last_metrics']) if st['last_metrics'] else '(none)'}",
    ]
    if st.get("lock_holder"):
        lines.append(f"in use by:  {st['lock_holder']} (RUN/.lock)")
    if st["last_resume"]:
        lines.append(f"resumed:    {json.dumps(st['last_resume'])}")
    if st["error"]:
        lines.append(f"error:      {st['error']}")
    if st.get("error_lines"):
        lines.append(f"task error: {st['error_file']} (last lines):")
        lines += [f"  {ln}" for ln in st["error_lines"]]
    if st.get("logs"):  # only folders that exist
        lines.append(f"logs:       {'  '.join(st['logs'])}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seer-status", description="State of a SEER run folder.")
    p.add_argument("run_dir", help="the run folder (run.dir)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = p.parse_args(argv)
    try:
        st = run_status(args.run_dir)
    except FileNotFoundError as e:
        print(f"seer-status: {e}", file=sys.stderr)
        return 1
    print(json.dumps(st) if args.json else format_status(st))
    return 0


if __name__ == "__main__":
    sys.exit(main())
