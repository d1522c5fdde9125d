"""VISSL/SEER checkpoints made from a real timm model by inverting timm's own SEER key rules
(timm/models/regnet.py `_filter_fn`), checked against that function, then read back in every
VISSL layout: consolidated, FSDP-sharded with SEER 10B's `block{s}-part{g}` groups, sliced.
"""
from __future__ import annotations

import re
import weakref
from pathlib import Path

import pytest
import timm
import torch
from timm.models.regnet import _filter_fn

from seer_pipeline.weights import load_weights, save_weights
from seer_pipeline.weights import vissl as V
from seer_pipeline.weights.convert import safe_load
from seer_pipeline.weights.keys import clean_key, rename_trunk, vissl_parts
from tests.interop.conftest import randomize_bn

# timm module names -> classy/VISSL ones: the inverse of the replacements in timm's _filter_fn.
_INV = [("downsample.conv", "proj"), ("downsample.bn", "bn"), ("conv1.conv", "f.a.0"),
        ("conv1.bn", "f.a.1"), ("conv2.conv", "f.b.0"), ("conv2.bn", "f.b.1"),
        ("conv3.conv", "f.c"), ("conv3.bn", "f.final_bn"), ("se.fc1", "f.se.excitation.0"),
        ("se.fc2", "f.se.excitation.2")]


def timm_to_vissl_key(k: str, parts=None) -> str:
    if k.startswith("stem."):
        return k.replace("stem.conv", "_feature_blocks.conv1.stem.0").replace("stem.bn", "_feature_blocks.conv1.stem.1")
    m = re.match(r"^s(\d+)\.b(\d+)\.(.+)$", k)
    assert m, k
    s, b, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    for t, v in _INV:
        if rest.startswith(t + "."):
            rest = v + rest[len(t):]
            break
    else:
        raise AssertionError(k)
    group = "" if parts is None else f"block{s}-part{parts(s - 1, b - 1)}."
    return f"_feature_blocks.res{s + 1}.{group}block{s}-{b - 1}.{rest}"


def seer_head(dim: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A SEER-style SwAV head (dim -> 64 -> 16, 32 prototypes) in VISSL's names, head 0."""
    g = torch.Generator().manual_seed(seed)
    return {"0.projection_head.0.weight": torch.randn(64, dim, generator=g),
            "0.projection_head.0.bias": torch.randn(64, generator=g),
            "0.projection_head.2.weight": torch.randn(16, 64, generator=g),
            "0.projection_head.2.bias": torch.randn(16, generator=g),
            "0.prototypes0.weight": torch.randn(32, 16, generator=g)}


@pytest.fixture(scope="module")
def timm_016() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    m = timm.create_model("regnety_016", pretrained=False, num_classes=0).eval()
    randomize_bn(m)
    return m, m.state_dict()


def test_inverse_rules_round_trip_through_timms_filter(timm_016) -> None:
    _, sd = timm_016
    trunk = {timm_to_vissl_key(k): v for k, v in sd.items()}
    ckpt = V.consolidated(trunk, {})
    back = _filter_fn(ckpt)
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)


