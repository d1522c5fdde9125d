"""seer-eval at scale: streaming sources, memmapped features, the acceptance run on real photos,
and `seer-eval compare`."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seer_pipeline.eval import cli, features
from seer_pipeline.eval.compare import CompareError, run_compare
from seer_pipeline.eval.datasets import DataSpecError
from seer_pipeline.eval.sources import ArraySamples, EvalTransform, Source, open_source
from seer_pipeline.eval.feature_stream import extract_features, load_features
from seer_pipeline.eval.supervised import save_trunk

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "tests" / "data" / "photos"
GREY = {"opencv-doc__examples_data_left03.jpg", "opencv-doc__examples_data_right05.jpg",
        "python3-skimage__skimage_data_camera.png", "python3-skimage__skimage_data_coins.png"}


def photo_folder(root: Path) -> Path:
    """The repository's 12 real photos as a labelled imagefolder: grey vs colour, train/ + val/."""
    files = sorted(p for p in PHOTOS.iterdir() if p.suffix in (".jpg", ".png"))
    for i, p in enumerate(files):
        cls = "grey" if p.name in GREY else "colour"
        split = "val" if i % 4 == 3 else "train"
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / split / cls / p.name)
    return root


def test_eval_transform_sizes() -> None:
    img = Image.new("RGB", (640, 480))
    tf = EvalTransform.for_spec("imagefolder:/x", None, None)
    assert (tf.resize, tf.crop) == (256, 224)  # VISSL's eval transform
    assert tf(img).shape == (224, 224, 3)
    assert EvalTransform.for_spec("wds:x", 96, None)(img).shape == (96, 96, 3)
    assert EvalTransform.for_spec("fashion-mnist", None, None) == EvalTransform(None, None)
    small = EvalTransform(None, 32)(Image.new("RGB", (20, 40)))  # smaller than the crop: scaled up
    assert small.shape == (32, 32, 3)


def test_extract_streams_to_memmap_and_matches_in_memory(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (70, 16, 16), dtype=np.uint8)
    labels = np.arange(70) % 3
    splits = (np.arange(70) >= 50).astype(np.int64)
    src = Source("arr", ArraySamples(imgs, labels, splits, EvalTransform()), ["a", "b", "c"], splits)
    trunk = features.build_random("regnety_tiny", seed=0).eval()
    fs = extract_features(trunk, src, tmp_path / "f", batch_size=16, workers=2, progress=False)
    assert isinstance(fs.train_x, np.memmap) and fs.train_x.shape == (50, 16) and fs.test_x.shape == (20, 16)
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == [
        "meta.json", "test.f32", "test_labels.npy", "train.f32", "train_labels.npy"]  # no .partial
    ref = features.extract(trunk, imgs[:50, :, :, None], batch_size=50, progress=False)
    torch.testing.assert_close(torch.from_numpy(np.array(fs.train_x)), ref, rtol=1e-4, atol=1e-5)
    assert np.array_equal(fs.train_y, labels[:50]) and np.array_equal(load_features(tmp_path / "f").test_y, labels[50:])


def test_killed_extraction_leaves_no_complete_looking_file(tmp_path: Path) -> None:
    imgs = np.zeros((40, 8, 8), np.uint8)
    splits = (np.arange(40) % 2).astype(np.int64)
    src = Source("arr", ArraySamples(imgs, np.zeros(40, np.int64), splits, EvalTransform()), ["a"], splits)

    class Dies(torch.nn.Module):
        calls = 0

        def forward_features(self, x: torch.Tensor, stage: int = -1) -> torch.Tensor:
            Dies.calls += 1
            if Dies.calls > 3:
                raise RuntimeError("killed")
            return x.mean((2, 3))

    with pytest.raises(RuntimeError, match="killed"):
        extract_features(Dies(), src, tmp_path / "f", batch_size=8, workers=0, progress=False)
    assert list((tmp_path / "f").iterdir()) == []  # neither a partial nor a final file


