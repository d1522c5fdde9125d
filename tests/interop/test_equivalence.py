"""Our trunk with imported timm / torchvision weights computes their pooled features, and a
round trip ours -> theirs -> ours is bitwise. Their side is randomly initialised (no hub here).

The 32GF / 128GF cases build two copies of a 145M / 645M-parameter trunk on CPU (up to ~6 GB)
and run one forward each on two real photos: they are marked slow.
"""
from __future__ import annotations

import gc
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from seer_pipeline.models import build_trunk, get_config, list_trunks
from seer_pipeline.weights import (
    TIMM_NAMES, TORCHVISION_NAMES, WeightSet, arch_of_config, infer_arch, load_weights, save_weights,
)
from seer_pipeline.weights.keys import rename_trunk
from tests.interop.conftest import randomize_bn

TOL = 1e-5  # max abs difference of pooled fp32 features (issue #14)


def tv_model(name: str, meta: bool = False) -> torch.nn.Module:
    """A torchvision RegNet; on the meta device its width maths still runs on CPU (it calls
    .tolist() on tensors, which meta tensors cannot do)."""
    from torchvision.models.regnet import BlockParams

    if not meta:
        return getattr(torchvision.models, name)(weights=None)
    orig = BlockParams.from_init_params.__func__

    def on_cpu(cls, *a, **k):
        with torch.device("cpu"):
            return orig(cls, *a, **k)

    BlockParams.from_init_params = classmethod(on_cpu)
    try:
        with torch.device("meta"):
            return getattr(torchvision.models, name)(weights=None)
    finally:
        BlockParams.from_init_params = classmethod(orig)


def _ours_from(path: Path, preset: str) -> tuple[WeightSet, torch.nn.Module]:
    ws = load_weights(path)  # no preset given: found from the shapes, whatever the file name
    assert ws.preset == preset and ws.source_format in ("timm", "torchvision")
    with torch.device("meta"):
        ours = build_trunk(preset)
    ours.load_state_dict(ws.trunk, strict=True, assign=True)
    return ws, ours.eval()


def _compare(theirs: torch.nn.Module, ours: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        a, b = theirs(x), ours(x)
    assert a.shape == b.shape == (x.shape[0], ours.out_dim)
    assert a.abs().max() > 1e-2, "features vanished: the comparison would prove nothing"
    diff = (a - b).abs().max().item()
    print(f"{type(theirs).__module__}: max |feature| {a.abs().max().item():.3g}, max abs diff {diff:.3g}")
    return diff


def _check_timm(ours_name: str, x: torch.Tensor, tmp_path: Path) -> None:
    name = TIMM_NAMES[ours_name]
    torch.manual_seed(0)
    theirs = timm.create_model(name, pretrained=False, num_classes=0).eval()
    randomize_bn(theirs)
    sd = theirs.state_dict()
    src = tmp_path / "regnety_320.pth"  # a misleading name: the shapes decide
    torch.save(sd, src)
    ws, ours = _ours_from(src, ours_name)
    diff = _compare(theirs, ours, x)
    assert diff <= TOL, f"{name}: max abs diff {diff}"
    # ours -> timm -> ours, bitwise; the export loads strictly into timm's model
    out = tmp_path / "export.pth"
    save_weights(ws, "timm", out)
    trunk = ws.trunk
    del ours, ws
    back = torch.load(out, weights_only=True, mmap=True)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    theirs.load_state_dict(back, strict=True)
    again = rename_trunk("timm", back)
    assert all(torch.equal(again[k], v) for k, v in trunk.items()) and set(again) == set(trunk)


def _check_torchvision(ours_name: str, x: torch.Tensor, tmp_path: Path) -> None:
    name = TORCHVISION_NAMES[ours_name]
    torch.manual_seed(0)
    theirs = tv_model(name).eval()
    randomize_bn(theirs)
    theirs.fc = torch.nn.Identity()  # pooled features, as our trunk gives
    sd = theirs.state_dict()
    src = tmp_path / "tv.pth"
    torch.save(sd, src)
    ws, ours = _ours_from(src, ours_name)
    diff = _compare(theirs, ours, x)
    assert diff <= TOL, f"{name}: max abs diff {diff}"
    out = tmp_path / "export_tv.pth"
    save_weights(ws, "torchvision", out)
    trunk = ws.trunk
    del ours, ws
    back = torch.load(out, weights_only=True, mmap=True)
    assert all(torch.equal(back[k], sd[k]) for k in sd) and set(back) == set(sd)
    fresh = tv_model(name, meta=True)
    res = fresh.load_state_dict(back, strict=False, assign=True)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and not res.unexpected_keys
    again = rename_trunk("torchvision", back)
    assert all(torch.equal(again[k], v) for k, v in trunk.items()) and set(again) == set(trunk)


def test_regnety_016_matches_timm(photos224: torch.Tensor, tmp_path: Path) -> None:
    _check_timm("regnety_1.6gf", photos224, tmp_path)


def test_regnety_016_matches_torchvision(photos224: torch.Tensor, tmp_path: Path) -> None:
    _check_torchvision("regnety_1.6gf", photos224, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("ours_name", ["regnety_32gf", "regnety_128gf"])
def test_seer_sizes_match_timm(ours_name: str, photos224: torch.Tensor, tmp_path: Path) -> None:
    _check_timm(ours_name, photos224, tmp_path)
    gc.collect()


@pytest.mark.slow
@pytest.mark.parametrize("ours_name", ["regnety_32gf", "regnety_128gf"])
def test_seer_sizes_match_torchvision(ours_name: str, photos224: torch.Tensor, tmp_path: Path) -> None:
    _check_torchvision(ours_name, photos224, tmp_path)
    gc.collect()


def test_name_tables_name_the_same_shapes() -> None:
    """Every timm / torchvision name we print for a preset builds exactly its shapes (meta)."""
    for ours, name in TIMM_NAMES.items():
        with torch.device("meta"):
            m = timm.create_model(name, pretrained=False, num_classes=0)
        assert infer_arch(rename_trunk("timm", m.state_dict())) == arch_of_config(get_config(ours)), name
    for ours, name in TORCHVISION_NAMES.items():
        m = tv_model(name, meta=True)
        sd = {k: v for k, v in m.state_dict().items() if not k.startswith("fc.")}
        assert infer_arch(rename_trunk("torchvision", sd)) == arch_of_config(get_config(ours)), name
    assert set(TIMM_NAMES) <= set(list_trunks())
