"""seer-eval: idx reader and PNG export, data specs, BN re-estimation, k-NN, linear probe, CLI."""
from __future__ import annotations

import gzip
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seer_pipeline.eval import fmnist
from seer_pipeline.eval import cli, features
from seer_pipeline.eval.datasets import DataSpecError, load_data
from seer_pipeline.eval.knn import knn_accuracy, knn_classify
from seer_pipeline.eval.linear import linear_probe
from seer_pipeline.eval.supervised import augment, save_trunk

torch.set_num_threads(1)


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture()
def fake_fmnist(tmp_path: Path) -> Path:
    """A 40/20-image Fashion-MNIST look-alike: class k is a bright k-th horizontal band."""
    rng = np.random.default_rng(0)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 4
        x = rng.integers(0, 40, (n, 28, 28))
        for i, c in enumerate(y):
            x[i, 7 * c:7 * c + 7] += 200
        return x.astype(np.uint8), y.astype(np.uint8)

    d = tmp_path / "fm"
    d.mkdir()
    for split, n in (("train", 40), ("test", 20)):
        x, y = make(n)
        _write_idx(d / fmnist.FILES[(split, "images")], x)
        _write_idx(d / fmnist.FILES[(split, "labels")], y)
    return d


def test_idx_roundtrip_and_bad_header(tmp_path: Path, fake_fmnist: Path) -> None:
    x, y = fmnist.load_split("train", fake_fmnist)
    assert x.shape == (40, 28, 28) and x.dtype == np.uint8 and list(y[:5]) == [0, 1, 2, 3, 0]
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x0D, 1) + struct.pack(">I", 2) + b"\0" * 8)  # float idx
    with pytest.raises(ValueError, match="not a uint8 idx"):
        fmnist.read_idx(bad)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", 10) + b"\0" * 3)
    with pytest.raises(ValueError, match="holds 3 bytes"):
        fmnist.read_idx(short)


def test_missing_dataset_names_package_and_files(tmp_path: Path) -> None:
    with pytest.raises(fmnist.FashionMNISTMissing) as e:
        fmnist.check_dir(tmp_path)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "train-images-idx3-ubyte.gz" in msg


def test_export_pngs_is_a_faithful_idempotent_dump(tmp_path: Path, fake_fmnist: Path) -> None:
    out = tmp_path / "raw"
    assert fmnist.export_pngs(out, fake_fmnist, limit=25, progress=False) == 25
    files = sorted(out.rglob("*.png"))
    assert len(files) == 25
    x, _ = fmnist.load_split("train", fake_fmnist)
    assert np.array_equal(np.asarray(Image.open(files[7])), x[7])
    mtime = files[0].stat().st_mtime_ns
    fmnist.export_pngs(out, fake_fmnist, limit=25, progress=False)
    assert files[0].stat().st_mtime_ns == mtime  # kept, not rewritten


def test_knn_weighted_vote_and_accuracy() -> None:
    # One very close neighbour of class 1 outweighs two far ones of class 0 at T = 0.07.
    train = torch.tensor([[1.0, 0.02], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([1, 0, 0])
    test = torch.tensor([[1.0, 0.0]])
    assert knn_classify(train, labels, test, 2, k=3, temperature=0.07).item() == 1
    # With a huge temperature the votes are nearly equal: plain majority wins.
    assert knn_classify(train, labels, test, 2, k=3, temperature=1e4).item() == 0
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g) * 5
    y = torch.arange(500) % 5
    x = centres[y] + torch.randn(500, 16, generator=g)
    assert knn_accuracy(x[:400], y[:400], x[400:], y[400:], 5) > 95
    with pytest.raises(ValueError):
        knn_classify(train, labels, test, 2, k=0)


def test_linear_probe_separable_vs_shuffled_labels() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(1200) % 4
    x = torch.randn(1200, 20, generator=g) + 3 * torch.nn.functional.one_hot(y, 20).float()
    res = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], 4, max_iter=50)
    assert res.accuracy > 95 and set(res.val_accuracy) and res.weight_decay in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    shuffled = y[:1000][torch.randperm(1000, generator=g)]
    bad = linear_probe(x[:1000], shuffled, x[1000:], y[1000:], 4, max_iter=50)
    assert bad.accuracy < 45  # labels carry no signal: near chance (25%)


