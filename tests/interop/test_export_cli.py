"""`seer-ckpt export` between every pair of formats, from files and from a run folder; imports
through `init.weights` / `seer-eval --weights` / `seer-ckpt consolidate`; refusals."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from seer_pipeline.weights.cli import main as ckpt_main
from seer_pipeline.models import build_trunk
from seer_pipeline.weights import ArchMismatchError, WeightsFormatError, load_trunk_state, load_weights
from seer_pipeline.weights import vissl as V
from tests.interop.conftest import randomize_bn

FORMATS = ["seer", "timm", "torchvision", "vissl"]


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    torch.manual_seed(3)
    t = build_trunk("cpu_tiny")
    randomize_bn(t)
    path = tmp_path_factory.mktemp("tiny") / "trunk.pt"
    torch.save(t.state_dict(), path)
    return path, t.state_dict()


@pytest.mark.parametrize("a", FORMATS)
@pytest.mark.parametrize("b", FORMATS)
def test_export_between_every_pair(tiny_file, tmp_path: Path, a: str, b: str) -> None:
    src, sd = tiny_file
    fa, fb = tmp_path / f"a.{a}", tmp_path / f"b.{b}"
    assert ckpt_main(["export", str(src), "--format", a, "--out", str(fa)]) == 0
    assert ckpt_main(["export", str(fa), "--format", b, "--out", str(fb), "--trunk", "cpu_tiny"]) == 0
    torch.load(fb, weights_only=True)  # every output loads weights-only
    info = json.loads(Path(str(fb) + ".json").read_text())
    assert info["format"] == b and info["trunk"] == "cpu_tiny"
    ws = load_weights(fb)
    assert ws.source_format == b and set(ws.trunk) == set(sd)
    assert all(torch.equal(ws.trunk[k], v) for k, v in sd.items())


def test_timm_export_of_016_loads_strictly_into_timm(tmp_path: Path) -> None:
    t = build_trunk("regnety_1.6gf")
    src = tmp_path / "ours.pt"
    torch.save(t.state_dict(), src)
    out = tmp_path / "timm.pth"
    assert ckpt_main(["export", str(src), "--format", "timm", "--out", str(out)]) == 0
    info = json.loads(Path(str(out) + ".json").read_text())
    assert info["timm_name"] == "regnety_016" and info["torchvision_name"] == "regnet_y_1_6gf"
    m = timm.create_model(info["timm_name"], pretrained=False, num_classes=0)
    m.load_state_dict(torch.load(out, weights_only=True), strict=True)


def test_wrong_trunk_is_refused_with_the_shapes(tiny_file, tmp_path: Path, capsys) -> None:
    src, _ = tiny_file
    assert ckpt_main(["export", str(src), "--format", "timm", "--out", str(tmp_path / "x"),
                      "--trunk", "regnety_1.6gf"]) == 1
    err = capsys.readouterr().err
    assert "not a regnety_1.6gf" in err and "widths [32, 64, 192]" in err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ArchMismatchError):
        load_trunk_state(src, "regnety_tiny")


def test_classifier_travels_to_timm_and_torchvision(tiny_file, tmp_path: Path) -> None:
    src, sd = tiny_file
    clf = {"weight": torch.randn(10, 192), "bias": torch.randn(10)}
    ours = tmp_path / "with_clf.pt"
    torch.save({"trunk": sd, "classifier": clf}, ours)
    for fmt, key in (("timm", "head.fc.weight"), ("torchvision", "fc.weight"), ("vissl", None)):
        out = tmp_path / f"c.{fmt}"
        assert ckpt_main(["export", str(ours), "--format", fmt, "--out", str(out)]) == 0
        obj = torch.load(out, weights_only=True)
        if key:
            assert torch.equal(obj[key], clf["weight"])
        ws = load_weights(out)
        assert torch.equal(ws.classifier["bias"], clf["bias"])
    # with a SwAV head too, VISSL keeps both (head 0: SwAV, head 1: the classifier)
    head = {"projection.0.weight": torch.randn(8, 192), "projection.0.bias": torch.randn(8),
            "prototypes.weight": torch.randn(5, 8)}
    both = tmp_path / "both.pt"
    torch.save({"trunk": sd, "head": head, "classifier": clf}, both)
    assert ckpt_main(["export", str(both), "--format", "vissl", "--out", str(tmp_path / "both.vissl")]) == 0
    ws = load_weights(tmp_path / "both.vissl")
    assert torch.equal(ws.classifier["weight"], clf["weight"]) and set(ws.head) == set(head)
    assert not ws.skipped


def test_run_folder_export_carries_the_head(tmp_path: Path) -> None:
    """A DCP checkpoint like the trainer's: trunk + SwAV head come out; timm gets the trunk."""
    import torch.distributed.checkpoint as dcp
    from omegaconf import OmegaConf

    from seer_pipeline.config.train import load_train_config
    from seer_pipeline.models.swav_head import build_model

    cfg = load_train_config(None, ["model.trunk=cpu_tiny", "model.n_prototypes=30"])
    torch.manual_seed(5)
    model = build_model(cfg)
    step = tmp_path / "run" / "checkpoints" / "step_000000007"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(step), no_dist=True)
    (step / "meta.json").write_text(json.dumps({"step": 7, "world_size": 1, "files": {},
                                                "config_yaml": OmegaConf.to_yaml(cfg)}))
    run = tmp_path / "run"
    for fmt in ("seer", "vissl"):
        out = tmp_path / f"run.{fmt}"
        assert ckpt_main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
        ws = load_weights(out)
        assert torch.equal(ws.head["prototypes.weight"], model.head.prototypes.weight.detach())
        assert all(torch.equal(ws.trunk[k], v) for k, v in model.trunk.state_dict().items())
    out = tmp_path / "run.timm"
    assert ckpt_main(["export", str(run), "--format", "timm", "--out", str(out)]) == 0
    assert "head" not in json.dumps(sorted(torch.load(out, weights_only=True)))
    assert json.loads(Path(str(out) + ".json").read_text())["trunk"] == "cpu_tiny"


