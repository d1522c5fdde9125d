"""RegNetY trunk modules: stem, residual bottleneck blocks with Squeeze-Excitation, stages.

The trunk holds no parallelism. FSDP2, activation checkpointing and compile are applied by
the trainer to `trunk.stages[i].blocks[j]` (and whole stages) from outside. It builds under
`with torch.device("meta")` without touching memory; after `to_empty(device=...)` call
`init_weights()` to give the parameters real values.
"""
from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from seer_pipeline.models.regnet import RegNetConfig, RegNetConfigError, get_config


def _bn(width: int, cfg: RegNetConfig) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(width, eps=cfg.bn_eps, momentum=cfg.bn_momentum)


class Stem(nn.Module):
    """3x3 conv (stride `stem_stride`) + BN + ReLU."""

    def __init__(self, cfg: RegNetConfig) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cfg.in_channels, cfg.stem_width, 3, cfg.stem_stride, 1, bias=False)
        self.bn = _bn(cfg.stem_width, cfg)
        self.out_channels = cfg.stem_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class SqueezeExcite(nn.Module):
    """Channel gating: global pool -> 1x1 conv -> ReLU -> 1x1 conv -> sigmoid."""

    def __init__(self, width: int, se_width: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(width, se_width, 1, bias=True)
        self.expand = nn.Conv2d(se_width, width, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(s), inplace=True)))


class ConvBN(nn.Module):
    """Conv (no bias) followed by BatchNorm; a named pair so FSDP can wrap each BN alone."""

    def __init__(self, w_in: int, w_out: int, k: int, stride: int, groups: int,
                 cfg: RegNetConfig) -> None:
        super().__init__()
        self.conv = nn.Conv2d(w_in, w_out, k, stride, k // 2, groups=groups, bias=False)
        self.bn = _bn(w_out, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class ResBottleneckBlock(nn.Module):
    """RegNetY block: 1x1 -> grouped 3x3 (stride) -> SE -> 1x1, plus a (projected) shortcut."""

    def __init__(self, w_in: int, w_out: int, stride: int, group_width: int,
                 cfg: RegNetConfig) -> None:
        super().__init__()
        w_b = int(round(w_out * cfg.bot_mul))
        if w_b % group_width:
            raise RegNetConfigError(
                f"bottleneck width {w_b} (= {w_out} x {cfg.bot_mul}) is not a multiple of the "
                f"group width {group_width}")
        self.proj = ConvBN(w_in, w_out, 1, stride, 1, cfg) if (w_in != w_out or stride != 1) else None
        self.a = ConvBN(w_in, w_b, 1, 1, 1, cfg)
        self.b = ConvBN(w_b, w_b, 3, stride, w_b // group_width, cfg)
        se_width = int(round(w_in * cfg.se_ratio))
        self.se = SqueezeExcite(w_b, se_width) if se_width > 0 else None
        self.c = ConvBN(w_b, w_out, 1, 1, 1, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        y = F.relu(self.a(x), inplace=True)
        y = F.relu(self.b(y), inplace=True)
        if self.se is not None:
            y = self.se(y)
        return F.relu(self.c(y) + shortcut, inplace=True)


class Stage(nn.Module):
    """A run of blocks of one width; the first block changes width and resolution."""

    def __init__(self, w_in: int, w_out: int, depth: int, stride: int, group_width: int,
                 cfg: RegNetConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBottleneckBlock(w_in if i == 0 else w_out, w_out, stride if i == 0 else 1,
                               group_width, cfg)
            for i in range(depth)
        )
        self.out_channels = w_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class RegNetTrunk(nn.Module):
    """RegNetY without a classifier: `forward(x)` is the global-average-pooled last stage."""

    def __init__(self, cfg: RegNetConfig) -> None:
        super().__init__()
        self.config = cfg
        self.stem = Stem(cfg)
        stages, w_in = [], cfg.stem_width
        for width, depth, stride, group_width in cfg.stages():
            stages.append(Stage(w_in, width, depth, stride, group_width, cfg))
            w_in = width
        self.stages = nn.ModuleList(stages)
        self.stage_dims: list[int] = [s.out_channels for s in stages]
        self.out_dim: int = w_in
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """pycls init: conv kaiming-normal (fan_out), BN gamma 1 / beta 0, conv biases 0.

        With `zero_init_last_bn` the last BN of each block starts at gamma 0 (identity blocks).
        Works after SyncBN conversion and wrapping, as it finds modules by type.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
                m.reset_running_stats()
        if self.config.zero_init_last_bn:
            for m in self.modules():
                if isinstance(m, ResBottleneckBlock):
                    m.c.bn.weight.zero_()

    def _stage_index(self, stage: int) -> int:
        n = len(self.stages)
        if not -n <= stage < n:
            raise IndexError(f"stage {stage} out of range for a trunk with {n} stages")
        return stage % n

    def forward_features(self, x: torch.Tensor, stage: int = -1, pool: bool = True) -> torch.Tensor:
        """Features after stage `stage` (negative counts from the end): [B, C] if `pool`."""
        last = self._stage_index(stage)
        x = self.stem(x)
        for i in range(last + 1):
            x = self.stages[i](x)
        return x.mean((2, 3)) if pool else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x, -1, pool=True)


def build_trunk(spec: Union[str, RegNetConfig]) -> RegNetTrunk:
    """A RegNetY trunk from a registered name (see `list_trunks`) or a `RegNetConfig`."""
    cfg = get_config(spec) if isinstance(spec, str) else spec
    if not isinstance(cfg, RegNetConfig):
        raise TypeError(f"build_trunk wants a trunk name or RegNetConfig, got {type(spec).__name__}")
    return RegNetTrunk(cfg)


def multicrop_features(trunk: nn.Module, crops: list[torch.Tensor], channels_last: bool = False) -> torch.Tensor:
    """Trunk features of every crop, crop-major: consecutive crops of equal resolution go
    through the trunk as one batch (SwAV's multi-crop forward; one pass per resolution)."""
    feats, start = [], 0
    while start < len(crops):
        end = start
        while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
            end += 1
        x = torch.cat(crops[start:end])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats.append(trunk(x))
        start = end
    return torch.cat(feats)