def _shards(d: Path) -> str:
    import webdataset as wds

    d.mkdir()
    for s in range(3):
        with wds.TarWriter(str(d / f"s-{s:03d}.tar")) as w:
            for i in range(20):
                buf = io.BytesIO()
                Image.fromarray(np.full((40, 30, 3), 6 * i + s, np.uint8)).save(buf, format="PNG")
                w.write({"__key__": f"{s}-{i:04d}", "png": buf.getvalue(), "cls": str(7 + i % 2).encode()})
            w.write({"__key__": f"{s}-bad", "png": b"not a png", "cls": b"7"})
            w.write({"__key__": f"{s}-nolabel", "png": buf.getvalue()})
    return str(d / "s-{000..002}.tar")


def test_wds_streams_with_workers_and_counts_skips(tmp_path: Path) -> None:
    pattern = _shards(tmp_path / "sh")
    src = open_source(f"wds:{pattern}", EvalTransform(None, 24), test_fraction=0.3)
    assert not src.indexable()
    fs = extract_features(None, src, tmp_path / "f", batch_size=7, workers=2, progress=False)
    assert len(fs.train_y) + len(fs.test_y) == 60 and fs.classes == ["7", "8"]
    assert set(fs.train_y.tolist()) == {0, 1} and fs.train_x.shape[1] == 24 * 24 * 3
    assert fs.skipped == {"undecodable": 3, "no image or cls": 3}
    capped = extract_features(None, src, tmp_path / "g", batch_size=7, workers=2,
                              limits=(10, 5), progress=False)
    assert (len(capped.train_y), len(capped.test_y)) == (10, 5)
    with pytest.raises(DataSpecError, match="no shard"):
        open_source(f"wds:{tmp_path}/none-*.tar", EvalTransform())


