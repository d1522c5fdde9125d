"""launch/ without SLURM: executor parameters, the task callable's exit-code contract,
seer-status from run-folder files, and submitit's LocalExecutor running a module-path entry.

The `entry_*` functions are training stand-ins that TrainJob calls by module path
(`test_launch:entry_ok`); tests/test_slurm.py runs them inside real SLURM tasks too.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit

from launch.executor import build_executor, describe_resources, executor_parameters
from launch.job import NotRequeued, TrainingFailed, TrainJob, check_entry
from launch.status import format_status, run_status
from launch.status import main as status_main
from seer_pipeline.config.slurm import SlurmConfig
from seer_pipeline.core.exit_codes import PREEMPTED, USAGE
from seer_pipeline.core.requeue import read_requeues
from seer_pipeline.distributed.setup import resolve_env

TESTS = Path(__file__).resolve().parent


# ---- entries (module-level: submitit and SLURM tasks import them as `test_launch:NAME`) ----
def _kv(argv: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in argv if "=" in a)


def entry_ok(argv: list[str]) -> int:
    """Records where it ran (rank, world, source, SLURM restart count) and succeeds."""
    kv = _kv(argv)
    d = resolve_env()
    rec = {"rank": d.rank, "world": d.world_size, "source": d.source, "job_id": d.job_id,
           "restart": os.environ.get("SLURM_RESTART_COUNT", "0"), "argv": argv}
    out = Path(kv["run.dir"]) / f"entry_rank{d.rank}_{rec['restart']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec))
    if float(kv.get("fake.sleep_first_s", 0)) and rec["restart"] == "0":
        time.sleep(float(kv["fake.sleep_first_s"]))  # a window with submitit's handlers in place
    return 0


def entry_code(argv: list[str]) -> int:
    return int(_kv(argv)["fake.rc"])


def entry_exit(argv: list[str]) -> int:
    sys.exit(int(_kv(argv)["fake.rc"]))


def entry_raise(argv: list[str]) -> int:
    raise ValueError("boom from the training entry")


class _NotAnException(BaseException):
    """Like torch.distributed.checkpoint's CheckpointException: a BaseException."""


def entry_base_exception(argv: list[str]) -> int:
    raise _NotAnException("dcp load failed")


# ---- executor parameters -------------------------------------------------------------------
def test_executor_parameters_map_every_slurm_key() -> None:
    s = SlurmConfig(partition="gpu", account="proj", qos="high", constraint="volta32gb", nodes=8,
                    tasks_per_node=8, gpus_per_node=8, cpus_per_task=10, mem_gb=480,
                    timeout_min=4320, exclusive=True, job_name="seer32", signal_delay_s=120,
                    max_requeues=30, additional_parameters={"comment": "seer"}, setup=["module load x"])
    p = executor_parameters(s)
    assert p["nodes"] == 8 and p["tasks_per_node"] == 8 and p["gpus_per_node"] == 8
    assert p["cpus_per_task"] == 10 and p["mem_gb"] == 480.0 and p["timeout_min"] == 4320
    assert p["name"] == "seer32" and p["slurm_signal_delay_s"] == 120
    assert (p["slurm_partition"], p["slurm_account"], p["slurm_qos"], p["slurm_constraint"]) == (
        "gpu", "proj", "high", "volta32gb")
    assert p["slurm_exclusive"] is True and p["slurm_setup"] == ["module load x"]
    assert p["slurm_additional_parameters"] == {"requeue": True, "comment": "seer"}
    assert "--kill-on-bad-exit=1" in p["slurm_srun_args"]
    text = describe_resources(s)
    assert "64 ranks" in text and "USR2 120 s" in text and "max requeues=30" in text


def test_executor_parameters_omit_unset_and_reject_bad_values() -> None:
    p = executor_parameters(SlurmConfig())
    assert not {"mem_gb", "gpus_per_node", "slurm_partition", "slurm_account",
                "slurm_exclusive", "slurm_setup"} & set(p)
    with pytest.raises(ValueError, match="signal_delay_s"):
        executor_parameters(SlurmConfig(timeout_min=1, signal_delay_s=120))
    with pytest.raises(ValueError, match="tasks_per_node"):
        executor_parameters(SlurmConfig(tasks_per_node=0))
    with pytest.raises(ValueError, match="slurm.nodes must be 1"):
        build_executor(SlurmConfig(nodes=2), "/tmp/unused", local=True)


