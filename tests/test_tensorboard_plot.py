"""What a user looks at: TensorBoard scalars read back from the event files, and the PNG of seer-plot."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator  # dev extra (make install)

from seer_pipeline.train.metrics import MetricsLogger
from seer_pipeline.train.plot import plot_run


LINE = (31, 119, 180)  # matplotlib's first colour (tab:blue, #1f77b4): the plotted curves
DASH = (128, 128, 128)  # the resume marker (grey)


def scalars(tb: Path) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(tb), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _run(tmp: Path, steps: range, resumed_from: int | None = None, scale: float = 1.0) -> None:
    m = MetricsLogger(tmp, rank=0, tensorboard=True, resumed_from=resumed_from)
    for s in steps:
        m.log_step(s, {"loss": scale * 6.0 / s, "lr": 0.01 * s, "img_s": 100.0 + s, "flag": True})
    m.close()


def test_tensorboard_scalars_read_back(tmp_path: Path) -> None:
    _run(tmp_path, range(1, 9))
    got = scalars(tmp_path / "tb")
    assert set(got) == {"train/loss", "train/lr", "train/img_s"}  # booleans are not scalars
    assert [s for s, _ in got["train/loss"]] == list(range(1, 9))
    assert np.allclose([v for _, v in got["train/loss"]], [6.0 / s for s in range(1, 9)])
    assert np.allclose([v for _, v in got["train/lr"]], [0.01 * s for s in range(1, 9)])


def test_tensorboard_after_resume_shows_each_step_once(tmp_path: Path) -> None:
    # Steps 6-8 ran, then the job died; the resume from step 5 rewrites them with new values.
    _run(tmp_path, range(1, 9))
    _run(tmp_path, range(6, 11), resumed_from=5, scale=2.0)
    loss = scalars(tmp_path / "tb")["train/loss"]
    assert [s for s, _ in loss] == list(range(1, 11))
    want = [6.0 / s for s in range(1, 6)] + [12.0 / s for s in range(6, 11)]
    assert np.allclose([v for _, v in loss], want)


def assert_plot_png(path: Path, size: tuple[int, int] = (800, 900), resumed: bool = False) -> None:
    """A decodable PNG of `size` with three panels that each carry a curve (not a blank figure)."""
    im = Image.open(path)
    assert im.format == "PNG" and im.size == size, (im.format, im.size)
    a = np.asarray(im.convert("RGB")).astype(int)
    assert a.std() > 10 and len(np.unique(a.reshape(-1, 3), axis=0)) > 50, "a blank figure"
    line = (np.abs(a - LINE).sum(-1) < 30)
    rows = np.flatnonzero(line.any(1))
    assert line.sum() > 300, line.sum()
    h = size[1]
    for lo, hi in ((0, h // 3), (h // 3, 2 * h // 3), (2 * h // 3, h)):  # one curve per panel
        assert ((rows >= lo) & (rows < hi)).any(), (lo, hi)
    if resumed:
        grey_cols = (np.abs(a - DASH).sum(-1) < 20).sum(0)
        assert grey_cols.max() > h // 10, grey_cols.max()  # a vertical dashed line


def test_plot_png_decodes_with_curves(tmp_path: Path) -> None:
    _run(tmp_path, range(1, 41))
    out = plot_run(tmp_path)
    assert out == tmp_path / "training.png"
    assert_plot_png(out)


def test_plot_png_marks_the_resume(tmp_path: Path) -> None:
    _run(tmp_path, range(1, 41))
    _run(tmp_path, range(21, 61), resumed_from=20)
    assert_plot_png(plot_run(tmp_path, tmp_path / "p.png"), resumed=True)


def test_plot_fails_clearly_without_metrics(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metrics.jsonl has no rows to plot"):
        plot_run(tmp_path)


def test_blank_png_is_caught(tmp_path: Path) -> None:
    Image.new("RGB", (800, 900), "white").save(tmp_path / "blank.png")
    with pytest.raises(AssertionError, match="a blank figure"):
        assert_plot_png(tmp_path / "blank.png")