def test_wds_split_survives_moving_the_shards(tmp_path: Path) -> None:
    # The split hashes the shard's name and the key, not its folder: a copy of the set on another
    # mount (or under another pytest tmp dir) evaluates on the same test images.
    import shutil

    from seer_pipeline.eval.datasets import load_wds

    _shards(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    got = []
    for d in ("a", "elsewhere/b"):
        src = open_source(f"wds:{tmp_path}/{d}/s-*.tar", EvalTransform(None, 24), test_fraction=0.3)
        fs = extract_features(None, src, tmp_path / d / "f", batch_size=7, workers=0, progress=False)
        mem = load_wds(f"{tmp_path}/{d}/s-*.tar", 24, 0.3)
        # One split rule for both loaders: the same images, in shard order, on the test side.
        # Each image is one flat grey (6 i + s), and standardising keeps the order of greys.
        assert len(mem.test_y) == len(fs.test_y)
        assert np.array_equal(mem.test_x[:, 0, 0, 0].argsort(), fs.test_x[:, 0].argsort())
        got.append((fs.test_x, fs.test_y))
    assert 0 < len(got[0][0]) < 60
    assert np.array_equal(got[0][0], got[1][0]) and np.array_equal(got[0][1], got[1][1])


def test_wds_shard_named_but_missing_is_an_error(tmp_path: Path) -> None:
    """A brace pattern names its shards: one that is not there stops the evaluation with its
    name, instead of an evaluation on the rest that looks complete."""
    pattern = _shards(tmp_path / "sh")  # s-000..002
    wider = pattern.replace("{000..002}", "{000..004}")
    with pytest.raises(DataSpecError, match=r"2 of the 5 shards .* do not exist, first: .*s-003\.tar"):
        open_source(f"wds:{wider}", EvalTransform())
    (tmp_path / "sh" / "s-003.tar").mkdir()
    with pytest.raises(DataSpecError, match=r"folder\(s\), not shards, first: .*s-003\.tar"):
        open_source(f"wds:{tmp_path}/sh/s-*.tar", EvalTransform())


def test_acceptance_linear_on_real_photos(tmp_path: Path) -> None:
    """`seer-eval linear --weights FILE --data imagefolder:DIR` end to end: real photos of any size,
    VISSL's 256/224 transform, DataLoader workers, memmapped features, SGD + L-BFGS, top-1/top-5."""
    root = photo_folder(tmp_path / "photos")
    weights = save_trunk(features.build_random("regnety_tiny", 5), "regnety_tiny", tmp_path / "w", {})
    out = tmp_path / "res.json"
    cmd = [sys.executable, "-m", "seer_pipeline.eval.cli", "linear", "--weights", str(weights),
           "--data", f"imagefolder:{root}", "--protocol", "both", "--workers", "2", "--bn-images", "9",
           "--sgd-epochs", "3", "--features-dir", str(tmp_path / "feats"), "--out", str(out),
           "--no-progress", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r == json.loads(out.read_text())
    assert (r["n_train"], r["n_test"], r["num_classes"], r["feature_dim"]) == (9, 3, 2, 16)
    assert r["bn_images"] == 9 and r["skipped"] == {} and r["device"] == "cpu"
    for k in ("linear", "linear_sgd"):
        assert 0 <= r[k]["accuracy"] <= 100.0 and "top5" not in r[k]  # 2 classes: top-5 would say nothing
    assert "precomputed" in r["linear_sgd"]["protocol"]
    assert r["low_shot"]["1%"]["n_train"] == 2 and "skipped" in r["low_shot"]["1%"]  # too few: said so
    fs = load_features(tmp_path / "feats")
    assert fs.train_x.shape == (9, 16) and np.isfinite(fs.train_x).all()


def test_compare_writes_table_json_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = photo_folder(tmp_path / "photos")
    weights = save_trunk(features.build_random("regnety_tiny", 5), "regnety_tiny", tmp_path / "w", {})
    argv = ["compare", str(weights), "random:regnety_tiny", "--data", f"imagefolder:{root}", "--size", "64",
            "--bn-images", "9", "--sgd-epochs", "2", "--workers", "0", "--low-shot", "",
            "--out", str(tmp_path / "cmp"), "--no-progress"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["models"] == ["trunk", "random:regnety_tiny"]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| trunk |" in md and "SGD linear top-1" in md and "k-NN top-1" in md
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    for name, row, res in zip(summary["models"], summary["rows"], summary["results"]):
        assert row[summary["columns"].index("SGD linear top-1")] == res["linear_sgd"]["accuracy"]
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"] == summary["rows"]


def test_compare_refuses_different_images(tmp_path: Path) -> None:
    import argparse

    digests = iter(["aaaa", "bbbb"])

    def fake(a: argparse.Namespace) -> dict:
        return {"labels_digest": next(digests), "data": "x", "n_train": 1, "n_test": 1, "num_classes": 2}

    args = argparse.Namespace(models=["a", "b"], out=str(tmp_path), out_dir=str(tmp_path))
    with pytest.raises(CompareError, match="different labelled images"):
        run_compare(args, fake)


def test_augmented_protocol_recomputes_features_per_epoch(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--protocol sgd-aug: random-resized crops + flips through the frozen trunk every epoch."""
    import random

    from seer_pipeline.eval.augmented import RandomResizedCropFlip

    random.seed(0)
    tf = RandomResizedCropFlip(16)
    img = Image.fromarray(np.arange(40 * 30, dtype=np.uint8).reshape(30, 40))
    crops = [tf(img) for _ in range(4)]
    assert all(c.shape == (16, 16) for c in crops) and len({c.tobytes() for c in crops}) == 4
    rng = np.random.default_rng(1)
    root = tmp_path / "folder"
    for c, level in (("dark", 50), ("light", 200)):
        (root / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(np.clip(rng.normal(level, 20, (20, 24, 3)), 0, 255).astype(np.uint8)).save(
                root / c / f"{i}.png")
    argv = ["linear", "--weights", "random:regnety_tiny", "--data", f"imagefolder:{root}", "--size", "16",
            "--protocol", "sgd-aug", "--sgd-epochs", "10", "--sgd-lr", "8", "--bn-images", "8",
            "--workers", "0", "--low-shot", "", "--out", str(tmp_path / "r.json"), "--no-progress"]
    assert cli.main(argv) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "recomputed per epoch" in r["linear_sgd"]["protocol"] and r["linear_sgd"]["accuracy"] > 80
    capsys.readouterr()
    wds_data = ["--data", "wds:" + _shards(tmp_path / "sh")]
    assert cli.main(argv[:3] + wds_data + argv[5:]) == 2  # shards cannot be reshuffled: a clear error
    assert "sgd-aug needs" in capsys.readouterr().err