def test_check_entry_finds_modules_without_importing() -> None:
    check_entry("seer_pipeline.train.cli:main")
    # In a fresh interpreter: the entry module (and torch, which it would pull) stays unloaded.
    code = ("import sys; from launch.job import check_entry; check_entry('seer_pipeline.train.cli:main'); "
            "print(sorted(m for m in ('seer_pipeline.train.cli', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    with pytest.raises(ValueError, match="module:function"):
        check_entry("seer_pipeline.train.cli")
    with pytest.raises(ValueError, match="not found"):
        check_entry("no_such_module_xyz:main")


def test_preempted_code_is_pinned() -> None:
    """75 (EX_TEMPFAIL) is part of the interface: SLURM scripts and the demo test for it."""
    assert PREEMPTED == 75 and USAGE == 2


def test_exit_codes_and_requeue_have_one_home_each() -> None:
    """#25: the codes live in core.exit_codes and nowhere else, `scontrol requeue` runs from
    core.requeue only, and the CLIs return USAGE rather than a bare 2."""
    import ast

    REPO = TESTS.parent
    mine = {REPO / "seer_pipeline/core/exit_codes.py", REPO / "seer_pipeline/core/requeue.py"}
    for path in sorted([*REPO.glob("seer_pipeline/**/*.py"), *REPO.glob("launch/*.py"),
                        *REPO.glob("data_prep/*.py")]):
        if path in mine:
            continue
        src = path.read_text()
        tree = ast.parse(src)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):  # no second name for 75, 73, 130
                val = node.value
                assert not (isinstance(val, ast.Constant) and val.value in (75, 73, 130)
                            and not isinstance(val.value, bool)), f"{path}:{node.lineno}: an exit code again"
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
                assert not any("PREEMPT" in n for n in names), f"{path}: {names}"
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant):
                assert node.value.value != 2, f"{path}:{node.lineno}: return 2 (use exit_codes.USAGE)"
            if isinstance(node, ast.ImportFrom) and node.module == "seer_pipeline.train.signals":
                assert "PREEMPTED" not in [a.name for a in node.names], path
        assert '"scontrol", "requeue"' not in src, f"{path} runs scontrol requeue itself"


# ---- the task callable ---------------------------------------------------------------------
def _job(tmp_path: Path, entry: str, *extra: str, cap: int = 2) -> TrainJob:
    return TrainJob(argv=["--config", "x", *extra, f"run.dir={tmp_path}"], run_dir=str(tmp_path),
                    max_requeues=cap, entry=f"test_launch:{entry}")


@pytest.fixture
def tests_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    for k in list(os.environ):  # run as a plain single process whatever launched pytest
        if k.startswith(("SLURM_", "SUBMITIT_")) or k in ("RANK", "WORLD_SIZE"):
            monkeypatch.delenv(k)


