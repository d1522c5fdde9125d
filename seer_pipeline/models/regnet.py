"""RegNet width/depth generator (pure maths) and the named trunk configurations.

The generator follows the RegNet design space of Radosavovic et al., "Designing Network Design
Spaces" (CVPR 2020): per-block widths u_j = w_0 + w_a * j, snapped to w_0 * w_m^k, quantised to
multiples of `q` (8), grouped into stages of equal width, then made compatible with the group
width (group width clamped to the bottleneck width; widths rounded to a multiple of it).
Nothing here imports torch, so configs can be inspected (and pinned in tests) for free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence


class RegNetConfigError(ValueError):
    """A RegNet configuration that cannot describe a network."""


def quantized_widths(depth: int, w_0: float, w_a: float, w_m: float, q: int = 8) -> list[int]:
    """Per-block widths of the linear-quantised RegNet generator (length `depth`)."""
    if depth < 1 or w_0 <= 0 or w_a < 0 or w_m <= 1 or q < 1:
        raise RegNetConfigError(
            f"invalid RegNet generator params depth={depth} w_0={w_0} w_a={w_a} w_m={w_m} q={q}: "
            "need depth >= 1, w_0 > 0, w_a >= 0, w_m > 1"
        )
    out = []
    for j in range(depth):
        u = w_0 + w_a * j
        k = round(math.log(u / w_0) / math.log(w_m))
        out.append(int(round(w_0 * w_m**k / q)) * q)
    return out


def adjust_to_groups(
    widths: Sequence[int], group_width: int, bot_mul: float = 1.0
) -> tuple[list[int], list[int]]:
    """Make each stage width compatible with its group width (pycls convention).

    Returns (widths, group_widths): the bottleneck width w*bot_mul is rounded to a multiple of
    the group width, which is first clamped to the bottleneck width.
    """
    new_w, new_g = [], []
    for w in widths:
        b = max(1, int(w * bot_mul))
        g = min(group_width, b)
        b = max(g, int(round(b / g) * g))
        new_w.append(int(b / bot_mul))
        new_g.append(g)
    return new_w, new_g


def regnet_widths_depths(
    depth: int, w_0: float, w_a: float, w_m: float,
    group_width: Optional[int] = None, bot_mul: float = 1.0, q: int = 8,
) -> tuple[list[int], list[int]]:
    """Stage widths and depths from the RegNet generator (group-adjusted if `group_width`)."""
    per_block = quantized_widths(depth, w_0, w_a, w_m, q)
    widths: list[int] = []
    depths: list[int] = []
    for w in per_block:  # generator widths are non-decreasing, so stages are contiguous runs
        if widths and widths[-1] == w:
            depths[-1] += 1
        else:
            widths.append(w)
            depths.append(1)
    if group_width is not None:
        widths, _ = adjust_to_groups(widths, group_width, bot_mul)
    return widths, depths


@dataclass(frozen=True)
class RegNetConfig:
    """A RegNetY trunk: generator params (depth, w_0, w_a, w_m) or explicit `widths`/`depths`.

    `stage_strides` defaults to 2 for every stage. Explicit widths are still group-adjusted.
    """

    depth: int = 0
    w_0: float = 0.0
    w_a: float = 0.0
    w_m: float = 0.0
    group_width: int = 8
    se_ratio: float = 0.25  # of the block *input* width (pycls / timm RegNetY)
    bot_mul: float = 1.0
    stem_width: int = 32
    stem_stride: int = 2
    stage_strides: Optional[tuple[int, ...]] = None
    widths: Optional[tuple[int, ...]] = None
    depths: Optional[tuple[int, ...]] = None
    in_channels: int = 3
    q: int = 8
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    # pycls default (BN.ZERO_INIT_FINAL_GAMMA False): the last BN of each block starts at gamma 1.
    zero_init_last_bn: bool = False
    name: str = field(default="", compare=False)

    def stages(self) -> list[tuple[int, int, int, int]]:
        """(width, depth, stride, group_width) per stage, after group adjustment."""
        if (self.widths is None) != (self.depths is None):
            raise RegNetConfigError("give both `widths` and `depths`, or neither")
        if self.widths is not None:
            widths, depths = list(self.widths), list(self.depths or ())
            if len(widths) != len(depths) or not widths or min(depths) < 1 or min(widths) < 1:
                raise RegNetConfigError(f"bad explicit widths {widths} / depths {depths}")
        else:
            widths, depths = regnet_widths_depths(self.depth, self.w_0, self.w_a, self.w_m, q=self.q)
        if self.group_width < 1 or self.bot_mul <= 0 or not 0 <= self.se_ratio < 1:
            raise RegNetConfigError(
                f"bad group_width={self.group_width} bot_mul={self.bot_mul} se_ratio={self.se_ratio}"
            )
        widths, groups = adjust_to_groups(widths, self.group_width, self.bot_mul)
        strides = self.stage_strides if self.stage_strides is not None else (2,) * len(widths)
        if len(strides) != len(widths):
            raise RegNetConfigError(
                f"stage_strides has {len(strides)} entries but the config has {len(widths)} stages"
            )
        return list(zip(widths, depths, strides, groups))

    @property
    def stage_widths(self) -> list[int]:
        return [s[0] for s in self.stages()]

    @property
    def stage_depths(self) -> list[int]:
        return [s[1] for s in self.stages()]


# SEER trunks: generator params from VISSL's SEER configs (configs/config/pretrain/seer/models/
# regnet10B.yaml, pretrain/swav/models/regnet{128Gf,256Gf_1}.yaml, benchmark .../seer/
# regnet{32gf,64gf_3}.yaml, facebookresearch/vissl @09270ed2) and projects/SEER/README.md there.
_SEER = {
    "regnety_32gf": RegNetConfig(depth=20, w_0=232, w_a=115.89, w_m=2.53, group_width=232),
    "regnety_64gf": RegNetConfig(depth=20, w_0=352, w_a=147.48, w_m=2.4, group_width=328),
    "regnety_128gf": RegNetConfig(depth=27, w_0=456, w_a=160.83, w_m=2.52, group_width=264),
    "regnety_256gf": RegNetConfig(depth=27, w_0=640, w_a=230.83, w_m=2.53, group_width=373),
    "regnety_10b": RegNetConfig(depth=27, w_0=1744, w_a=620.83, w_m=2.52, group_width=1010),
}
# Standard RegNetY models: Radosavovic et al. 2020, Table 7 / appendix (pycls model zoo values).
_PAPER = {
    "regnety_400mf": RegNetConfig(depth=16, w_0=48, w_a=27.89, w_m=2.09, group_width=8),
    "regnety_800mf": RegNetConfig(depth=14, w_0=56, w_a=38.84, w_m=2.4, group_width=16),
    "regnety_1.6gf": RegNetConfig(depth=27, w_0=48, w_a=20.71, w_m=2.65, group_width=24),
}
# Small trunks of our own for CPU work.
_SMALL = {
    # A few thousand parameters: for unit tests only.
    "regnety_tiny": RegNetConfig(
        widths=(8, 16), depths=(1, 1), group_width=8, stem_width=8
    ),
    # Fashion-MNIST on a 2-core CPU (28 px global / 16 px local crops). Measured on the
    # 2-core dev machine: a stride-1 stem at 28 px ran 7-10x slower than a stride-2 stem with stages 32/64/192.
    "cpu_tiny": RegNetConfig(
        widths=(32, 64, 192), depths=(1, 2, 2), group_width=16, stem_width=24,
        stage_strides=(1, 2, 2),
    ),
    # A wider/deeper variant of the same layout, for a longer CPU run.
    "fmnist_small": RegNetConfig(
        widths=(48, 96, 240), depths=(1, 2, 3), group_width=16, stem_width=32,
        stage_strides=(1, 2, 2),
    ),
}
_REGISTRY: dict[str, RegNetConfig] = {
    n: replace(c, name=n) for n, c in {**_SEER, **_PAPER, **_SMALL}.items()
}
SEER_TRUNKS: tuple[str, ...] = tuple(_SEER)


def list_trunks() -> list[str]:
    """Names accepted by `get_config` / `build_trunk`."""
    return list(_REGISTRY)


def get_config(name: str) -> RegNetConfig:
    """The named configuration (case-insensitive); a clear error listing the names otherwise."""
    key = name.lower()
    if key not in _REGISTRY:
        raise KeyError(f"unknown trunk '{name}'; known trunks: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]
