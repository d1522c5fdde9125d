"""launch/ against a real SLURM on localhost (slurm/local-cluster/start.sh).

Skipped with the reason when no slurmctld answers; under CI a skip fails the run (conftest).
State comes from scontrol (no accounting here, so no sacct), every wait has a deadline.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from launch.executor import build_executor
from launch.job import TrainJob
from launch.scheduler import (JobInfo, cancel, job_info, kill_wait_s, requeue, sbatch_test_only,
                              sbatch_test_only_args, slurm_available)
from launch.status import run_status
from launch.submit import main as submit_main
from launch.submit import record_submission
from seer_pipeline.config.slurm import SlurmConfig
from seer_pipeline.core.requeue import read_requeues
from tests.faultinject import env as fault_env

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


def test_dry_run_is_a_valid_sbatch_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    rc = submit_main(["--config", "cpu_tiny", f"run.dir={run}", "slurm.tasks_per_node=2",
                      "slurm.cpus_per_task=1", "slurm.mem_gb=1", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("#!/bin/bash")
    assert "--signal=USR2@120" in out and "--requeue" in out and "#SBATCH --ntasks-per-node=2" in out
    assert not (run / "launch.json").exists()  # nothing submitted
    (tmp_path / "good.sbatch").write_text(out)
    ok, text = sbatch_test_only(str(tmp_path / "good.sbatch"))
    assert ok and "to start at" in text, text
    # The check can fail: more CPUs than this one-node cluster has.
    rc = submit_main(["--config", "cpu_tiny", f"run.dir={run}", "slurm.cpus_per_task=4096", "--dry-run"])
    (tmp_path / "bad.sbatch").write_text(capsys.readouterr().out)
    ok, text = sbatch_test_only(str(tmp_path / "bad.sbatch"))
    assert rc == 0 and not ok, text
    # The SEER preset asks for the paper's 64 nodes x 8 GPUs.
    assert submit_main(["--config", "seer_32gf", f"run.dir={run}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for flag in ("--nodes=64", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10",
                 "--time=4320", "--signal=USR2@120", "--requeue", "--mem=128GB"):
        assert f"#SBATCH {flag}" in out, flag
    assert "-> 512 ranks" in out
    # sbatch's refusal reaches the user; nothing is recorded as submitted.
    shards = tmp_path / "shards"  # a readable shard set, so sbatch is what refuses (firsthour)
    shards.mkdir()
    (shards / "manifest.json").write_text('{"shards": [{"name": "s.tar", "count": 1}]}')
    (shards / "s.tar").write_bytes(b"")
    assert submit_main(["--config", "cpu_tiny", f"run.dir={run}", f"data.shards={shards}",
                        "slurm.partition=nosuchpart"]) == 1
    assert "invalid partition" in capsys.readouterr().err.lower()
    assert not (run / "launch.json").exists()
    # Unknown keys fail before anything is built.
    assert submit_main(["--config", "cpu_tiny", "slurm.nodez=2", "--dry-run"]) == 2
    assert "slurm.nodes" in capsys.readouterr().err


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


# ---- acceptance: the real trainer (cpu_tiny) on 2 SLURM tasks ------------------------------
# Tiny and fast: 16 steps of 4 images per rank, a periodic save every 5 steps, 1 thread and 1
# loader worker per rank in the SLURM job and in the local reference alike.
STEPS = 16
PREEMPT_AFTER = 7  # past the first periodic save (step 5): the resume must use the signal's save


def _train_args(shards: Path) -> list[str]:
    return [f"data.shards={shards}", "data.batch_size=4", f"train.steps={STEPS}", "ckpt.every=5",
            "train.threads=1", "data.workers=1"]


def _losses(run: Path) -> tuple[dict[int, float], list[dict]]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), f"steps not exactly once: {steps}"
    return {r["step"]: r["loss"] for r in recs}, recs


@pytest.fixture(scope="module")
def reference_losses(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """An uninterrupted local `seer-train --config cpu_tiny dist.nproc=2` with the same settings."""
    ref = tmp_path_factory.mktemp("reference") / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    res = subprocess.run(
        [sys.executable, "-m", "seer_pipeline.train.cli", "--config", "cpu_tiny", "dist.nproc=2",
         *_train_args(tiny_shards), f"run.dir={ref}"],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    losses, _ = _losses(ref)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _submit_tiny(run: Path, shards: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    rc = submit_main(["--config", "cpu_tiny", *_train_args(shards), f"run.dir={run}",
                      "slurm.tasks_per_node=2", "slurm.cpus_per_task=1", "slurm.timeout_min=60",
                      *extra])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = [ln for ln in out.splitlines() if ln.startswith("job ")]
    assert lines, out
    return lines[0].split()[1]


def _wait_step(run: Path, jid: str, step: int) -> None:
    def reached() -> bool:
        try:
            _, recs = _losses(run)
        except (OSError, ValueError):
            return False
        return bool(recs) and recs[-1]["step"] >= step

    try:
        wait_for(reached, 180, f"job {jid} to reach step {step}", every=0.2)
    except AssertionError:
        cancel(jid)
        raise
    _, recs = _losses(run)
    assert recs[-1]["step"] < STEPS - 2, "the run got too close to its end before the preemption"


def _assert_resumed_bitwise(run: Path, reference: dict[int, float]) -> None:
    losses, recs = _losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    resumed = [r for r in recs if "resumed_from" in r]
    assert len(resumed) == 1 and resumed[0]["resumed_from"] >= PREEMPT_AFTER, resumed
    assert losses == reference  # ==, not approx: the resume is exact


def test_scontrol_requeue_saves_requeues_and_resumes_exactly(
    tmp_path: Path, tiny_shards: Path, reference_losses: dict[int, float],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Scheduler preemption: SIGTERM to every process, KillWait, requeue under the same id."""
    run = tmp_path / "run"
    jid = _submit_tiny(run, tiny_shards, capsys)
    _wait_step(run, jid, PREEMPT_AFTER)
    assert requeue(jid)
    info = wait_final(jid, 240)
    assert info.state == "COMPLETED" and info.restarts == 1, info
    _assert_resumed_bitwise(run, reference_losses)
    st = run_status(run)
    assert st["state"] == "COMPLETED" and st["checkpoint_step"] == STEPS and st["slurm_restarts"] == 1
    rq = read_requeues(run)  # SLURM requeued it: booked as the scheduler's, no second scontrol
    assert rq["count"] == 1 and rq["history"][-1]["by_scheduler"] is True, rq


