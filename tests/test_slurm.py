"""launch/ against a real SLURM on localhost (slurm/local-cluster/start.sh).

Skipped with the reason when no slurmctld answers; under CI a skip fails the run (conftest).
State comes from scontrol (no accounting here, so no sacct), every wait has a deadline.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from launch.executor import build_executor, sbatch_script
from launch.job import TrainJob, read_requeues
from launch.scheduler import JobInfo, cancel, job_info, sbatch_test_only, slurm_available
from launch.status import run_status
from launch.submit import record_submission
from seer_pipeline.slurm_config import SlurmConfig

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster() -> None:
    ok, why = slurm_available()
    if not ok:
        pytest.skip(f"no local SLURM ({why}); start one with `bash slurm/local-cluster/start.sh`")


@pytest.fixture
def entries_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """SLURM tasks inherit the submitter's environment: let them import test_launch's entries."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))


def wait_for(pred: Callable[[], object], timeout: float, what: str, every: float = 0.5) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_final(job_id: str, timeout: float) -> JobInfo:
    def done() -> JobInfo | None:
        info = job_info(job_id)
        return info if info is not None and info.finished else None

    try:
        return wait_for(done, timeout, f"job {job_id} to finish")  # type: ignore[return-value]
    except AssertionError:
        cancel(job_id)
        raise


def _job(run: Path, entry: str, *extra: str, cap: int = 3) -> TrainJob:
    return TrainJob(argv=["--config", "x", *extra, f"run.dir={run}"], run_dir=str(run),
                    max_requeues=cap, entry=f"test_launch:{entry}")


def _submit(run: Path, job: TrainJob, **slurm: object) -> str:
    cfg = SlurmConfig(cpus_per_task=1, timeout_min=60, max_requeues=job.max_requeues, **slurm)
    sub = build_executor(cfg, run).submit(job)
    record_submission(run, {"job_id": str(sub.job_id), "executor": "slurm"})
    return str(sub.job_id)


def test_local_cluster_start_is_idempotent() -> None:
    res = subprocess.run(["bash", str(REPO / "slurm/local-cluster/start.sh")], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "already running" in res.stdout and "local SLURM is up" in res.stdout
    out = subprocess.run(["srun", "-n1", "-c1", "echo", "hi-from-slurm"], capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.strip() == "hi-from-slurm", out.stderr


def test_sbatch_script_passes_test_only_and_oversized_fails(tmp_path: Path) -> None:
    good = sbatch_script(build_executor(SlurmConfig(tasks_per_node=2, cpus_per_task=1, mem_gb=1),
                                        tmp_path / "run"))
    (tmp_path / "good.sbatch").write_text(good)
    ok, text = sbatch_test_only(str(tmp_path / "good.sbatch"))
    assert ok, text
    assert "to start at" in text
    # The check can fail: more CPUs than this one-node cluster has.
    bad = sbatch_script(build_executor(SlurmConfig(tasks_per_node=2, cpus_per_task=4096),
                                       tmp_path / "run"))
    (tmp_path / "bad.sbatch").write_text(bad)
    ok, text = sbatch_test_only(str(tmp_path / "bad.sbatch"))
    assert not ok, text


def test_job_that_raises_fails_and_is_not_requeued(tmp_path: Path, entries_importable: None) -> None:
    run = tmp_path / "run"
    jid = _submit(run, _job(run, "entry_raise"), tasks_per_node=2)
    info = wait_final(jid, 90)
    assert info.state == "FAILED" and info.restarts == 0, info
    time.sleep(3)  # a requeue would show as PENDING/RUNNING again by now
    again = job_info(jid)
    assert again is not None and again.state == "FAILED" and again.restarts == 0, again
    st = run_status(run)
    assert st["state"] == "FAILED" and st["state_source"] == "slurm"
    assert "boom from the training entry" in st["error"]
    assert read_requeues(run)["count"] == 0


def test_signal_before_training_starts_requeues_via_checkpoint(
    tmp_path: Path, entries_importable: None
) -> None:
    """submitit's own USR2 handler is live until the trainer installs its own: our checkpoint()
    books the requeue and the rerun (SLURM_RESTART_COUNT=1) completes."""
    run = tmp_path / "run"
    jid = _submit(run, _job(run, "entry_ok", "fake.sleep_first_s=90"))
    wait_for((run / "entry_rank0_0.json").exists, 90, "the first run to start")
    time.sleep(1.0)  # the entry is sleeping with submitit's handlers installed
    assert cancel(jid, "USR2")
    wait_for((run / "entry_rank0_1.json").exists, 90, "the requeued run to start")
    info = wait_final(jid, 60)
    assert info.state == "COMPLETED" and info.restarts == 1, info
    rq = read_requeues(run)
    assert rq["count"] == 1 and "before training started" in rq["history"][0]["reason"]
    rec = json.loads((run / "entry_rank0_1.json").read_text())
    assert rec["source"] == "slurm" and rec["job_id"] == jid