def test_consolidate_imports_a_foreign_file(tiny_file, tmp_path: Path) -> None:
    src, sd = tiny_file
    tv = tmp_path / "tv.pth"
    assert ckpt_main(["export", str(src), "--format", "torchvision", "--out", str(tv)]) == 0
    out = tmp_path / "trunk.pt"
    assert ckpt_main(["consolidate", str(tv), "--out", str(out)]) == 0
    t = build_trunk("cpu_tiny")
    t.load_state_dict(torch.load(out, weights_only=True), strict=True)  # our plain trunk dict
    assert all(torch.equal(t.state_dict()[k], v) for k, v in sd.items())


def test_eval_and_warm_start_read_foreign_files(tiny_file, tmp_path: Path) -> None:
    from seer_pipeline.eval.features import CheckpointSpecError, load_trunk, parse_checkpoint

    src, sd = tiny_file
    out = tmp_path / "t.timm"
    assert ckpt_main(["export", str(src), "--format", "timm", "--out", str(out)]) == 0
    trunk = load_trunk(parse_checkpoint(f"{out}", trunk="cpu_tiny"))  # seer-eval --weights
    assert all(torch.equal(trunk.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(CheckpointSpecError, match="not a fmnist_small"):
        load_trunk(parse_checkpoint(f"{out}", trunk="fmnist_small"))
    # init.weights: the trainer's one loading call
    assert set(load_trunk_state(f"timm:{out}", "cpu_tiny")) == set(sd)
    with pytest.raises(WeightsFormatError, match="declared torchvision"):
        load_trunk_state(f"torchvision:{out}", "cpu_tiny")


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/seer-weights-evil-was-run"),))


def test_unpickling_never_runs_code(tiny_file, tmp_path: Path) -> None:
    src, sd = tiny_file
    marker = Path("/tmp/seer-weights-evil-was-run")
    marker.unlink(missing_ok=True)
    bad = tmp_path / "evil.torch"
    with open(bad, "wb") as f:
        torch.save({"type": "consolidated", "hook": _Evil(),
                    "classy_state_dict": {"base_model": {"model": {"trunk": {}, "heads": {}}}}}, f,
                   pickle_protocol=2)
    with pytest.raises(WeightsFormatError, match="refuses"):
        load_weights(bad)
    assert not marker.exists()
    # numpy scalars (VISSL loss/meter state) pass the allow-list, and that is reported
    from seer_pipeline.weights.keys import trunk_from_ours

    ok = tmp_path / "np.torch"
    V.save_torch({**V.consolidated(trunk_from_ours("vissl", sd), {}), "iteration": np.int64(5),
                  "loss": np.float32(1.5)}, ok)
    ws = load_weights(ok)
    assert any("allow-listed numpy" in n for n in ws.notes)
    assert set(ws.trunk) == set(sd)


def test_garbage_and_truncated_files_fail_clearly(tiny_file, tmp_path: Path, capsys) -> None:
    src, _ = tiny_file
    blob = src.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"hello")
    for name in ("trunc.pt", "garbage.pt"):
        assert ckpt_main(["export", str(tmp_path / name), "--format", "timm", "--out", str(tmp_path / "o")]) == 1
        assert f"{name}: not a readable torch file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
