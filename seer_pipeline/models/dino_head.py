"""The DINO model: a trunk plus DINO's projection head (no loss, no parallelism).

Head from Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (ICCV
2021), §3 and its appendix: a 3-layer MLP (hidden 2048, GELU) to a 256-d bottleneck, L2
normalisation, then a weight-normalised linear layer of K outputs without bias whose norm is
fixed to 1 (`norm_last_layer=True`, the paper's default for stability). DINOv2 (Oquab et al.
2023) keeps the same head. The student and the teacher are two instances of `DINOModel`; the
teacher is never in the optimizer (seer_pipeline.train.dino).
"""
from __future__ import annotations

from typing import Sequence

import torch
from omegaconf import DictConfig
import torch.nn.functional as F
from torch import nn

from seer_pipeline.models.trunk import build_trunk, multicrop_features


class WeightNormLinear(nn.Module):
    """y = x @ (V / ||V||_rows)^T: DINO's last layer with the weight-norm gain fixed to 1.

    Written out rather than with `nn.utils.parametrizations.weight_norm`: a parametrization
    hides `V` behind a property, which FSDP2 cannot shard; here `weight` is a plain
    parameter sharded on rows like SwAV's prototypes, and each row is normalised whole.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=0.02)  # DINO's init of every linear layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class DINOHead(nn.Module):
    """MLP (GELU) -> bottleneck -> L2 norm -> weight-normalised K-way layer.

    The K-way layer (DINO's `last_layer`) is called `prototypes`, as in the SwAV head: it plays
    the same part, and seer_pipeline.distributed.parallelize keeps that unit in fp32 for both.

    dims=(in, hidden..., bottleneck). `forward` returns (the normalised bottleneck embeddings,
    float32 [N, bottleneck]; the logits, float32 [N, K]). Logits leave autocast: they feed a
    softmax at temperature 0.04, where bf16 rounding would dominate the teacher's targets.
    """

    def __init__(self, dims: Sequence[int], n_prototypes: int = 65536) -> None:
        super().__init__()
        if len(dims) < 2 or min(dims) < 1 or n_prototypes < 1:
            raise ValueError(
                f"DINOHead needs >= 2 positive dims and >= 1 output, got {dims}, {n_prototypes}")
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.projection = nn.Sequential(*layers)
        self.prototypes = WeightNormLinear(dims[-1], n_prototypes)
        self.in_dim, self.out_dim, self.n_prototypes = dims[0], dims[-1], n_prototypes
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.projection.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.prototypes.reset_parameters()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = F.normalize(self.projection(x).float(), dim=1)
        with torch.autocast(emb.device.type, enabled=False):
            return emb, self.prototypes(emb)


class DINOModel(nn.Module):
    """Trunk + DINO head; a multi-crop forward batches consecutive crops of equal resolution.

    Returns (trunk features, head embeddings, logits), crop-major: KoLeo reads the trunk's
    features of the global crops (as DINOv2 reads the class token), the loss the logits.
    """

    def __init__(self, trunk: nn.Module, head: DINOHead, channels_last: bool = False) -> None:
        super().__init__()
        self.trunk, self.head, self.channels_last = trunk, head, channels_last

    def forward(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = multicrop_features(self.trunk, crops, self.channels_last)
        emb, logits = self.head(f)
        return f, emb, logits


def build_dino_model(cfg: DictConfig) -> DINOModel:
    """Student or teacher: the trunk, then model.hidden_dims -> model.out_dim (bottleneck) ->
    model.n_prototypes outputs (DINO's 2048 -> 256 -> 65536 for ViTs; the presets say theirs)."""
    trunk = build_trunk(cfg.model.trunk)
    head = DINOHead([trunk.out_dim, *cfg.model.hidden_dims, cfg.model.out_dim], cfg.model.n_prototypes)
    return DINOModel(trunk, head, cfg.model.channels_last)
