"""The SwAV model: a trunk plus the projection head with prototypes (no loss, no parallelism)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from seer_pipeline.models.trunk import build_trunk, multicrop_features


class SwAVHead(nn.Module):
    """MLP projection -> L2 normalisation -> prototypes (linear, no bias).

    dims=(in, hidden..., out): SEER 256GF (10444, 8192, 8192, 256) without BN; SwAV RN50
    (2048, 2048, 128) with `use_bn=True`. `prototypes` is its own submodule so the trainer can
    shard it alone and keep it in fp32.
    """

    def __init__(self, dims: Sequence[int], n_prototypes: int = 16000, use_bn: bool = False,
                 bn_eps: float = 1e-5, bn_momentum: float = 0.1) -> None:
        super().__init__()
        if len(dims) < 2 or min(dims) < 1 or n_prototypes < 1:
            raise ValueError(
                f"SwAVHead needs >= 2 positive dims and >= 1 prototype, got {dims}, {n_prototypes}")
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:  # no BN/ReLU after the last projection
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out, eps=bn_eps, momentum=bn_momentum))
                layers.append(nn.ReLU(inplace=True))
        self.projection = nn.Sequential(*layers)
        self.prototypes = nn.Linear(dims[-1], n_prototypes, bias=False)
        self.in_dim, self.out_dim, self.n_prototypes = dims[0], dims[-1], n_prototypes
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Default linear/BN init, then unit-norm prototypes (also after `to_empty`)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.BatchNorm1d)):
                m.reset_parameters()
        normalize_prototypes(self)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 embeddings [N, out_dim]."""
        return F.normalize(self.projection(x).float(), dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [N, out_dim], prototype scores [N, K]), both float32.

        The MLP follows autocast; the normalisation and prototype scores never do, since
        low-precision scores feed exp(score / epsilon) in Sinkhorn (VISSL kept them fp32 too).
        """
        emb = self.embed(x)
        with torch.autocast(emb.device.type, enabled=False):
            return emb, self.prototypes(emb)


def _prototype_linear(module: nn.Module) -> nn.Module:
    return module.prototypes if hasattr(module, "prototypes") else module


@torch.no_grad()
def normalize_prototypes(module: nn.Module) -> None:
    """L2-normalise prototype rows in place (the head or its `prototypes` linear).

    Under FSDP2 the weight is a DTensor sharded on dim 0: each row is whole on one rank, so
    normalising the local shard is exact and needs no communication.
    """
    weight = _prototype_linear(module).weight
    local = weight
    if hasattr(weight, "to_local"):  # DTensor
        placements = weight.placements
        if any((p.is_shard() and p.dim != 0) or p.is_partial() for p in placements):
            raise ValueError(f"prototype weight must be row-sharded or replicated, got {placements}")
        local = weight.to_local()
    if local.numel():
        local.copy_(F.normalize(local, dim=1))


class SwAVModel(nn.Module):
    """Trunk + SwAV head; multi-crop forward batches consecutive crops of equal resolution."""

    def __init__(self, trunk: nn.Module, head: nn.Module, channels_last: bool = False) -> None:
        super().__init__()
        self.trunk, self.head, self.channels_last = trunk, head, channels_last

    def forward(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(multicrop_features(self.trunk, crops, self.channels_last))


def build_model(cfg: DictConfig) -> SwAVModel:
    trunk = build_trunk(cfg.model.trunk)
    dims = [trunk.out_dim, *cfg.model.hidden_dims, cfg.model.out_dim]
    head = SwAVHead(dims, n_prototypes=cfg.model.n_prototypes, use_bn=cfg.model.head_bn)
    return SwAVModel(trunk, head, cfg.model.channels_last)
