"""LARS that is correct on FSDP2-sharded parameters, and step-indexed schedules.

LARS follows apex's LARC in "scale" mode (no clipping) wrapped around momentum SGD, as SEER used
it: per parameter, trust = eta * ||w|| / (||g|| + wd * ||w|| + eps), g <- (g + wd * w) * trust,
then buf <- m * buf + g, w <- w - lr * buf.

Under FSDP2 each rank holds a dim-0 shard (a DTensor), and `to_local().norm()` is the norm of the
shard only (measured on 2 gloo ranks: 3.04 vs 4.24 for the whole tensor). One foreach norm
(fp64 accumulation) covers every local shard; their squares are all-reduced in ONE collective
over the mesh dimensions each parameter is sharded on, and the square root taken: the trust ratio
then equals the single-process one. The ratios are computed on the device, so a step reads
nothing back to the host (it did once per parameter before issue 20).

`set_state_dict` (DCP) initialises optimizer state by stepping with zero gradients and lr 0, so
a zero parameter or gradient norm must not divide by zero: the trust ratio is then 1.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

_EPS = 1e-8  # apex LARC's eps


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _shard_groups(p: torch.Tensor) -> tuple[Any, ...]:
    """Process groups over which `p`'s local squares must be summed (its sharded mesh dims)."""
    if not isinstance(p, DTensor):
        return ()
    mesh = p.device_mesh
    return tuple(mesh.get_group(i) for i, pl in enumerate(p.placements) if isinstance(pl, Shard))


def full_norms(tensors: list[torch.Tensor], groups: list[tuple[Any, ...]]) -> torch.Tensor:
    """float64 norms of whole (possibly sharded) tensors, as one tensor on their device.

    One `_foreach_norm` over the local shards (fp64 accumulation, no fp64 copy of the shards on
    CUDA's fused kernel), then one all-reduce of the squared local norms per set of groups.
    Nothing is read back to the host.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    local = torch.stack(torch._foreach_norm([_local(t).detach() for t in tensors], 2,
                                            dtype=torch.float64))
    by_groups: dict[tuple[Any, ...], list[int]] = {}
    for i, g in enumerate(groups):
        if g:  # unsharded: the local norm is the norm
            by_groups.setdefault(g, []).append(i)
    for gs, idx in by_groups.items():
        part = local[idx].pow(2)
        for g in gs:
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=g)
        local[idx] = part.sqrt()
    return local


class LARS(torch.optim.Optimizer):
    """Momentum SGD with layer-wise trust ratios (LARC, clip=False); FSDP2-aware.

    Param-group options: lr, momentum, weight_decay, trust (eta), lars (False: plain momentum
    SGD with weight decay for that group, e.g. BN and biases when excluded).
    """

    def __init__(
        self, params: Iterable[Any], lr: float = 0.1, momentum: float = 0.9,
        weight_decay: float = 1e-5, trust: float = 0.001, lars: bool = True,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust <= 0:
            raise ValueError(f"bad LARS hyper-parameters lr={lr} m={momentum} wd={weight_decay} "
                             f"trust={trust}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust=trust, lars=lars)
        super().__init__(params, defaults)
        # Eager state: a parameter without gradients so far (frozen prototypes) still has a
        # momentum buffer, so every checkpoint holds the same keys whatever step it was taken at.
        for grp in self.param_groups:
            for p in grp["params"]:
                if grp["momentum"]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D401 - torch signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every rank must take part in the same norm all-reduce, so the parameter list is all
        # params with a gradient; FSDP2 gives every rank a grad for every sharded param.
        items = [(grp, p) for grp in self.param_groups for p in grp["params"] if p.grad is not None]
        lars_items = [(grp, p) for grp, p in items if grp["lars"]]
        tensors: list[torch.Tensor] = []
        groups: list[tuple[Any, ...]] = []
        for _, p in lars_items:
            tensors += [p, p.grad]
            sg = _shard_groups(p)
            groups += [sg, sg]
        norms = full_norms(tensors, groups)
        # Trust ratios stay on the device: no host sync per parameter (the fp64 arithmetic is
        # the same as with Python floats, and `mul_` rounds the ratio to the gradient's dtype
        # exactly as it rounds a Python float).
        trust_of: dict[int, torch.Tensor] = {}
        if lars_items:
            w_n, g_n = norms[0::2], norms[1::2]
            eta = torch.tensor([grp["trust"] for grp, _ in lars_items], dtype=torch.float64, device=norms.device)
            wd = torch.tensor([grp["weight_decay"] for grp, _ in lars_items], dtype=torch.float64,
                              device=norms.device)
            # apex's 0/0 guard: a zero weight or gradient norm leaves the gradient as is.
            trust = torch.where((w_n > 0) & (g_n > 0), eta * w_n / (g_n + wd * w_n + _EPS),
                                torch.ones_like(w_n))
            trust_of = {id(p): t for (_, p), t in zip(lars_items, trust.unbind())}
        for grp, p in items:
            lr = float(grp["lr"])
            w, g = _local(p), _local(p.grad)
            d = g.add(w, alpha=grp["weight_decay"]) if grp["weight_decay"] else g.clone()
            if grp["lars"]:
                d.mul_(trust_of[id(p)])
            state = self.state[p]
            if grp["momentum"]:
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = _local(state["momentum_buffer"])
                buf.mul_(grp["momentum"]).add_(d)
                d = buf
            w.add_(d, alpha=-lr)
        return loss


def build_param_groups(model: torch.nn.Module, exclude_bn_bias: bool) -> list[dict[str, Any]]:
    """One LARS group, or two when BN/bias parameters are excluded from LARS and weight decay."""
    if not exclude_bn_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    plain, rest = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (plain if p.ndim <= 1 else rest).append(p)
    return [{"params": rest}, {"params": plain, "lars": False, "weight_decay": 0.0}]


def lr_schedule(
    peak: float, total_steps: int, warmup_steps: int, warmup_start: float, final_ratio: float,
) -> np.ndarray:
    """Per-step lr: linear warmup from `warmup_start` (clamped to <= peak), cosine to peak*ratio.

    Precomputed so the lr of a step is an index, and resuming needs no scheduler state.
    """
    if total_steps < 1:
        raise ValueError("total_steps must be >= 1")
    warm = min(warmup_steps, total_steps)
    start = min(warmup_start, peak)
    out = np.empty(total_steps, dtype=np.float64)
    if warm:
        out[:warm] = start + (peak - start) * np.arange(warm) / warm
    final = peak * final_ratio
    n = total_steps - warm
    for i in range(n):
        out[warm + i] = final + 0.5 * (peak - final) * (1 + math.cos(math.pi * i / max(1, n - 1)))
    return out


def peak_lr(base_lr: float, global_batch: int) -> float:
    """SEER's linear scaling rule: base_lr per 256 images."""
    return base_lr * global_batch / 256.0


def lr_at(schedule: np.ndarray, step: int) -> float:
    """The lr of `step`; past the schedule's end, its last value (extending a finished run)."""
    return float(schedule[min(step, len(schedule) - 1)])
