"""seer-eval, as a new user meets it: `--device cuda` on a machine without CUDA is one line,
top-5 is not reported for a set of 5 classes or fewer, and the progress bar counts a batch only
once its features are computed."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from seer_pipeline.eval import cli as eval_cli
from seer_pipeline.eval import feature_stream as stream
from seer_pipeline.eval.sources import EvalTransform, open_source


def _imagefolder(root: Path, classes: int, per_class: int) -> Path:
    from PIL import Image

    rng = random.Random(0)
    for k in range(classes):
        for i in range(per_class):
            im = Image.new("RGB", (24, 24), ((70 * k) % 256, 200 - 50 * k, 40 + 60 * k))
            for _ in range(20):
                im.putpixel((rng.randrange(24), rng.randrange(24)), (rng.randrange(256),) * 3)
            (root / f"c{k}").mkdir(parents=True, exist_ok=True)
            im.save(root / f"c{k}" / f"{i}.png")
    return root


def test_device_cuda_without_cuda_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = _imagefolder(tmp_path / "pets", 3, 4)
    out = tmp_path / "r.json"
    rc = eval_cli.main(["linear", "--weights", "random:cpu_tiny", "--data", f"imagefolder:{data}",
                        "--device", "cuda", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("seer-eval: error: --device cuda:"), err
    assert "--device cpu" in lines[0] and "Traceback" not in err
    assert not out.exists()


def test_device_problem_accepts_cpu_and_default():
    assert eval_cli.device_problem(None) == ""
    assert eval_cli.device_problem("cpu") == ""


@pytest.mark.slow
def test_no_top5_for_three_classes(tmp_path):
    data = _imagefolder(tmp_path / "pets", 3, 10)
    out = tmp_path / "r.json"
    rc = eval_cli.main(["all", "--weights", "random:cpu_tiny", "--data", f"imagefolder:{data}",
                        "--size", "24", "--resize", "24", "--bn-images", "8", "--sgd-epochs", "1",
                        "--max-iter", "5", "--workers", "0", "--low-shot", "50",
                        "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["num_classes"] == 3
    for key in ("linear_sgd", "knn"):
        assert "accuracy" in res[key] and "top5" not in res[key], res[key]
    for r in res["low_shot"].values():
        assert "top5" not in r


def test_top5_kept_for_ten_classes():
    out = {"knn": {"accuracy": 50.0, "top5": 90.0}, "low_shot": {"10%": {"accuracy": 1.0, "top5": 2.0}}}
    eval_cli.drop_trivial_top5(out, 10)
    assert out["knn"]["top5"] == 90.0 and out["low_shot"]["10%"]["top5"] == 2.0
    eval_cli.drop_trivial_top5(out, 5)
    assert "top5" not in out["knn"] and "top5" not in out["low_shot"]["10%"]


class _Bar:
    def __init__(self) -> None:
        self.n = 0

    def update(self, k: int) -> None:
        self.n += k

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Trunk(nn.Module):
    """Records how far the bar had got when each batch was computed."""

    def __init__(self, bar: _Bar) -> None:
        super().__init__()
        self.bar, self.seen_at = bar, []
        self.lin = nn.Linear(3, 4)

    def forward_features(self, x: torch.Tensor, stage: int = -1) -> torch.Tensor:
        self.seen_at.append(self.bar.n)
        return self.lin(x.mean(dim=(2, 3)))


def test_progress_counts_a_batch_after_its_features(tmp_path, monkeypatch):
    data = _imagefolder(tmp_path / "pets", 2, 6)  # 12 images, batches of 4
    src = open_source(f"imagefolder:{data}", EvalTransform(None, 24), 0.25)
    bar = _Bar()
    monkeypatch.setattr(stream, "_progress", lambda total, desc, on: bar)
    trunk = _Trunk(bar)
    fs = stream.extract_features(trunk, src, tmp_path / "f", batch_size=4, workers=0,
                                 total=12, progress=True)
    assert bar.n == 12
    # Each batch (split into train and test parts) is computed before the bar counts it.
    assert sorted(set(trunk.seen_at)) == [0, 4, 8], trunk.seen_at
    assert len(fs.train_y) + len(fs.test_y) == 12
    assert np.isfinite(fs.train_x[:]).all()
