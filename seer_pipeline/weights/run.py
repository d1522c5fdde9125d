"""Trunk and SwAV head of a training run's newest complete (or a chosen) DCP checkpoint.

DCP reads every shard in this one process (`no_dist=True`), whatever world size wrote it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

from seer_pipeline.checkpoint.layout import (
    CheckpointError,
    find_resumable,
    verify_step_dir,
)
from seer_pipeline.config.train import load_train_config
from seer_pipeline.models.swav import build_model


def read_run(src: Path, step: Optional[int] = None) -> tuple[dict, dict, str]:
    """(trunk state, head state, trunk name) from a run folder or a step_XXXXXXXXX folder."""


    if (src / "meta.json").exists():
        path, meta = src, verify_step_dir(src)
    else:
        cands = [c for c in find_resumable(src / "checkpoints") if step is None or c[0] == step]
        if not cands:
            raise CheckpointError(f"no complete checkpoint under {src}/checkpoints"
                                  + (f" for step {step}" if step is not None else ""))
        _, path, meta = cands[0]
    cfg = OmegaConf.merge(load_train_config(None, []),
                          OmegaConf.to_container(OmegaConf.create(meta["config_yaml"])))
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device="cpu")
    template = {"model": model.state_dict()}
    dcp.load(template, checkpoint_id=str(path), no_dist=True)
    sd = template["model"]
    trunk = {k[len("trunk."):]: v for k, v in sd.items() if k.startswith("trunk.")}
    head = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}
    return trunk, head, str(cfg.model.trunk)