def test_usr2_timeout_signal_saves_requeues_and_resumes_exactly(
    tmp_path: Path, tiny_shards: Path, reference_losses: dict[int, float],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """submitit's timeout path: USR2 only (`job._interrupt(timeout=True)`); the trainer saves and
    requeues itself, counting it in RUN/requeues.json."""
    import submitit

    run = tmp_path / "run"
    jid = _submit_tiny(run, tiny_shards, capsys)
    _wait_step(run, jid, PREEMPT_AFTER)
    submitit.SlurmJob(folder=run / "slurm" / "%j", job_id=jid)._interrupt(timeout=True)
    info = wait_final(jid, 240)
    assert info.state == "COMPLETED" and info.restarts == 1, info
    _assert_resumed_bitwise(run, reference_losses)
    rq = read_requeues(run)
    assert rq["count"] == 1 and rq["history"][-1]["requeued"] is True


def test_sbatch_templates_run_training_on_two_tasks(tmp_path: Path, tiny_shards: Path) -> None:
    """The templates for users without submitit: valid here once sized to this node, and the
    single-node one trains cpu_tiny on 2 srun tasks (ranks from SLURM variables)."""
    fit = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--mem=1G",
           "--time=10", f"--output={tmp_path}/%j.out", f"--error={tmp_path}/%j.err"]
    for name in ("single-node", "multi-node"):
        ok, text = sbatch_test_only_args([*fit, str(REPO / "slurm" / f"{name}.sbatch")])
        assert ok, f"{name}: {text}"
    run = tmp_path / "run"
    args = [a for a in _train_args(tiny_shards) if not a.startswith("train.steps=")]
    res = subprocess.run(
        ["sbatch", "--parsable", *fit, str(REPO / "slurm" / "single-node.sbatch"),
         "--config", "cpu_tiny", *args, "train.steps=3", f"run.dir={run}"],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, SEER_PYTHON=sys.executable))
    assert res.returncode == 0, res.stderr
    jid = res.stdout.strip().split(";")[0]
    info = wait_final(jid, 180)
    assert info.state == "COMPLETED", (info, (tmp_path / f"{jid}.err").read_text()[-2000:])
    losses, _ = _losses(run)
    assert sorted(losses) == [1, 2, 3]
    assert (run / "logs" / "rank0.log").exists() and (run / "logs" / "rank1.log").exists()
    assert f"[seer] job {jid} restart 0" in (tmp_path / f"{jid}.out").read_text()


def test_requeue_cap_stops_with_a_clear_message(
    tmp_path: Path, tiny_shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    jid = _submit_tiny(run, tiny_shards, capsys, "slurm.max_requeues=0")
    _wait_step(run, jid, PREEMPT_AFTER)
    assert cancel(jid, "USR2")
    info = wait_final(jid, 120)
    assert info.state == "FAILED" and info.restarts == 0, info
    st = run_status(run)
    assert "requeue cap reached (0/0" in st["error"], st
    assert st["checkpoint_step"] is not None and st["checkpoint_step"] >= PREEMPT_AFTER
    assert read_requeues(run)["count"] == 0


def test_ctrl_c_to_a_slurm_job_saves_and_is_not_requeued(tmp_path: Path, tiny_shards: Path) -> None:
    """SIGINT to every task (srun's forward of a Ctrl-C, or scancel --signal=INT) is an operator
    stopping the run: every rank saves at the next step, rank 0 books it and does not requeue."""
    fit = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--mem=1G",
           "--time=10", f"--output={tmp_path}/%j.out", f"--error={tmp_path}/%j.err"]
    run = tmp_path / "run"
    res = subprocess.run(
        ["sbatch", "--parsable", *fit, str(REPO / "slurm" / "single-node.sbatch"), "--config",
         "cpu_tiny", *_train_args(tiny_shards), f"run.dir={run}"],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, SEER_PYTHON=sys.executable))
    assert res.returncode == 0, res.stderr
    jid = res.stdout.strip().split(";")[0]
    _wait_step(run, jid, PREEMPT_AFTER)
    assert cancel(jid, "INT")
    info = wait_final(jid, 240)
    err = (tmp_path / f"{jid}.err").read_text()
    out = (tmp_path / f"{jid}.out").read_text()  # rank 0 logs to stdout
    assert info.restarts == 0 and info.state != "COMPLETED", (info, err[-3000:])
    _, recs = _losses(run)
    saved = (run / "checkpoints" / "latest").read_text().strip()
    assert saved == f"step_{recs[-1]['step']:09d}" and recs[-1]["step"] < STEPS, (saved, err[-3000:])
    rq = read_requeues(run)
    assert rq["count"] == 0 and [(h["reason"], h["requeued"]) for h in rq["history"]] == [("SIGINT", False)], rq
    assert "SIGINT received: saving at step" in out and "not requeueing job" in out, out[-3000:]


