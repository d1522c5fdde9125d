"""Issue #24: config values are literals. A resolver (`${oc.env:...}`) is refused in what is
loaded (overrides, presets) and in what is read back from a run folder, so a credential is never
resolved into config.yaml, meta.json, checkpoints, logs or an error; NaN/inf numbers are refused."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from seer_pipeline.config.base import ConfigError
from seer_pipeline.config.train import load_train_config

SECRET = "hunter2-not-for-logs"
PLANTED = "model: {trunk: '${oc.env:SEER_TEST_SECRET}', hidden_dims: [], out_dim: 8, n_prototypes: 8}\n"


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEER_TEST_SECRET", SECRET)


@pytest.mark.parametrize("override", [
    "slurm.account=${oc.env:SEER_TEST_SECRET}", "run.dir=/runs/${oc.env:SEER_TEST_SECRET}",
    "slurm.setup=[\"export K=${oc.env:SEER_TEST_SECRET}\"]", "model.trunk=${env:SEER_TEST_SECRET}",
    "run.dir=${oc.env:SEER_TEST_SECRET,fallback}", "data.shards=${oc.decode:'${oc.env:SEER_TEST_SECRET}'}",
])
def test_resolver_overrides_are_refused_without_echoing(override: str) -> None:
    with pytest.raises(ConfigError, match="calls the resolver") as e:
        load_train_config("cpu_tiny", [override])
    assert SECRET not in str(e.value) and len(str(e.value).splitlines()) == 1


def test_seer_train_refuses_before_writing_anything(tmp_path: Path, capsys) -> None:
    from seer_pipeline.train.cli import main

    run = tmp_path / "run"
    rc = main(["--config", "cpu_tiny", f"run.dir={run}", "data.shards=/nowhere",
               "slurm.account=${oc.env:SEER_TEST_SECRET}"])
    err = capsys.readouterr().err
    assert rc == 2 and "oc.env" in err and SECRET not in err
    assert not run.exists()


def test_resolver_in_a_preset_file_is_refused(tmp_path: Path) -> None:
    preset = tmp_path / "mine.yaml"
    preset.write_text("slurm:\n  account: '${ oc.env : SEER_TEST_SECRET }'\n")  # spaces resolve too
    with pytest.raises(ConfigError, match="preset mine.yaml: slurm.account calls the resolver"):
        load_train_config(str(preset), [])


def test_plain_references_between_keys_still_work() -> None:
    cfg = load_train_config("cpu_tiny", ["optim.total_steps=${train.steps}", "train.steps=7"])
    assert cfg.optim.total_steps == 7
    with pytest.raises(ConfigError, match="bad interpolation"):
        load_train_config("cpu_tiny", ["train.steps=${no.such.key}"])


@pytest.mark.parametrize("override", ["optim.base_lr=nan", "optim.base_lr=inf",
                                      "optim.weight_decay=-inf", "swav.epsilon=nan",
                                      "data.max_fail_fraction=nan", "dist.timeout_s=inf"])
def test_non_finite_numbers_are_refused(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
        load_train_config("cpu_tiny", [override])


# -- the reading side: a run folder's planted config -----------------------------------------------
def _run_with_planted_meta(tmp_path: Path) -> Path:
    from seer_pipeline.checkpoint import integrity
    from seer_pipeline.checkpoint.checkpointer import Checkpointer, ckpt_config

    run = tmp_path / "run"
    Checkpointer(run, ckpt_config(every=1), config_yaml=PLANTED).save(3, {"model": {"w": torch.zeros(2)}}, {})
    step = run / "checkpoints" / "step_000000003"
    meta = json.loads((step / "meta.json").read_text())
    assert meta["config_yaml"] == PLANTED and integrity.read_meta(step)
    (run / "config.yaml").write_text(PLANTED)
    return run


@pytest.mark.parametrize("cmd", ["export", "consolidate"])
def test_seer_ckpt_refuses_a_planted_resolver(tmp_path: Path, capsys, cmd: str) -> None:
    from seer_pipeline.weights.cli import main

    run = _run_with_planted_meta(tmp_path)
    argv = [cmd, str(run), "--out", str(tmp_path / "o.pt")] + (["--format", "timm"] if cmd == "export" else [])
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "calls the resolver 'oc.env'" in err and SECRET not in err


def test_eval_refuses_a_planted_resolver_in_config_yaml(tmp_path: Path) -> None:
    from seer_pipeline.eval import features

    run = _run_with_planted_meta(tmp_path)
    with pytest.raises(features.CheckpointSpecError, match="calls the resolver") as e:
        features.parse_checkpoint(str(run))
    assert SECRET not in str(e.value)


def test_resume_refuses_a_planted_resolver_in_the_checkpoint_config() -> None:
    from seer_pipeline.train.trainer import Trainer

    me = SimpleNamespace(cfg=load_train_config("cpu_tiny", []))
    with pytest.raises(ConfigError, match="calls the resolver") as e:
        Trainer._check_config(me, {"config_yaml": PLANTED})
    assert SECRET not in str(e.value)
