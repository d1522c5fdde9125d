"""The one place a training config's objective picks its model (SwAV's or DINO's)."""
from __future__ import annotations

from typing import Any

from torch import nn

from seer_pipeline.models.dino_head import build_dino_model
from seer_pipeline.models.swav_head import build_model


def build_for(cfg: Any) -> nn.Module:
    """The model `cfg` trains (`train.objective`: swav or dino), on the current device.
    The trainer, the planner, the simulation and the weight export all build through here,
    so a third objective is one more line here and nowhere else."""
    objective = cfg.train.objective
    if objective == "dino":
        return build_dino_model(cfg)
    if objective == "swav":
        return build_model(cfg)
    raise ValueError(f"train.objective must be swav or dino, got {objective!r}")