# ---- a preemption save on a slow filesystem (#20): rank 0's commit outlasts KillWait ---------
def _slow_finalize_s() -> int:
    """Rank 0's commit delay: 15 s past the cluster's KillWait (30 s in local-cluster), so a
    rank that leaves right after DCP's last collective gets rank 0 killed mid-commit."""
    return kill_wait_s() + 15


# No periodic or final save: the delay then hits the signal's save only (test time), and the
# resume must come from it. The reference run saved every 5 steps; saves do not change losses.
_SIGNAL_SAVE_ONLY = ["ckpt.every=0", "ckpt.save_final=false"]


def _assert_slow_save_survived(run: Path, jid: str, reference: dict[int, float]) -> None:
    info = wait_final(jid, 420)
    assert info.state == "COMPLETED" and info.restarts == 1, info
    _assert_resumed_bitwise(run, reference)
    assert not list((run / "checkpoints").glob("*.partial")), "the signal's save was not committed"
    rq = read_requeues(run)
    assert rq["count"] == 1 and rq["history"][-1]["requeued"] is True, rq


def test_template_usr2_with_slow_finalize_saves_requeues_and_resumes(
    tmp_path: Path, tiny_shards: Path, reference_losses: dict[int, float]
) -> None:
    """slurm/single-node.sbatch, 2 srun tasks, USR2 mid-run, rank 0's commit slower than
    KillWait: saved (exit 75 on every rank), requeued by rank 0, resumed exactly."""
    slow = _slow_finalize_s()
    fit = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--mem=1G",
           "--time=20", f"--output={tmp_path}/%j.out", f"--error={tmp_path}/%j.err"]
    run = tmp_path / "run"
    env = fault_env(f"slow_finalize:{slow}", dict(os.environ, SEER_PYTHON=sys.executable))
    res = subprocess.run(
        ["sbatch", "--parsable", *fit, str(REPO / "slurm" / "single-node.sbatch"), "--config",
         "cpu_tiny", *_train_args(tiny_shards), *_SIGNAL_SAVE_ONLY, f"run.dir={run}"],
        capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    jid = res.stdout.strip().split(";")[0]
    _wait_step(run, jid, PREEMPT_AFTER)
    assert cancel(jid, "USR2")  # what --signal=USR2@120 sends to every task before the limit
    try:
        _assert_slow_save_survived(run, jid, reference_losses)
    except AssertionError as e:
        err = (tmp_path / f"{jid}.err").read_text()[-3000:]
        raise AssertionError(f"{e}\n--- job stderr ---\n{err}") from None
    out, err = (tmp_path / f"{jid}.out").read_text(), (tmp_path / f"{jid}.err").read_text()
    assert f"[seer] job {jid} restart 1" in out  # the requeued job ran the template again
    assert f"rank 0 sleeps {slow} s before committing" in err  # the fault was armed


def test_submitit_usr2_with_slow_finalize_saves_requeues_and_resumes(
    tmp_path: Path, tiny_shards: Path, reference_losses: dict[int, float],
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """seer-submit's path (submitit, srun --kill-on-bad-exit=1), same slow commit."""
    import submitit

    slow = _slow_finalize_s()
    env = fault_env(f"slow_finalize:{slow}")
    for key in ("PYTHONPATH", "SEER_TEST_FAULTS"):  # SLURM tasks inherit the submitter's env
        monkeypatch.setenv(key, env[key])
    run = tmp_path / "run"
    jid = _submit_tiny(run, tiny_shards, capsys, *_SIGNAL_SAVE_ONLY)
    _wait_step(run, jid, PREEMPT_AFTER)
    submitit.SlurmJob(folder=run / "slurm" / "%j", job_id=jid)._interrupt(timeout=True)
    _assert_slow_save_survived(run, jid, reference_losses)
    logs = "".join(p.read_text() for p in (run / "slurm" / jid).glob("*_log.err"))
    assert f"rank 0 sleeps {slow} s before committing" in logs  # the fault was armed
