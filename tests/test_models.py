"""RegNetY trunks: SEER pins (widths, depths, parameters, MACs), meta builds, forward, init."""
from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from seer_pipeline.models import (
    SEER_TRUNKS, RegNetConfig, RegNetConfigError, adjust_to_groups, build_trunk, count_macs,
    get_config, list_trunks, regnet_widths_depths,
)

# Issue 4's table (VISSL SEER configs; parameter counts agree with timm's regnety_320/640/1280/
# 2560 without their classifier; MACs from torch.utils.flop_counter on timm's models).
SEER_PINS = {
    "regnety_32gf": ([2, 5, 12, 1], [232, 696, 1392, 3712], 141.3, 32.28),
    "regnety_64gf": ([2, 5, 12, 1], [328, 984, 1968, 4920], 276.5, 64.07),
    "regnety_128gf": ([2, 7, 17, 1], [528, 1056, 2904, 7392], 637.4, 127.51),
    "regnety_256gf": ([2, 7, 17, 1], [746, 1492, 4103, 10444], 1272.2, 254.37),
    "regnety_10b": ([2, 7, 17, 1], [2020, 4040, 11110, 28280], 9323.9, None),
}
# RegNet paper (Radosavovic et al. 2020) / pycls zoo: parameters *with* a 1000-way classifier,
# and the "flops" column (pycls counts multiply-adds).
PAPER_PINS = {"regnety_400mf": (4.3, 0.4), "regnety_800mf": (6.3, 0.8), "regnety_1.6gf": (11.2, 1.6)}


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _meta(name: str) -> nn.Module:
    with torch.device("meta"):
        return build_trunk(name)


@pytest.mark.parametrize("name", list(SEER_PINS))
def test_seer_configs_pinned(name: str) -> None:
    depths, widths, params_m, macs_g = SEER_PINS[name]
    cfg = get_config(name)
    assert cfg.stage_depths == depths and cfg.stage_widths == widths
    start = time.perf_counter()
    trunk = _meta(name)
    assert time.perf_counter() - start < 5.0  # issue: "the 10B model in about a second"
    assert all(p.is_meta for p in trunk.parameters())
    assert round(_params(trunk) / 1e6, 1) == params_m
    assert trunk.out_dim == widths[-1] and trunk.stage_dims == widths
    assert [len(s.blocks) for s in trunk.stages] == depths
    if macs_g is not None:
        assert round(count_macs(trunk, 224) / 1e9, 2) == macs_g


def test_seer_list_and_lookup() -> None:
    assert set(SEER_TRUNKS) <= set(list_trunks())
    assert get_config("RegNetY_32GF").stage_widths[-1] == 3712
    with pytest.raises(KeyError, match="known trunks"):
        build_trunk("regnety_33gf")
    with pytest.raises(TypeError, match="wants a trunk name or RegNetConfig, got int"):
        build_trunk(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(PAPER_PINS))
def test_paper_configs(name: str) -> None:
    params_m, gf = PAPER_PINS[name]
    trunk = _meta(name)
    with_fc = _params(trunk) + trunk.out_dim * 1000 + 1000
    assert round(with_fc / 1e6, 1) == params_m
    assert round(count_macs(trunk, 224) / 1e9, 1) == gf


def test_generator_is_pure_pycls_maths() -> None:
    # 32GF by hand: u_j = 232 + 115.89 j snapped to 232 * 2.53^k (k = 0..3), quantised to 8:
    # 232*2.53 = 586.96 -> 584, 232*2.53^2 = 1485.0 -> 1488, 232*2.53^3 = 3757.1 -> 3760.
    widths, depths = regnet_widths_depths(20, 232, 115.89, 2.53)
    assert (widths, depths) == ([232, 584, 1488, 3760], [2, 5, 12, 1])
    # ... then rounded to multiples of the group width 232: 3, 6 and 16 groups.
    assert regnet_widths_depths(20, 232, 115.89, 2.53, group_width=232)[0] == [232, 696, 1392, 3712]
    # Group width clamps to the width, and widths round to a multiple of it.
    assert adjust_to_groups([24, 100], 48) == ([24, 96], [24, 48])
    with pytest.raises(RegNetConfigError, match="w_m=1.0 .*need .*w_m > 1"):
        regnet_widths_depths(10, 32, 10, 1.0)  # w_m must exceed 1


def test_bad_configs_fail_clearly() -> None:
    with pytest.raises(RegNetConfigError, match="both"):
        build_trunk(RegNetConfig(widths=(8, 16)))
    with pytest.raises(RegNetConfigError, match="stage_strides"):
        build_trunk(RegNetConfig(widths=(8, 16), depths=(1, 1), stage_strides=(2,)))
    with pytest.raises(RegNetConfigError, match=r"depths \[1, 0\]"):
        build_trunk(RegNetConfig(widths=(8, 16), depths=(1, 0)))


