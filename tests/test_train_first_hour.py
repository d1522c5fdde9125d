"""seer-train, as a new user meets it: a wrong `data.shards` is one line before anything exists,
and a finished run is extended the documented way (docs/config.md, "Extending a run")."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from seer_pipeline.config.base import ConfigError
from seer_pipeline.config.train import check_resume_compatible, load_train_config
from seer_pipeline.train.cli import shards_problem

from tests.test_trainer import _env as clean_env

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    return clean_env(PYTHONPATH=str(REPO))


def _train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seer_pipeline.train.cli", "--config", "cpu_tiny",
                           "train.tensorboard=false", "data.batch_size=2", *args], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("make, expect", [
    (lambda d: str(d / "nope"), "no such folder or file"),
    (lambda d: str(d), "has no manifest.json"),
    (lambda d: str(d / "shard-{000000..000002}.tar"), "3 of 3 shard file(s) missing"),
])
def test_wrong_shards_is_one_line_and_creates_nothing(tmp_path, make, expect):
    run = tmp_path / "run"
    spec = make(tmp_path)
    assert expect in shards_problem(spec)
    res = _train(f"data.shards={spec}", f"run.dir={run}", "dist.nproc=2", timeout=120)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr
    assert lines == [f"seer-train: {shards_problem(spec)}"], res.stderr
    assert not run.exists()


def test_good_shards_pass(tiny_shards):
    assert shards_problem(str(tiny_shards)) == ""
    assert shards_problem(str(tiny_shards / "shard-{000000..000002}.tar")) == ""
    assert shards_problem("s3://bucket/shards") == ""  # remote: the loader checks it


def _saved(steps: int, total: int = 0) -> dict:
    cfg = load_train_config("cpu_tiny", ["data.shards=x", f"train.steps={steps}",
                                         f"optim.total_steps={total}"])
    return OmegaConf.to_container(cfg, resolve=True)


def test_extension_messages_agree():
    saved = _saved(30)
    longer = load_train_config("cpu_tiny", ["data.shards=x", "train.steps=60"])
    with pytest.raises(ConfigError) as e:
        check_resume_compatible(saved, longer)
    assert "add optim.total_steps=30" in str(e.value) and "init.weights=" in str(e.value)
    # Doing what it says is accepted: the schedule is the same one (0 meant train.steps = 30).
    same = load_train_config("cpu_tiny", ["data.shards=x", "train.steps=60", "optim.total_steps=30"])
    assert "train.steps" in check_resume_compatible(saved, same)
    # A genuinely new schedule on resume is still refused, with the same advice.
    new = load_train_config("cpu_tiny", ["data.shards=x", "train.steps=60", "optim.total_steps=60"])
    with pytest.raises(ConfigError, match="add optim.total_steps=30"):
        check_resume_compatible(saved, new)


@pytest.mark.slow
def test_extend_a_finished_run(tiny_shards, tmp_path):
    run = tmp_path / "run"
    common = (f"data.shards={tiny_shards}", f"run.dir={run}", "data.workers=0")
    res = _train(*common, "train.steps=2")
    assert res.returncode == 0, res.stderr[-3000:]
    res = _train(*common, "train.steps=4")  # the obvious first try: one line, saying what to do
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(err) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "add optim.total_steps=2" in err[0]
    res = _train(*common, "train.steps=4", "optim.total_steps=2")  # what it said
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["resumed_from"] == 2
    assert rows[2]["lr"] == rows[3]["lr"] == rows[1]["lr"]  # past the schedule: its final lr


@pytest.mark.parametrize("typo, meant", [("train.step", "train.steps"), ("steps", "train.steps"),
                                         ("data.batchsize", "data.batch_size")])
def test_typo_suggests_the_closest_keys_first(typo, meant):
    with pytest.raises(ConfigError) as e:
        load_train_config("cpu_tiny", ["data.shards=x", f"{typo}=1"])
    msg = str(e.value)
    assert f"did you mean `{meant}`" in msg
    assert "\n" not in msg and len(msg) < 250, msg  # not the 80-key list


def test_unknown_key_without_a_close_one_lists_its_section():
    with pytest.raises(ConfigError) as e:
        load_train_config("cpu_tiny", ["data.shards=x", "train.zzzzzz=1"])
    assert "keys of `train`: train.objective, train.steps" in str(e.value) and "data.batch_size" not in str(e.value)


def test_console_line_is_short(tmp_path, caplog):
    import logging

    from seer_pipeline.train.metrics import MetricsLogger

    m = MetricsLogger(tmp_path, rank=0, log_every=5, tensorboard=False, total_steps=1000)
    # A step's full set of values, as the trainer logs them (names from train/trainer.py).
    row = {"loss": 5.2531, "lr": 0.05625, "img_s": 16.43, "step_s": 1.949, "data_wait": 0.2269,
           "eta_s": 125.0, "images_seen": 128, "rss_mb": 591.3, "entropy": 4.1, "score_max": 0.93,
           **{f"data_{k}": 0 for k in ("samples_ok", "decode_failures", "read_failures",
                                        "samples_repeated", "peak_buffered", "shards_failed",
                                        "epoch", "batches_in_epoch")}}
    with caplog.at_level(logging.INFO, logger="seer_pipeline.train.metrics"):
        m.log_step(5, row)
    m.close()
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 5/")][0]
    assert line == "step 5/1000 16.4 img/s ETA 0:02:05 loss=5.253 lr=0.05625"
    saved = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert saved["data_samples_ok"] == 0 and saved["rss_mb"] == 591.3  # the rest is kept there
