"""Trunk and SwAV head of a training run's newest complete (or a chosen) DCP checkpoint.

DCP reads every shard in this one process (`no_dist=True`), whatever world size wrote it. A run
folder is read like a resume reads it (issue #24): every file's recorded SHA-256 is checked
first, and DCP goes through safe_dcp (restricted `.metadata` unpickler, weights-only values), so
a crafted `.metadata` runs nothing and a flipped byte is refused rather than exported.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf
from torch.distributed.checkpoint.api import CheckpointException

from seer_pipeline.checkpoint import integrity, safe_dcp
from seer_pipeline.checkpoint.layout import (
    CheckpointError,
    find_resumable,
    verify_step_dir,
)
from seer_pipeline.config.base import ConfigError, parse_saved_config
from seer_pipeline.config.train import load_train_config
from seer_pipeline.core.safe_pickle import UnsafePickleError
from seer_pipeline.models.build import build_for

log = logging.getLogger(__name__)


def _one_line(e: BaseException) -> str:
    """DCP wraps a reader's failure with every rank's traceback: keep the cause."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:400]


def model_for(cfg: Any, which: Optional[str] = None) -> tuple[torch.nn.Module, str]:
    """(a model of the run's shape, the checkpoint entry holding its weights). A DINO run's
    weights are its teacher's, as DINO evaluates them, or the student's on request."""
    if which not in (None, "teacher", "student"):
        raise ValueError(f"which must be teacher or student, got {which!r}")
    if cfg.train.objective == "swav" and which == "teacher":
        raise CheckpointError("a SwAV run has no teacher (train.objective=swav): leave out --teacher")
    key = "teacher" if cfg.train.objective == "dino" and which != "student" else "model"
    return build_for(cfg), key


def _read_one(path: Path, meta: dict[str, Any], which: Optional[str] = None) -> tuple[dict, dict, str]:
    saved = parse_saved_config(meta["config_yaml"], f"{path}/meta.json config_yaml")
    cfg = OmegaConf.merge(load_train_config(None, []), saved)
    with torch.device("meta"):
        model, key = model_for(cfg, which)
    model = model.to_empty(device="cpu")
    template = {key: model.state_dict()}
    integrity.verify_hashes(path, meta)  # before DCP opens anything
    safe_dcp.load(template, path, no_dist=True)
    sd = template[key]
    trunk = {k[len("trunk."):]: v for k, v in sd.items() if k.startswith("trunk.")}
    # Only a SwAV head has a place in the export formats (VISSL's swav head); DINO's goes.
    head = ({k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}
            if cfg.train.objective == "swav" else {})
    return trunk, head, str(cfg.model.trunk)


def read_run(src: Path, step: Optional[int] = None, which: Optional[str] = None) -> tuple[dict, dict, str]:
    """(trunk state, head state, trunk name) from a run folder or a step_XXXXXXXXX folder.

    A step folder that fails its checks is refused; in a run folder a checkpoint that fails
    them is skipped for the previous one with a warning, as a resume does.
    """
    if (src / "meta.json").exists():
        cands = [(-1, src, verify_step_dir(src))]
    else:
        cands = [c for c in find_resumable(src / "checkpoints") if step is None or c[0] == step]
        if not cands:
            raise CheckpointError(f"no complete checkpoint under {src}/checkpoints"
                                  + (f" for step {step}" if step is not None else ""))
    errors = []
    for _, path, meta in cands:  # newest first
        try:
            return _read_one(path, meta, which)
        except ConfigError:
            raise  # a planted resolver: refuse outright rather than try older checkpoints
        except (integrity.IntegrityError, UnsafePickleError, CheckpointException, OSError,
                RuntimeError, ValueError) as e:
            errors.append(f"{path}: {_one_line(e)}")
            if len(cands) > 1:
                log.warning("checkpoint %s not usable (%s); trying the previous one", path,
                            _one_line(e))
    raise CheckpointError("refusing the checkpoint (nothing was loaded): " + "; ".join(errors))