def test_bn_recalibration_gives_exact_statistics() -> None:
    trunk = features.build_random("regnety_tiny", seed=0)
    images = np.random.default_rng(0).integers(0, 255, (64, 16, 16, 1), dtype=np.uint8)
    n = features.recalibrate_bn(trunk, images, n=64, batch_size=16, progress=False)
    assert n == 64 and not trunk.training
    with torch.no_grad():
        h = trunk.stem.conv(features.to_input(images))
    torch.testing.assert_close(trunk.stem.bn.running_mean, h.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert trunk.stem.bn.momentum == 0.1  # restored


def test_trunk_file_roundtrip_and_wrong_file(tmp_path: Path) -> None:
    trunk = features.build_random("regnety_tiny", seed=3)
    path = save_trunk(trunk, "regnety_tiny", tmp_path / "sup", {"steps": 0})
    spec = features.parse_checkpoint(str(path))
    assert spec.kind == "file" and spec.trunk_name == "regnety_tiny"
    loaded = features.load_trunk(spec, seed=99)  # a different seed: weights must come from the file
    for k, v in trunk.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    torch.save({"other.weight": torch.zeros(3)}, tmp_path / "sup" / "junk.pt")
    with pytest.raises(features.CheckpointSpecError, match=r"RegNetY.*formats: seer, timm, torchvision, vissl"):
        features.load_trunk(features.parse_checkpoint(str(tmp_path / "sup" / "junk.pt")))
    with pytest.raises(features.CheckpointSpecError, match="no such"):
        features.parse_checkpoint(str(tmp_path / "nothing"))


def _imagefolder(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for c, level in (("dark", 40), ("light", 210)):
        (root / c).mkdir(parents=True)
        for i in range(15):
            arr = np.clip(rng.normal(level, 25, (20, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    (root / "light" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def test_cli_imagefolder_raw_and_random(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _imagefolder(tmp_path / "folder")
    argv = ["--data", f"imagefolder:{root}", "--size", "16", "--no-progress", "--out-dir", str(tmp_path / "ev")]
    assert cli.main(["linear", "--checkpoint", "raw", "--protocol", "both", *argv]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["linear"]["accuracy"] == 100.0 and res["skipped"] == {"undecodable": 1}
    assert res["linear_sgd"]["accuracy"] == 100.0 and "top5" not in res["linear_sgd"]  # 2 classes: top-5 says nothing
    assert res["n_train"] + res["n_test"] == 30 and Path(res["out"]).is_file()
    assert cli.main(["all", "--checkpoint", "random:regnety_tiny", "--bn-images", "8", *argv]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["kind"] == "random" and res["feature_dim"] == 16 and 0 <= res["knn"]["accuracy"] <= 100
    assert json.loads(Path(res["out"]).read_text())["knn"] == res["knn"]


def test_cli_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["knn", "--checkpoint", "raw", "--data", "mnist:/x"]) == 2
    assert "fashion-mnist[:DIR]" in capsys.readouterr().err
    assert cli.main(["knn", "--checkpoint", "raw", "--data", f"fashion-mnist:{tmp_path}"]) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err
    assert cli.main(["knn", "--checkpoint", "random:no_such_trunk", "--data", "fashion-mnist"]) == 2


def test_wds_spec_reads_labels_from_cls(tmp_path: Path) -> None:
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "s-000.tar")) as w:
        for i in range(24):
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(buf, format="PNG")
            w.write({"__key__": f"{i:04d}", "png": buf.getvalue(), "cls": str(i % 3 + 5).encode()})
        w.write({"__key__": "nolabel", "png": buf.getvalue()})
    data = load_data(f"wds:{tmp_path}/s-*.tar")
    assert data.classes == ["5", "6", "7"] and len(data.train_y) + len(data.test_y) == 24
    assert data.skipped == {"no image or cls": 1} and data.train_x.shape[1:] == (8, 8, 3)
    with pytest.raises(DataSpecError, match="no shard"):
        load_data(f"wds:{tmp_path}/none-*.tar")


def test_augment_translates_and_flips() -> None:
    # Fails on a no-op augmentation: flips and shifts must both happen, and nothing else.
    x = torch.arange(64 * 3 * 6 * 6, dtype=torch.float32).view(64, 3, 6, 6)
    out = augment(x, torch.Generator().manual_seed(0), pad=0)
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(64)]
    assert all(f or torch.equal(out[i], x[i]) for i, f in enumerate(flipped))
    assert 16 <= sum(flipped) <= 48  # p = 0.5 each
    out = augment(x, torch.Generator().manual_seed(0), pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    shifted = 0
    for i in range(64):
        views = {(dy, dx): padded[i, :, dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)}
        match = [k for k, v in views.items() if torch.equal(out[i], v) or torch.equal(out[i], v.flip(2))]
        assert match, f"sample {i} is not a shift (<= 2 px) of its input, mirrored or not"
        shifted += match[0] != (2, 2)
    assert shifted >= 32  # 24 of 25 offsets move the image


def test_fashion_mnist_raw_pixels_beat_chance() -> None:
    """The real dataset (CI installs dataset-fashion-mnist): raw-pixel probe on a subset."""
    data = load_data("fashion-mnist").subset(2000, 500)
    xtr = features.extract(None, data.train_x, progress=False)
    xte = features.extract(None, data.test_x, progress=False)
    assert xtr.shape == (2000, 784)
    res = linear_probe(xtr, torch.from_numpy(data.train_y), xte, torch.from_numpy(data.test_y), 10, max_iter=30)
    assert res.accuracy > 70
