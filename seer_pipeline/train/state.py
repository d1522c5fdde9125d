"""The loop's own checkpoint components (each a `Stateful` the checkpointer collects).

Global: `ModelState`, `OptimState` (DCP sharded state dicts: reshardable to any world size) and
`Progress` (step and schedule). Per rank: `RNGState`, `RankBNStats`; their `load_state_dict` gets
every saved rank's state, the contract of per-rank components (seer_pipeline.checkpoint.checkpointer).
"""
from __future__ import annotations

import logging
import random
from typing import Any, Callable

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


def bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    """BN running means, then running variances, in module order (both: one fixed order)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return ([m.running_mean for m in bns if m.running_mean is not None]
            + [m.running_var for m in bns if m.running_var is not None])


class RankBNStats:
    """Each rank's own BN running statistics, kept out of the run's trajectory by saves.

    Under FSDP2 they are per-rank buffers; a checkpoint's model holds their mean over the ranks
    (`average` runs before each save), the one copy evaluation and export read. The mean used to
    stay in the live buffers, so every save changed the run: a preemption save at a step the
    periodic saves skip gave statistics an uninterrupted run never has (found by the chaos soak,
    benchmarks/soak.py, seed 1). Now `average` keeps this rank's own values, which the save
    stores as this per-rank component, and `restore_own` puts them back once the save has its
    copy; a resume at the same world size loads them over the mean. On another world size there
    is no rank to take them from: the mean stays (logged).
    """

    def __init__(self, models: list[nn.Module], rank: int, world: int) -> None:
        self.models, self.rank, self.world = models, rank, world
        self._own: list[torch.Tensor] | None = None

    def _buffers(self) -> list[torch.Tensor]:
        return [b for m in self.models for b in bn_buffers(m)]

    def average(self, reduce: Callable[[torch.Tensor], None]) -> None:
        """Keep this rank's values, then `reduce` (a collective mean) each model's in place."""
        self._own = [b.detach().clone() for b in self._buffers()]
        for m in self.models:
            reduce(m)

    def restore_own(self) -> None:
        """After a save took its copy: this rank's own values back in the live buffers."""
        if self._own is not None:
            with torch.no_grad():
                for b, own in zip(self._buffers(), self._own):
                    b.copy_(own)
            self._own = None

    def state_dict(self) -> dict[str, Any]:
        own = self._own if self._own is not None else self._buffers()
        return {"buffers": [b.detach().cpu().clone() for b in own]}

    def load_state_dict(self, states: list[dict[str, Any] | None]) -> None:
        mine = states[self.rank] if len(states) == self.world else None
        bufs = self._buffers()
        if mine is None or len(mine["buffers"]) != len(bufs):
            if bufs:
                log.warning("BN statistics: the checkpoint has no copy of this rank's own (another "
                            "world size, or saved before they were kept): every rank starts from "
                            "their mean, so the run is not bitwise equal to an uninterrupted one")
            return
        with torch.no_grad():
            for b, saved in zip(bufs, mine["buffers"]):
                b.copy_(saved.to(b.device))
