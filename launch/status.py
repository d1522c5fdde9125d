"""`seer-status RUN`: job state, last checkpoint, restarts and the last metrics line of a run.

The job state comes from SLURM (scontrol) when RUN/launch.json records a job id and slurmctld
answers; otherwise from files (submitit's result pickle, read through the restricted unpickler
so a planted file cannot run code, or "not running" with the last step).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import re
import stat
import sys
from pathlib import Path
from typing import Any, Sequence

from launch.job import latest_checkpoint
from seer_pipeline.core.requeue import read_requeues
from launch.scheduler import job_info
from launch.submit import LAUNCH_RECORD
from seer_pipeline.core import metrics_file, runlock
from seer_pipeline.core.safe_pickle import UnsafePickleError, load_submitit_result


# What one field of the status may print: a run folder's files may hold anything.
_SHOW_CHARS = 500
_JOB_ID = re.compile(r"^[0-9A-Za-z_.-]{1,64}$")


def _read_json(path: Path) -> Any:
    raw, _ = metrics_file.read_file(path)  # regular files only: a FIFO must not hang us
    if raw is None or len(raw) > 1 << 20:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


def _last_job(record: Any) -> dict[str, Any] | None:
    """The newest job of RUN/launch.json, if it is one seer-submit could have written."""
    jobs = record.get("jobs") if isinstance(record, dict) else None
    job = jobs[-1] if isinstance(jobs, list) and jobs else None
    if not isinstance(job, dict):
        return None
    jid = job.get("job_id")
    if not isinstance(jid, str) or not _JOB_ID.match(jid) or set(jid) == {"."}:
        return None  # it names a folder under RUN/slurm: no separators, no `..`
    return job


def _cut(text: str) -> str:
    return text if len(text) <= _SHOW_CHARS else text[:_SHOW_CHARS] + f"... ({len(text)} chars)"


def _show(obj: Any) -> str:
    """JSON of a record, cut to one readable field."""
    try:
        text = json.dumps(obj)
    except (ValueError, TypeError, RecursionError):
        text = "(unprintable)"
    return _cut(text)


def _last_lines(path: Path, max_bytes: int = 1 << 16) -> list[str]:
    """The tail of a (possibly large, possibly being written) text file, as complete lines."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not hang
    except OSError:
        return []
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return []
        size = os.fstat(fd).st_size
        data = os.pread(fd, max_bytes, max(0, size - max_bytes)).decode("utf-8", errors="surrogateescape")
    except OSError:
        return []
    finally:
        os.close(fd)
    lines = data.splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first line may be cut
    return [ln for ln in lines if ln.strip()]


def _metrics(run: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(last metrics record, last record carrying `resumed_from`) of RUN/metrics.jsonl."""
    last = resumed = None
    for line in reversed(_last_lines(run / "metrics.jsonl")):
        try:
            rec = metrics_file.parse_record(line.encode("utf-8", errors="surrogateescape"))
        except metrics_file.BadLine:
            continue  # a line being written, or not one of ours
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
    raw, why = metrics_file.read_file(path)  # regular files only: a FIFO must not hang us
    if raw is None:
        return ("refused", f"{path}: {why}") if why == "not a regular file" else None
    try:
        got = load_submitit_result(io.BytesIO(raw))
    except UnsafePickleError as e:
        return "refused", _cut(f"{path}: {e}")
    except (pickle.UnpicklingError, ValueError, EOFError, TypeError, IndexError, KeyError):
        return None  # being written
    if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], str)):
        return "refused", f"{path}: not a submitit result record"
    outcome, value = got
    if outcome == "error":
        lines = [ln for ln in str(value).splitlines() if ln.strip()]
        return "error", _cut(lines[-1]) if lines else "unknown error"
    if isinstance(value, dict) and value.get("requeued"):
        return "requeued", _cut(str(value))  # saved on a signal; the job reruns under the same id
    return "success", _cut(str(value))


def _local_alive(job_id: str) -> bool:
    try:
        os.kill(int(job_id), 0)
    except (ValueError, OSError):
        return False
    proc = Path(f"/proc/{job_id}/stat")
    return not proc.exists() or proc.read_text().split(") ")[-1][:1] != "Z"


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
    job = _last_job(_read_json(run / LAUNCH_RECORD))
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
        f"metrics:    {_show(st['last_metrics']) if st['last_metrics'] else '(none)'}",
    ]
    if st.get("lock_holder"):
        lines.append(f"in use by:  {st['lock_holder']} (RUN/.lock)")
    if st["last_resume"]:
        lines.append(f"resumed:    {_show(st['last_resume'])}")
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
