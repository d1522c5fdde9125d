"""Analytic multiply-add counter: convolutions and linear layers, per image.

Walks the trunk's structure and propagates the spatial size with the conv output formula, so
it needs no forward pass and works on meta-device (or FSDP-wrapped) trunks. BatchNorm, ReLU,
pooling, the SE gate multiply and residual adds are not counted, matching
`torch.utils.flop_counter` (which counts convolutions and matmuls). FLOPs = 2 x MACs.
"""
from __future__ import annotations

from torch import nn

from seer_pipeline.models.trunk import ConvBN, RegNetTrunk, ResBottleneckBlock, Stem


def _out_size(size: int, conv: nn.Conv2d, dim: int) -> int:
    k, s, p, d = conv.kernel_size[dim], conv.stride[dim], conv.padding[dim], conv.dilation[dim]
    if not isinstance(p, int):
        raise ValueError(f"string padding {conv.padding!r} is not supported by the MAC counter")
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def conv_macs(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int, int]:
    """(MACs, out_h, out_w) of one conv on an h x w input (bias adds not counted)."""
    oh, ow = _out_size(h, conv, 0), _out_size(w, conv, 1)
    kh, kw = conv.kernel_size
    per_pos = conv.out_channels * (conv.in_channels // conv.groups) * kh * kw
    return per_pos * oh * ow, oh, ow


def _block_macs(block: ResBottleneckBlock, h: int, w: int) -> tuple[int, int, int]:
    total = 0
    if block.proj is not None:
        total += conv_macs(block.proj.conv, h, w)[0]
    m, _, _ = conv_macs(block.a.conv, h, w)
    total += m
    m, oh, ow = conv_macs(block.b.conv, h, w)
    total += m
    if block.se is not None:  # two 1x1 convs on the pooled 1x1 map
        total += conv_macs(block.se.reduce, 1, 1)[0] + conv_macs(block.se.expand, 1, 1)[0]
    total += conv_macs(block.c.conv, oh, ow)[0]
    return total, oh, ow


def _unwrap(module: nn.Module) -> nn.Module:
    # checkpoint_wrapper / torch.compile keep the real module one attribute down.
    for attr in ("_checkpoint_wrapped_module", "_orig_mod"):
        if hasattr(module, attr):
            return _unwrap(getattr(module, attr))
    return module


def trunk_macs(trunk: RegNetTrunk, resolution: int | tuple[int, int] = 224) -> int:
    """Conv + linear MACs for one image of `resolution` through the trunk."""
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    stem = _unwrap(trunk.stem)
    assert isinstance(stem, Stem)
    total, h, w = conv_macs(stem.conv, h, w)
    for stage in trunk.stages:
        for block in _unwrap(stage).blocks:
            m, h, w = _block_macs(_unwrap(block), h, w)
            total += m
    return total


def count_macs(module: nn.Module, resolution: int | tuple[int, int] = 224) -> int:
    """Multiply-adds per image: a RegNet trunk (analytic walk) plus any other linear layers.

    Modules other than a trunk may only hold linear layers (e.g. the SwAV head, counted once per
    input vector); a conv outside a trunk raises, rather than being silently miscounted.
    """
    module = _unwrap(module)
    if isinstance(module, RegNetTrunk):
        return trunk_macs(module, resolution)
    total = 0
    for child in module.children():
        total += count_macs(child, resolution)
    if isinstance(module, nn.Linear):
        total += module.in_features * module.out_features
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, ConvBN)):
        raise TypeError(f"count_macs cannot size a {type(module).__name__} outside a RegNet trunk")
    return total
