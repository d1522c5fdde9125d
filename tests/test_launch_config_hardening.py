"""Issue #13 (launch and config) and #16 (launch): values that reach sbatch/srun cannot inject
lines, bad values are refused before the run folder exists, overrides sit anywhere on the
command line, `seer-submit --dry-run` needs no torch, and a busy run folder is not submitted to."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seer_pipeline.config.base import ConfigError
from seer_pipeline.config.train import load_train_config

REPO = Path(__file__).resolve().parent.parent

BAD_VALUES = [
    ("data.workers=-1", "data.workers"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.shuffle_buffer=0", "data.shuffle_buffer"),
    ("model.trunk=nonexistent", "model.trunk"),
    ("swav.crops_for_assign=[7]", "swav.crops_for_assign"),
    ("train.log_every=0", "train.log_every"),
    ("optim.base_lr=-0.1", "optim.base_lr"),
    ("dist.timeout_s=-1", "dist.timeout_s"),
    ("dist.timeout_s=0", "dist.timeout_s"),
]


@pytest.mark.parametrize("override,key", BAD_VALUES)
def test_bad_values_refused_before_the_run_folder_exists(
        tmp_path: Path, capsys, override: str, key: str) -> None:
    from seer_pipeline.train.cli import main

    run = tmp_path / "run"
    rc = main(["--config", "cpu_tiny", f"run.dir={run}", f"data.shards={tmp_path}", override])
    err = capsys.readouterr().err
    assert rc == 2 and key in err, err
    assert not run.exists()


def test_crops_for_assign_is_checked_against_the_crop_preset() -> None:
    load_train_config("cpu_tiny", ["swav.crops_for_assign=[0,1]"])
    with pytest.raises(ConfigError, match="swav.crops_for_assign"):
        load_train_config("cpu_tiny", ["data.crops=seer", "swav.crops_for_assign=[6]"])  # 2+4 crops
    with pytest.raises(ConfigError, match="swav.crops_for_assign"):
        load_train_config("cpu_tiny", ["swav.crops_for_assign=[0,0]"])
    with pytest.raises(ConfigError, match="swav.crops_for_assign"):
        load_train_config("cpu_tiny", ["swav.crops_for_assign=[-1]"])


SLURM_STRINGS = ["job_name", "partition", "account", "qos", "constraint"]


@pytest.mark.parametrize("key", SLURM_STRINGS)
@pytest.mark.parametrize("bad", ["seer\n#SBATCH --nodes=64", "a\rb", "a\x00b", "a\u2028b", "a\tb"])
def test_control_characters_in_slurm_strings_are_refused(key: str, bad: str) -> None:
    from omegaconf import OmegaConf

    from launch.executor import executor_parameters

    cfg = load_train_config("cpu_tiny", [])
    with pytest.raises(ConfigError, match=f"slurm.{key}"):
        # Through a preset/YAML, the way a newline survives (a dotlist folds it to a space).
        from seer_pipeline.config.train import validate

        OmegaConf.update(cfg, f"slurm.{key}", bad)
        validate(cfg)
    with pytest.raises(ValueError, match=f"slurm.{key}"):
        executor_parameters(cfg.slurm)  # also when the launcher is called directly


def test_setup_lines_and_extra_flags_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"slurm.setup\[1\]"):
        load_train_config("cpu_tiny", ["slurm.setup=['module load x', \"echo a\\nrm -rf b\"]"])
    with pytest.raises(ConfigError, match="slurm.additional_parameters.mail_user"):
        load_train_config("cpu_tiny", ['slurm.additional_parameters.mail_user="a\\n#SBATCH --x"'])
    with pytest.raises(ConfigError, match="not an sbatch flag name"):
        load_train_config("cpu_tiny", ['slurm.additional_parameters={"a b": 1}'])
    with pytest.raises(ConfigError, match="run.dir"):
        load_train_config("cpu_tiny", ['run.dir="/tmp/x\\ny"'])
    cfg = load_train_config("cpu_tiny", ["slurm.additional_parameters.mail-type=END",
                                         "slurm.setup=['module load cuda; echo $PATH']"])
    assert cfg.slurm.additional_parameters["mail-type"] == "END"


def _submit(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.submit", *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                          capture_output=True, text=True, timeout=120)


def test_dry_run_refuses_an_injected_job_name(tmp_path: Path) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text("_base_: cpu_tiny\nslurm:\n  job_name: \"seer\\n#SBATCH --nodes=64\"\n")
    res = _submit(tmp_path, "--config", str(preset), f"run.dir={tmp_path / 'run'}", "--dry-run")
    assert res.returncode == 2 and "slurm.job_name" in res.stderr
    assert "#SBATCH --nodes=64" not in res.stdout


def test_overrides_on_both_sides_of_a_flag(tmp_path: Path) -> None:
    from launch.submit import main

    run = tmp_path / "run"
    out = _submit(tmp_path, "--config", "cpu_tiny", "slurm.nodes=2", "--dry-run",
                  "slurm.cpus_per_task=3", f"run.dir={run}")
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --nodes=2" in out.stdout and "#SBATCH --cpus-per-task=3" in out.stdout
    assert "slurm.cpus_per_task=3" in out.stdout  # carried into each task's argv
    assert main is not None


def test_dry_run_does_not_import_torch(tmp_path: Path) -> None:
    """`python -X importtime` lists every module imported; none of the heavy stacks may appear."""
    res = _submit(tmp_path, "--config", "cpu_tiny", f"run.dir={tmp_path / 'run'}", "--dry-run",
                  env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in res.stderr.splitlines() if "import time:" in ln}
    assert "launch.executor" in imported and "submitit" in imported  # the probe sees imports
    assert not {"torch", "numba", "PIL", "numpy"} & imported, sorted({"torch", "numba", "PIL", "numpy"} & imported)


def _hold(run: Path, job_id: str) -> subprocess.Popen:
    code = ("import sys, time; from seer_pipeline.core.runlock import acquire; "
            f"lock = acquire(sys.argv[1], job_id={job_id!r}); print('held', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(run)], env={**os.environ, "PYTHONPATH": str(REPO)},
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_submit_refuses_a_locked_run_folder_or_queues_behind_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = _hold(run, "4242")
    try:
        res = _submit(tmp_path, "--config", "cpu_tiny", f"run.dir={run}", "--dry-run")
        assert res.returncode == 2 and "job 4242" in res.stderr and f"pid {holder.pid}" in res.stderr
        assert "--after-holder" in res.stderr
        res = _submit(tmp_path, "--config", "cpu_tiny", f"run.dir={run}", "--dry-run", "--after-holder")
        assert res.returncode == 0, res.stderr
        assert "#SBATCH --dependency=afterany:4242" in res.stdout
    finally:
        holder.kill()
        holder.wait()
    res = _submit(tmp_path, "--config", "cpu_tiny", f"run.dir={run}", "--dry-run")
    assert res.returncode == 0 and "--dependency" not in res.stdout  # free again


def test_after_holder_needs_a_slurm_holder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = _hold(run, "")  # a seer-train started by hand: nothing to depend on
    try:
        res = _submit(tmp_path, "--config", "cpu_tiny", f"run.dir={run}", "--dry-run", "--after-holder")
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == 2 and "not a SLURM job" in res.stderr


def test_launch_record_of_a_live_job_counts_as_holder(tmp_path: Path, monkeypatch) -> None:
    """A job still pending holds no lock yet; RUN/launch.json + slurmctld say it will run."""
    import launch.scheduler as sched
    from launch import submit

    run = tmp_path / "run"
    run.mkdir()
    (run / "launch.json").write_text(json.dumps({"jobs": [{"job_id": "31", "executor": "slurm"}]}))
    monkeypatch.setattr(sched, "job_info", lambda j: sched.JobInfo(j, "PENDING"))
    with pytest.raises(submit.RunFolderBusy, match="job 31"):
        submit.holder_dependency(run, after_holder=False)
    assert submit.holder_dependency(run, after_holder=True) == "afterany:31"
    monkeypatch.setattr(sched, "job_info", lambda j: sched.JobInfo(j, "COMPLETED"))
    assert submit.holder_dependency(run, after_holder=False) == ""