def test_trainjob_exit_codes(tmp_path: Path, tests_on_path: None) -> None:
    old = signal.getsignal(signal.SIGUSR2)
    try:
        res = _job(tmp_path, "entry_ok")()
        assert res["exit_code"] == 0 and res["rank"] == 0
        assert json.loads((tmp_path / "entry_rank0_0.json").read_text())["source"] == "single"
        with pytest.raises(TrainingFailed, match="exited with code 3"):
            _job(tmp_path, "entry_code", "fake.rc=3")()
        with pytest.raises(TrainingFailed, match="exited with code 4"):
            _job(tmp_path, "entry_exit", "fake.rc=4")()
        assert _job(tmp_path, "entry_exit", "fake.rc=0")()["exit_code"] == 0
        with pytest.raises(ValueError, match="boom"):
            _job(tmp_path, "entry_raise")()
        # submitit records only Exceptions: a BaseException must still mark the job failed.
        with pytest.raises(TrainingFailed, match="_NotAnException: dcp load failed"):
            _job(tmp_path, "entry_base_exception")()
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_trainjob_preempted_without_requeue_is_an_error(tmp_path: Path, tests_on_path: None) -> None:
    old = signal.getsignal(signal.SIGUSR2)
    try:
        with pytest.raises(NotRequeued, match="no SLURM requeue"):
            _job(tmp_path, "entry_code", f"fake.rc={PREEMPTED}")()
        (tmp_path / "requeues.json").write_text(json.dumps({"count": 2, "history": []}))
        with pytest.raises(NotRequeued, match=r"requeue cap reached \(2/2"):
            _job(tmp_path, "entry_code", f"fake.rc={PREEMPTED}")()
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_rerun_drops_the_previous_runs_result_file(
    tmp_path: Path, tests_on_path: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A requeued job keeps its id: a crash of the rerun must not leave the first run's
    'success' file to be read as the outcome."""
    env = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_FOLDER": str(tmp_path / "slurm" / "%j"),
           "SUBMITIT_LOCAL_JOB_ID": "77", "SUBMITIT_LOCAL_NTASKS": "1", "SUBMITIT_LOCAL_GLOBALID": "0",
           "SUBMITIT_LOCAL_LOCALID": "0", "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    stale = tmp_path / "slurm" / "77" / "77_0_result.pkl"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(pickle.dumps(("success", {"exit_code": 75, "requeued": True})))
    old = signal.getsignal(signal.SIGUSR2)
    try:
        with pytest.raises(TrainingFailed):
            _job(tmp_path, "entry_base_exception")()
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert not stale.exists()


def test_checkpoint_books_requeues_up_to_the_cap(tmp_path: Path) -> None:
    job = _job(tmp_path, "entry_ok", cap=2)
    for n in (1, 2):
        again = job.checkpoint()
        assert isinstance(again, submitit.helpers.DelayedSubmission) and again.function is job
        assert read_requeues(tmp_path)["count"] == n
    assert job.checkpoint() is None  # at the cap: submitit ends the job instead of requeueing
    rq = read_requeues(tmp_path)
    assert rq["count"] == 2 and len(rq["history"]) == 2
    assert all(h["requeued"] and "before training started" in h["reason"] for h in rq["history"])


# ---- seer-status from files ----------------------------------------------------------------
def _fake_run(run: Path) -> None:
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_000000030\n")
    (run / "requeues.json").write_text(json.dumps({"count": 1, "history": [{}]}))
    lines = [{"step": s, "loss": 5.0 - s / 10, "lr": 0.1} for s in range(1, 21)]
    lines[10]["resumed_from"] = 10
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 2')


def test_status_from_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    _fake_run(run)
    st = run_status(run)
    assert st["state"] == "NOT RUNNING" and st["job_id"] == ""
    assert st["checkpoint"] == "step_000000030" and st["checkpoint_step"] == 30
    assert st["restarts"] == 1
    assert st["last_metrics"]["step"] == 20  # the half-written last line is skipped
    assert st["last_resume"]["resumed_from"] == 10
    # Outcomes in submitit's result file: requeued (saved on a signal), then failed.
    (run / "launch.json").write_text(json.dumps({"jobs": [{"job_id": "999999999", "executor": "local"}]}))
    folder = run / "slurm" / "999999999"
    folder.mkdir(parents=True)
    with open(folder / "999999999_0_result.pkl", "wb") as f:
        pickle.dump(("success", {"exit_code": 75, "requeued": True}), f)
    assert run_status(run)["state"] == "REQUEUED"
    with open(folder / "999999999_0_result.pkl", "wb") as f:
        pickle.dump(("error", "Traceback...\nNotRequeued: requeue cap reached (2/2)"), f)
    st = run_status(run)
    assert st["state"] == "FAILED" and st["job_id"] == "999999999"
    assert "requeue cap reached" in st["error"]
    assert "step 30" in format_status(st) and "resumed_from" in format_status(st)
    assert status_main([str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "FAILED"
    assert status_main([str(tmp_path / "missing")]) == 1


# ---- submitit's LocalExecutor ----------------------------------------------------------------
@pytest.mark.slow
def test_submit_local_runs_entry_on_two_tasks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`seer-submit --local`: submitit's LocalExecutor, 2 tasks, each calling the entry by path."""
    from launch.submit import main as submit_main

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    run = tmp_path / "run"
    base = ["--config", "cpu_tiny", f"run.dir={run}", "slurm.tasks_per_node=2", "slurm.timeout_min=5",
            "--local"]
    assert submit_main([*base, "--entry", "test_launch:entry_ok"]) == 0
    out = capsys.readouterr().out
    job_id = out.split("job ", 1)[1].split()[0]
    recs = [json.loads((run / f"entry_rank{r}_0.json").read_text()) for r in (0, 1)]
    assert {(x["rank"], x["world"], x["source"]) for x in recs} == {
        (0, 2, "submitit-local"), (1, 2, "submitit-local")}
    assert recs[0]["argv"][-1] == f"run.dir={run}"
    assert (run / "slurm" / job_id / f"{job_id}_0_log.out").exists()  # RUN/slurm/<job id>/
    st = run_status(run)
    assert st["job_id"] == job_id and st["state"] == "COMPLETED"
    # A raising entry: reported, non-zero, and seer-status says FAILED with the exception.
    assert submit_main([*base, "--entry", "test_launch:entry_raise"]) == 1
    assert "boom from the training entry" in capsys.readouterr().err
    st = run_status(run)
    assert st["state"] == "FAILED" and "boom from the training entry" in st["error"]


def test_build_job_pins_an_absolute_run_dir_and_keeps_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from launch.submit import build_job
    from seer_pipeline.config.base import ConfigError

    monkeypatch.chdir(tmp_path)
    cfg, job = build_job("cpu_tiny", ["run.dir=rel/run", "train.steps=3",
                                      "slurm.additional_parameters.comment=seer"])
    assert job.run_dir == str(tmp_path / "rel" / "run")
    assert job.argv == ["--config", "cpu_tiny", "train.steps=3",
                        "slurm.additional_parameters.comment=seer", f"run.dir={tmp_path / 'rel' / 'run'}"]
    assert job.entry == "seer_pipeline.train.cli:main" and job.max_requeues == cfg.slurm.max_requeues
    assert executor_parameters(cfg.slurm)["slurm_additional_parameters"]["comment"] == "seer"
    with pytest.raises(ConfigError, match="slurm.nodes"):
        build_job("cpu_tiny", ["slurm.nodez=2"])


# ---- what reaches the tasks (#20, clusters as they are) ------------------------------------
def test_dry_run_says_which_variables_reach_the_tasks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from launch.submit import main as submit_main

    for k in list(os.environ):
        if k.startswith(("NCCL_", "GLOO_", "MASTER_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth1")
    monkeypatch.setenv("NCCL_IB_HCA", "mlx5_0\n#SBATCH --nodes=999")  # must not become a line
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.9")
    assert submit_main(["--config", "cpu_tiny", f"run.dir={tmp_path / 'run'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    comments = [ln for ln in out.splitlines() if ln.startswith("#   ")]
    assert any("whole environment reaches every task (sbatch --export=ALL)" in ln for ln in comments)
    passed = next(ln for ln in comments if "passed on:" in ln)
    assert "GLOO_SOCKET_IFNAME=eth1" in passed and "MASTER_ADDR=10.0.0.9" in passed
    assert "NCCL_IB_HCA='mlx5_0\\n#SBATCH --nodes=999'" in passed
    assert "#SBATCH --nodes=999" not in out.splitlines()
    assert any(ln.startswith("#   not set: NCCL_SOCKET_IFNAME ") for ln in comments), comments
    assert any("MASTER_ADDR is set and overrides the rendezvous" in ln for ln in comments)
    # A narrowed export is said so.
    assert submit_main(["--config", "cpu_tiny", f"run.dir={tmp_path / 'run'}", "--dry-run",
                        "slurm.additional_parameters.export=NONE"]) == 0
    assert "only what --export=NONE names reaches the tasks" in capsys.readouterr().out
