"""Every tensor of imported weights is checked: finite, and shaped as the architecture says.

The architecture is read from a few kernels (arch.py); that alone let a file through whose
other tensors had the wrong shape (a 5x5 stem kernel, a wrong SE expand or BN vector) and it
was exported as is, and NaN weights were evaluated to an accuracy (issue #24). So once the
architecture is known, the trunk it names is built on the meta device (no memory) and every
tensor is compared with it, and every floating tensor is scanned for NaN/inf.
"""
from __future__ import annotations

from typing import Mapping

import torch

from seer_pipeline.models.regnet import RegNetConfig
from seer_pipeline.models.trunk import build_trunk
from seer_pipeline.weights.keys import WeightsFormatError

# Elements scanned at a time: bounds the temporary bool tensor on mmap'd 10B-scale weights.
_CHUNK = 1 << 24


class BadWeightsError(WeightsFormatError):
    """Weights with non-finite values or tensors shaped unlike their architecture."""


def _non_finite(t: torch.Tensor) -> int:
    if not t.is_floating_point() or t.is_meta:
        return 0
    flat = t.detach().reshape(-1)
    bad = 0
    for i in range(0, flat.numel(), _CHUNK):
        bad += int((~torch.isfinite(flat[i:i + _CHUNK])).sum())
    return bad


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """BadWeightsError naming the tensors that hold NaN or inf (and how many values)."""
    bad = {k: n for k, v in tensors.items() if isinstance(v, torch.Tensor) and (n := _non_finite(v))}
    if bad:
        first = sorted(bad)[:3]
        raise BadWeightsError(
            f"{what}: {len(bad)} tensor(s) hold NaN or inf values, e.g. "
            + ", ".join(f"{k} ({bad[k]} of {tensors[k].numel()})" for k in first)
            + "; refusing to use them")


def check_shapes(trunk: Mapping[str, torch.Tensor], cfg: RegNetConfig, what: str) -> None:
    """BadWeightsError unless `trunk` has exactly the keys and shapes `cfg` builds."""
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in build_trunk(cfg).state_dict().items()}
    missing = sorted(set(want) - set(trunk))
    extra = sorted(set(trunk) - set(want))
    wrong = sorted(k for k in set(want) & set(trunk) if tuple(trunk[k].shape) != want[k])
    if missing or extra or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} tensor(s) shaped wrong, e.g. " + ", ".join(
                f"{k} {tuple(trunk[k].shape)} (expected {want[k]})" for k in wrong[:3]))
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {missing[:3]}")
        if extra:
            parts.append(f"{len(extra)} not part of the trunk, e.g. {extra[:3]}")
        name = cfg.name or "the inferred RegNetY"
        raise BadWeightsError(f"{what}: not a {name} trunk: " + "; ".join(parts))
