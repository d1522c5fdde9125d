"""The architecture a trunk state_dict describes, read from tensor shapes alone.

A file name or a sidecar can say anything; the shapes cannot lie. From our key names (see
keys.py) we read the stem width, each stage's width, depth, group width, bottleneck ratio and
every block's SE width, then compare them with a named preset (or find the preset they match).
Strides leave no trace in the weights: a trunk that matches no preset gets stride 2 everywhere,
as every RegNetY in the paper, timm and torchvision has.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from seer_pipeline.models.regnet import RegNetConfig, get_config, list_trunks
from seer_pipeline.weights.keys import WeightsFormatError

_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.")

# Our preset -> the same network in timm (regnet.py model_cfgs) and torchvision (regnet.py
# BlockParams.from_init_params calls): same generator parameters (depth, w_0, w_a, w_m, group
# width, SE 0.25), checked shape by shape in tests/interop.
TIMM_NAMES = {"regnety_400mf": "regnety_004", "regnety_800mf": "regnety_008",
              "regnety_1.6gf": "regnety_016", "regnety_32gf": "regnety_320",
              "regnety_64gf": "regnety_640", "regnety_128gf": "regnety_1280",
              "regnety_256gf": "regnety_2560"}
# torchvision's regnet_y_800mf is not the paper's 800MF: its _make_divisible rounding gives
# widths 64/144/320/784 (timm names it regnety_008_tv), so it has no entry here.
TORCHVISION_NAMES = {"regnety_400mf": "regnet_y_400mf", "regnety_1.6gf": "regnet_y_1_6gf", "regnety_32gf": "regnet_y_32gf",
                     "regnety_128gf": "regnet_y_128gf"}


class ArchMismatchError(WeightsFormatError):
    """Weights whose shapes do not describe the named trunk."""


@dataclass(frozen=True)
class TrunkArch:
    """What the shapes say: per stage (width, depth, group width), SE widths per block."""

    in_channels: int
    stem_width: int
    stages: tuple[tuple[int, int, int], ...]
    bot_mul: float
    se_widths: tuple[tuple[int, ...], ...]

    @property
    def widths(self) -> list[int]:
        return [s[0] for s in self.stages]

    @property
    def depths(self) -> list[int]:
        return [s[1] for s in self.stages]

    def describe(self) -> str:
        return (f"stem {self.stem_width}, widths {self.widths}, depths {self.depths}, group widths "
                f"{[s[2] for s in self.stages]}, SE widths (first block of each stage) "
                f"{[s[0] for s in self.se_widths]}")


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> torch.Size:
    if key not in sd:
        raise WeightsFormatError(f"trunk weights lack {key!r}")
    return sd[key].shape


def infer_arch(sd: Mapping[str, torch.Tensor]) -> TrunkArch:
    """Read the architecture from a trunk dict in our key names (see keys.rename_trunk)."""
    stem = _shape(sd, "stem.conv.weight")
    blocks: dict[int, set[int]] = {}
    for k in sd:
        m = _BLOCK.match(k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise WeightsFormatError(f"trunk weights have stages {sorted(blocks)}: need 0..n-1, n >= 1")
    stages, ses, bot = [], [], set()
    w_in = stem[0]
    for s in range(len(blocks)):
        idx = sorted(blocks[s])
        if idx != list(range(len(idx))):
            raise WeightsFormatError(f"stage {s} has blocks {idx}: a gap")
        p = f"stages.{s}.blocks.0."
        width = _shape(sd, p + "c.conv.weight")[0]
        w_b = _shape(sd, p + "a.conv.weight")[0]
        gw = _shape(sd, p + "b.conv.weight")[1]
        se = []
        for i in idx:
            p = f"stages.{s}.blocks.{i}."
            a, b, c = (_shape(sd, p + n + ".conv.weight") for n in "abc")
            if (a[0], a[1], b[0], b[1], c[0], c[1]) != (w_b, w_in if i == 0 else width, w_b, gw, width, w_b):
                raise WeightsFormatError(f"block {s}.{i} has shapes a{tuple(a)} b{tuple(b)} c{tuple(c)} "
                                         f"that do not chain (stage width {width}, bottleneck {w_b})")
            se.append(_shape(sd, p + "se.reduce.weight")[0] if p + "se.reduce.weight" in sd else 0)
        stages.append((width, len(idx), gw))
        ses.append(tuple(se))
        bot.add(w_b / width)
        w_in = width
    if len(bot) != 1:
        raise WeightsFormatError(f"bottleneck ratios differ between stages: {sorted(bot)}")
    return TrunkArch(stem[1], stem[0], tuple(stages), bot.pop(), tuple(ses))


def arch_of_config(cfg: RegNetConfig) -> TrunkArch:
    """The shapes a preset builds, computed without building it."""
    stages, ses = [], []
    w_in = cfg.stem_width
    for width, depth, _, gw in cfg.stages():
        se = []
        for i in range(depth):
            se.append(int(round((w_in if i == 0 else width) * cfg.se_ratio)))
        stages.append((width, depth, gw))
        ses.append(tuple(se))
        w_in = width
    return TrunkArch(cfg.in_channels, cfg.stem_width, tuple(stages), cfg.bot_mul, tuple(ses))


def check_arch(arch: TrunkArch, preset: str) -> RegNetConfig:
    """The preset's config if the shapes match it; ArchMismatchError naming the difference."""
    cfg = get_config(preset)
    want = arch_of_config(cfg)
    if arch != want:
        raise ArchMismatchError(f"the weights are not a {preset}: they hold {arch.describe()}; "
                                f"{preset} has {want.describe()}")
    return cfg


def match_preset(arch: TrunkArch) -> Optional[str]:
    """The first registered trunk with exactly these shapes, if any."""
    for name in list_trunks():
        if arch_of_config(get_config(name)) == arch:
            return name
    return None


def config_from_arch(arch: TrunkArch) -> RegNetConfig:
    """A config that builds these shapes (stride 2 per stage: strides are not in the weights)."""
    gmax = max(g for _, _, g in arch.stages)
    for w, _, g in arch.stages:
        if g != min(gmax, int(round(w * arch.bot_mul))):
            raise WeightsFormatError(f"group widths {[s[2] for s in arch.stages]} are not one "
                                     "group width clamped per stage (RegNetY)")
    w_in, ratios = arch.stem_width, set()
    for (w, _, _), ses in zip(arch.stages, arch.se_widths):
        ratios.add(ses[0] / w_in)
        w_in = w
    ratio = 0.25 if 0.25 in ratios else min(ratios)
    cfg = RegNetConfig(widths=tuple(arch.widths), depths=tuple(arch.depths), group_width=gmax,
                       se_ratio=ratio, bot_mul=arch.bot_mul, stem_width=arch.stem_width,
                       in_channels=arch.in_channels, name="inferred")
    if arch_of_config(cfg) != arch:
        raise WeightsFormatError(f"no RegNetY config builds these shapes: {arch.describe()}")
    return cfg


def resolve_config(arch: TrunkArch, preset: Optional[str] = None) -> tuple[RegNetConfig, Optional[str]]:
    """(config, preset name or None): the named preset if it matches, else the matching one."""
    if preset:
        return check_arch(arch, preset), get_config(preset).name
    name = match_preset(arch)
    if name is not None:
        return get_config(name), name
    return config_from_arch(arch), None
