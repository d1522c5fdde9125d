"""seer-status: a live local run is RUNNING (not "NOT RUNNING" and "in use by pid N" at once),
and a failed job shows its task's last error lines from RUN/slurm/<job>/<job>_<task>_log.err."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from launch import status

REPO = Path(__file__).resolve().parent.parent


def _run_with_metrics(run: Path) -> None:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 5.0}) + "\n")


def test_live_local_run_is_running(tmp_path):
    run = tmp_path / "run"
    _run_with_metrics(run)
    assert status.run_status(run)["state"] == "NOT RUNNING"
    # What a live `seer-train` holds, from another process (POSIX locks are per process).
    code = ("import sys, time; from seer_pipeline.core import runlock; "
            "l = runlock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "held"
        st = status.run_status(run)
        text = status.format_status(st)
    finally:
        holder.kill()
        holder.wait()
    assert st["state"] == "RUNNING" and "NOT RUNNING" not in text, text
    assert "in use by" in text


def test_failed_job_shows_the_task_error_and_only_existing_logs(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _run_with_metrics(run)
    (run / "launch.json").write_text(json.dumps({"jobs": [{"job_id": "77", "executor": "slurm"}]}))
    folder = run / "slurm" / "77"
    folder.mkdir(parents=True)
    (folder / "77_0_log.err").write_text("")
    missing = tmp_path / "no-shards"
    (folder / "77_1_log.err").write_text(
        f"noise\nseer-train: data.shards={missing}: no such folder or file\n")
    monkeypatch.setattr(status, "job_info", lambda j: status_info(j, "FAILED"))
    st = status.run_status(run)
    text = status.format_status(st)
    assert st["state"] == "FAILED"
    assert st["error_file"].endswith("77_1_log.err")
    assert f"  seer-train: data.shards={missing}: no such folder or file" in text.splitlines()
    assert f"logs:       {folder}" in text  # RUN/logs does not exist, so it is not named
    assert str(run / "logs") not in text


def status_info(job_id: str, state: str):
    from launch.scheduler import JobInfo

    return JobInfo(job_id, state)
