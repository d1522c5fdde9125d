"""The loop's own checkpoint components (each a `Stateful` the checkpointer collects).

Global: `ModelState`, `OptimState` (DCP sharded state dicts: reshardable to any world size) and
`Progress` (step and schedule). Per rank: `RNGState`; its `load_state_dict` gets every saved
rank's state, the contract of per-rank components (seer_pipeline.checkpoint.checkpointer).
"""
from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


class ModelState:
    """The model as a checkpoint component (DCP sharded state dict: reshardable)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_model_state_dict(self.model, sd)


class OptimState:
    """The optimizer (LARS momentum) as a checkpoint component, keyed by parameter names."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, sd)


class Progress:
    """Step, schedule length and global batch (the same on every rank)."""

    def __init__(self, total: int, global_batch: int) -> None:
        self.step, self.total, self.global_batch = 0, total, global_batch

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "schedule_len": self.total, "global_batch": self.global_batch}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if int(sd["schedule_len"]) != self.total:
            raise ValueError(
                f"the checkpoint's lr schedule has {sd['schedule_len']} steps, this run's {self.total}: "
                f"set optim.total_steps={sd['schedule_len']} to train longer on the same schedule")
        self.step = int(sd["step"])


class RNGState:
    """Per-rank RNG streams (torch, CUDA, numpy, python) as a per-rank checkpoint component.

    Restored bitwise at the same world size. On another world size there is no rank to take a
    stream from, so each rank keeps the fresh stream it was seeded with (logged): the run then
    continues exactly in data order but not bitwise.
    """

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, states: list[dict[str, Any] | None]) -> None:
        if len(states) == self.world and states[self.rank] is not None:
            set_rng_state(states[self.rank])
        else:
            log.warning("RNG: checkpoint saved by %d rank(s), resuming on %d: per-rank streams "
                        "are reseeded, so the run is no longer bitwise equal to an uninterrupted "
                        "one", len(states), self.world)
