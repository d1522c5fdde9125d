"""`make demo`: settings, the missing-dataset message, and (slow) a whole run on a subset."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seer_pipeline.demo import run as demo
from test_tensorboard_plot import assert_plot_png

REPO = Path(__file__).resolve().parent.parent


def test_settings_from_env_and_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEER_DEMO_TRAIN_STEPS", "150")
    monkeypatch.setenv("SEER_DEMO_SUBSET", "3000")
    s = demo.parse_settings(["--out", str(tmp_path), "--sup-steps", "40", "optim.base_lr=1.0"])
    assert (s.train_steps, s.subset, s.sup_steps, s.out) == (150, 3000, 40, str(tmp_path))
    assert demo.Settings().train_steps == 1600  # fixed, not calibrated from the machine's speed
    assert s.overrides == ["optim.base_lr=1.0"]
    assert demo._override(s, "optim.base_lr", "x") == "1.0"  # the command line beats the recipe
    assert demo._override(s, "data.batch_size", "x") == "64"
    # The SwAV row's command is the recipe's; the DINO row's the same less the SwAV-only keys.
    swav = demo._train_cmd(s, Path("r"), Path("sh"), [])[3:]
    assert swav == ["--config", "cpu_tiny", "dist.nproc=2", "run.dir=r", "data.shards=sh",
                    *demo.RECIPE, "optim.base_lr=1.0"]
    dino = demo._train_cmd(s, Path("r"), Path("sh"), [], demo.DINO)[3:]
    assert dino[:2] == ["--config", "cpu_tiny_dino"] and dino[-1] == "optim.base_lr=1.0"
    shared = [o for o in swav[2:-1] if not o.startswith(demo.SWAV_ONLY)]
    assert dino[2:] == [*shared, *demo.DINO_ONLY, "optim.base_lr=1.0"]
    assert demo._override(s, "dino.freeze_last_layer_iters", "x", demo.DINO) == "30"  # the recipe's
    assert demo._override(s, "dino.centering", "x", demo.DINO) == "sinkhorn"  # the preset's
    with pytest.raises(SystemExit):
        demo.parse_settings(["--preempt-at", "1.5"])
    with pytest.raises(SystemExit):
        demo.parse_settings(["--train-steps", "5"])


def test_every_pretrained_row_has_the_bars() -> None:
    """random + 10 and raw pixels for SwAV and DINO alike (the stretch target is SwAV's)."""
    lin = {"raw_pixels": 84.0, "random": 68.0, "swav": 86.7, "dino": 80.0, "supervised": 91.7}
    assert demo._targets(lin) == {
        "swav_ge_random_plus_10": True, "swav_ge_raw_pixels": True, "dino_ge_random_plus_10": True,
        "dino_ge_raw_pixels": False, "stretch_swav_ge_raw_plus_3": False}
    assert not demo._targets({**lin, "dino": 77.9})["dino_ge_random_plus_10"]


def test_missing_fashion_mnist_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "SEER_FMNIST_DIR": str(tmp_path / "empty")}
    res = subprocess.run([sys.executable, "-m", "seer_pipeline.demo", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert res.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in res.stderr
    assert "t10k-labels-idx1-ubyte.gz" in res.stderr


@pytest.mark.slow
@pytest.mark.timeout(2400)  # two pretrainings and five evaluations: 15+ min at load 12 on the 2-core box
def test_demo_smoke_on_a_subset(tmp_path: Path) -> None:
    """The real pipeline, small: dump -> shards -> 2-rank SwAV and DINO, each preempted and
    resumed -> evals -> plots -> report. ~4-5 minutes on a quiet 2-core machine."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "seer_pipeline.demo", "--out", str(out), "--subset", "1500",
           "--test-subset", "500", "--train-steps", "60", "--sup-steps", "30",
           "--bn-images", "500",
           "swav.freeze_prototypes_iters=2", "dino.freeze_last_layer_iters=2", "optim.warmup_steps=3",
           "data.batch_size=32"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=2400)  # a hang guard only
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"report in {out / 'report.md'}" in res.stdout
    rep = json.loads((out / "report.json").read_text())
    lin = rep["linear"]
    for k in ("swav", "dino", "random", "raw_pixels", "supervised"):
        assert 0 < lin[k] <= 100
        assert 0 < rep["linear_sgd"][k]["top1"] <= rep["linear_sgd"][k]["top5"] <= 100
        assert set(rep["low_shot"][k]) == {"1%", "10%"}  # 15 / 150 of 1,500 images
    assert set(rep["knn"]) == {"swav", "dino", "random"}
    for k in ("swav", "dino"):  # the same bars for both rows, from the reported numbers
        assert rep["targets"][f"{k}_ge_random_plus_10"] == (lin[k] >= lin["random"] + 10)
        assert rep["targets"][f"{k}_ge_raw_pixels"] == (lin[k] >= lin["raw_pixels"])
    for key, run, png in (("pretraining", "run", "loss.png"), ("pretraining_dino", "run_dino", "loss_dino.png")):
        pre = rep[key]
        # Preempted part way, then the same command resumed from the preemption checkpoint.
        assert 0 < pre["preempt_sent_at_step"] <= pre["resumed_from_step"] < pre["final_step"]
        assert pre["final_step"] == pre["steps"] == 60  # the fixed length, whatever the load
        steps = [json.loads(line)["step"] for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)) and steps[-1] == pre["final_step"]  # no gap, no repeat
        assert_plot_png(out / png, resumed=True)  # decoded: size, three curves, the resume line
    assert "objective: dino" in (out / "run_dino" / "config.yaml").read_text()
    assert (out / "report.md").exists() and "| dino |" in (out / "report.md").read_text()
    for k, weights in (("swav", "model"), ("dino", "teacher")):  # DINO's row is its teacher
        ev = json.loads((out / "eval" / f"{k}.json").read_text())
        assert (ev["checkpoint_step"], ev["weights_of"]) == (rep["pretraining"]["final_step"], weights)