def test_tiny_trunk_forward_and_structure() -> None:
    torch.manual_seed(0)
    trunk = build_trunk("regnety_tiny")
    assert 1000 < _params(trunk) < 10_000
    assert isinstance(trunk.stages, nn.ModuleList)
    assert all(isinstance(s.blocks, nn.ModuleList) for s in trunk.stages)
    assert trunk.stem.conv.stride == (2, 2) and trunk.stem.conv.out_channels == 8
    x = torch.randn(3, 3, 32, 32)
    out = trunk(x)
    assert out.shape == (3, trunk.out_dim)
    assert torch.equal(out, trunk.forward_features(x, stage=-1))
    s0 = trunk.forward_features(x, stage=0, pool=False)
    assert s0.shape == (3, 8, 8, 8)  # 32 -> stem /2 -> stage0 /2
    assert torch.allclose(trunk.forward_features(x, 0), s0.mean((2, 3)))
    with pytest.raises(IndexError, match="stage 2 out of range for a trunk with 2 stages"):
        trunk.forward_features(x, stage=2)
    out.sum().backward()
    assert all(p.grad is not None for p in trunk.parameters())


def test_block_internals_follow_regnety() -> None:
    trunk = build_trunk(get_config("regnety_400mf"))
    block = trunk.stages[1].blocks[0]  # 48 -> 104, stride 2
    assert block.proj is not None and block.proj.conv.stride == (2, 2)
    assert block.b.conv.stride == (2, 2) and block.b.conv.groups == 104 // 8
    assert block.se.reduce.out_channels == round(48 * 0.25)  # SE of the block *input* width
    assert trunk.stages[1].blocks[1].proj is None
    bns = [m for m in trunk.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.eps == 1e-5 and m.momentum == 0.1 for m in bns)


@pytest.mark.parametrize("name,res", [("cpu_tiny", 28), ("cpu_tiny", 16), ("fmnist_small", 28),
                                      ("regnety_tiny", 33), ("regnety_400mf", 64)])
def test_macs_match_torch_flop_counter(name: str, res: int) -> None:
    trunk = build_trunk(name)
    with FlopCounterMode(display=False) as counter:
        trunk(torch.randn(1, 3, res, res))
    assert count_macs(trunk, res) == counter.get_total_flops() // 2


def test_macs_match_flop_counter_on_meta_32gf() -> None:
    trunk = _meta("regnety_32gf")
    with FlopCounterMode(display=False) as counter:
        trunk(torch.empty(1, 3, 224, 224, device="meta"))
    assert count_macs(trunk, 224) == counter.get_total_flops() // 2


def test_count_macs_rejects_unknown_convs_and_counts_linears() -> None:
    assert count_macs(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))) == 48
    with pytest.raises(TypeError, match="outside a RegNet trunk"):
        count_macs(nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_cpu_trunks_suit_fashion_mnist_crops() -> None:
    trunk = build_trunk("cpu_tiny")
    assert trunk.stem.conv.stride == (2, 2)
    assert 150_000 < _params(trunk) < 400_000  # a ~0.26M trunk ran ~320 img/s (docs/demo.md)
    for res in (28, 16):
        assert trunk(torch.randn(2, 3, res, res)).shape == (2, 192)


def test_init_and_meta_materialisation() -> None:
    torch.manual_seed(0)
    trunk = _meta("regnety_400mf").to_empty(device="cpu")
    trunk.init_weights()
    conv = trunk.stages[3].blocks[0].a.conv  # 1x1, 208 -> 440
    assert abs(conv.weight.std().item() - math.sqrt(2.0 / 440)) < 0.05 * math.sqrt(2.0 / 440)
    for m in trunk.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
            assert torch.all(m.running_var == 1) and torch.all(m.running_mean == 0)
    assert torch.isfinite(trunk(torch.randn(2, 3, 64, 64))).all()
    zero = build_trunk(RegNetConfig(widths=(8, 16), depths=(1, 1), stem_width=8,
                                    zero_init_last_bn=True))
    assert all(torch.all(s.blocks[0].c.bn.weight == 0) for s in zero.stages)
    assert torch.all(zero.stages[0].blocks[0].a.bn.weight == 1)


def test_count_macs_sees_through_checkpoint_wrappers() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    trunk = build_trunk("cpu_tiny")
    before = count_macs(trunk, 28)
    trunk.stages[0].blocks[0] = checkpoint_wrapper(trunk.stages[0].blocks[0])
    trunk.stages[2] = checkpoint_wrapper(trunk.stages[2])
    assert count_macs(trunk, 28) == before
    x = torch.randn(2, 3, 28, 28)
    assert trunk(x).shape == (2, 192)  # the wrapped trunk still runs