@pytest.mark.parametrize("layout", ["consolidated", "sharded-10b", "sliced"])
def test_vissl_layouts_read_back(timm_016, photos224: torch.Tensor, tmp_path: Path, layout: str) -> None:
    model, sd = timm_016
    head = seer_head(sd["s4.b1.conv3.conv.weight"].shape[0])
    depths = [max(int(k.split(".")[1][1:]) for k in sd if k.startswith(f"s{s}.")) for s in range(1, 5)]
    path = tmp_path / "model_final_checkpoint_phase0.torch"
    if layout == "consolidated":
        V.save_torch(V.consolidated({timm_to_vissl_key(k): v for k, v in sd.items()}, head), path)
    elif layout == "sliced":
        V.write_sliced({timm_to_vissl_key(k): v for k, v in sd.items()}, head, path)
    else:  # SEER 10B's stage_checkpoints [[2], [7], [9, 17], []] (regnet10B.yaml), scaled to 1.6GF depths
        parts = vissl_parts(depths, [[1], [2], [4, 7], []])
        trunk = {timm_to_vissl_key(k, parts): v for k, v in sd.items()}
        assert any("-part1.block3-" in k for k in trunk) and any("-part2.block3-" in k for k in trunk)
        V.write_sharded(trunk, head, path, world_size=3)
    ws = load_weights(path)
    assert ws.source_format == "vissl" and ws.preset == "regnety_1.6gf"
    theirs = rename_trunk("timm", sd)
    assert set(ws.trunk) == set(theirs) and all(torch.equal(ws.trunk[k], theirs[k]) for k in theirs)
    assert set(ws.head) == {"projection.0.weight", "projection.0.bias", "projection.2.weight",
                            "projection.2.bias", "prototypes.weight"}
    assert torch.equal(ws.head["prototypes.weight"], head["0.prototypes0.weight"])
    # features: our trunk with these weights == timm's
    from seer_pipeline.models import build_trunk

    ours = build_trunk("regnety_1.6gf").eval()
    ours.load_state_dict(ws.trunk, strict=True)
    with torch.no_grad():
        assert (ours(photos224) - model(photos224)).abs().max().item() <= 1e-5
    # the head travels to our format and back to VISSL; timm's own reader takes our VISSL export
    save_weights(ws, "seer", tmp_path / "ours.pt")
    mine = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert set(mine) == {"trunk", "head"} and torch.equal(mine["head"]["prototypes.weight"], head["0.prototypes0.weight"])
    save_weights(load_weights(tmp_path / "ours.pt"), "vissl", tmp_path / "again.torch")
    again = torch.load(tmp_path / "again.torch", weights_only=True)
    assert again["type"] == "consolidated"
    assert all(torch.equal(again["classy_state_dict"]["base_model"]["model"]["heads"][k], v) for k, v in head.items())
    via_timm = _filter_fn(again)
    assert set(via_timm) == set(sd) and all(torch.equal(via_timm[k], sd[k]) for k in sd)


def test_sharded_read_holds_one_shard_at_a_time(tmp_path: Path) -> None:
    """While shard r+1 is read, no tensor of shard r's file is alive any more."""
    from seer_pipeline.models import build_trunk

    sd = {k: v for k, v in build_trunk("cpu_tiny").state_dict().items()}
    from seer_pipeline.weights.keys import trunk_from_ours

    trunk = trunk_from_ours("vissl", sd, vissl_parts([1, 2, 2], [[], [1], []]))
    out = tmp_path / "m.torch"
    V.write_sharded(trunk, {}, out, world_size=4)
    alive: list[weakref.ref] = []
    peaks = []

    def load(p: Path):
        peaks.append(sum(r() is not None for r in alive))
        obj = safe_load(p)
        if obj.get("type") == "shard":
            for k, t in obj["classy_state_dict"]["base_model"]["model"]["trunk"].items():
                if "running" not in k and "num_batches" not in k:  # buffers: kept from shard 0
                    alive.append(weakref.ref(t))
        return obj

    lst = safe_load(out)
    full, _ = V.consolidate_shards([tmp_path / s for s in lst["shards"]], load)
    assert peaks == [0, 0, 0, 0]
    renamed = rename_trunk("vissl", full)
    assert all(torch.equal(renamed[k], v) for k, v in sd.items())


def test_broken_shard_sets_fail_clearly(tmp_path: Path) -> None:
    from seer_pipeline.models import build_trunk
    from seer_pipeline.weights import WeightsFormatError
    from seer_pipeline.weights.keys import trunk_from_ours

    trunk = trunk_from_ours("vissl", build_trunk("cpu_tiny").state_dict())
    out = tmp_path / "m.torch"
    files = V.write_sharded(trunk, {}, out, world_size=2)
    with pytest.raises(WeightsFormatError, match="shard_list"):
        load_weights(files[0])  # one shard alone
    files[1].unlink()
    with pytest.raises(WeightsFormatError, match="shard 1 of 2 is missing"):
        load_weights(out)


def test_fsdp_wrapper_segments_are_ignored() -> None:
    k = "_feature_blocks.res3._fsdp_wrapped_module.block2-part0.block2-1._fpw_module.f.a.0.weight"
    assert clean_key(k) == "_feature_blocks.res3.block2-part0.block2-1.f.a.0.weight"
    assert rename_trunk("vissl", {k: torch.zeros(1)}) == {"stages.1.blocks.1.a.conv.weight": torch.zeros(1)}
