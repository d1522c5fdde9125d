"""Activation memory measured on the meta device: what autograd saves, per segment, per image.

One meta-device forward in training mode records every tensor autograd saves for backward
(`saved_tensors_hooks`, deduplicated by storage, parameters excluded), attributed to the stem or
the stage/block running at the time, with the trainer's dtype policy applied (bf16/fp16 weights,
fp32 BatchNorm units that cast their input up and their output back, as FSDP2's
MixedPrecisionPolicy does). Two batch sizes give an exact per-image slope. AC policies and the
multi-crop order of backward then give the bytes held at the peak. A forward without autograd
(DINO's teacher) saves nothing: what it holds at its peak is measured the same way, by following
every tensor until it dies (`forward_peak`). Nothing is allocated.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass
class ActProfile:
    """Bytes autograd saves per image (fp32) at one resolution, by segment."""
    resolution: int
    stem: float
    stages: list[float]  # saved inside each stage
    stage_inputs: list[float]  # input tensor of each stage (what stage-AC keeps)
    blocks: list[float]  # saved inside each block (all stages, in order)
    block_inputs: list[float]
    max_tensor: float  # the largest single saved tensor

    def _segments(self, ac: str) -> tuple[list[float], list[float]]:
        if ac == "stage":
            return self.stages, self.stage_inputs
        if ac == "block":
            return self.blocks, self.block_inputs
        raise ValueError(f"ac must be none|stage|block, got {ac!r}")

    def kept(self, ac: str) -> float:
        """Per-image bytes held from the end of forward until this pass's backward starts."""
        if ac == "none":
            return self.stem + sum(self.stages)
        _, inputs = self._segments(ac)
        # The first segment's input is the stem's output, which the stem already holds.
        return self.stem + sum(inputs[1:])

    def saved(self, ac: str) -> float:
        """Per-image bytes held at the peak of this pass's backward under an AC policy.

        Segments are recomputed last to first; while segment k is, the inputs of segments
        after k are already freed, so the peak is the largest (inputs up to k + segment k).
        """
        if ac == "none":
            return self.kept(ac)
        segs, inputs = self._segments(ac)
        return self.stem + max(sum(inputs[1:k + 1]) + segs[k] for k in range(len(segs)))


def gathered_peak(profiles: Sequence[ActProfile], counts: Sequence[int], ac: str,
                   stage_params: Sequence[int], unit: int, b_act: int) -> tuple[float, float]:
    """(activations + gathered parameters at their joint peak, the gathered part there).

    Without stage AC two units are gathered (current + prefetched). With stage AC, FSDP2 does
    not reshard the blocks of a stage recomputed inside backward until their own backward, so
    while stage k is recomputed all its units are gathered; FSDPMemTracker shows them twice
    (unsharded parameters and a temporary of the same size: 12.84 + 14.27 GiB for seer_10b's
    stage 3 at 2x160+4x96, 0.17 + 0.28 GiB for seer_32gf's), hence 2 x stage params.
    """
    if ac != "stage":
        g = 2 * b_act * unit
        return activation_peak(profiles, counts, ac) + g, g
    kept = [n * p.kept(ac) for p, n in zip(profiles, counts)]
    best = (sum(kept) + 2 * b_act * unit, 2 * b_act * unit)  # the end of forward
    for g, (p, n) in enumerate(zip(profiles, counts)):
        for k in range(len(p.stages)):
            held = sum(kept[:g]) + n * (p.stem + sum(p.stage_inputs[1:k + 1]) + p.stages[k])
            gath = 2 * b_act * stage_params[k]
            best = max(best, (held + gath, gath))
    return best


def activation_peak(profiles: Sequence[ActProfile], counts: Sequence[int], ac: str) -> float:
    """Bytes held at the backward peak of a multi-crop step: the trunk runs once per resolution
    group (images = counts); backward visits the groups last to first, so while group g is
    differentiated, the groups before it still hold what they kept and those after are freed."""
    kept = [n * p.kept(ac) for p, n in zip(profiles, counts)]
    during = [sum(kept[:g]) + n * p.saved(ac) for g, (p, n) in enumerate(zip(profiles, counts))]
    return max(sum(kept), *during)


_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _apply_dtype_policy(trunk: nn.Module, precision: str) -> list[Any]:
    """Cast the trunk as FSDP2's MixedPrecisionPolicy of `parallelize()` does: low-precision
    weights, fp32 BatchNorm units that cast their input to fp32 and their output back."""
    if precision == "fp32":
        return []
    low = _TORCH_DTYPES[precision]
    hooks = []
    for m in trunk.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            hooks.append(m.register_forward_pre_hook(lambda _m, a: tuple(x.float() for x in a)))
            hooks.append(m.register_forward_hook(lambda _m, _a, out: out.to(low)))
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            m.to(low)
    return hooks


def _record(trunk: nn.Module, res: int, batch: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    seen: dict[int, tuple[Any, int, str]] = {}
    inputs: dict[str, int] = {}
    param_ids = {id(p) for p in trunk.parameters()}
    where = ["stem"]
    hooks = []

    def enter(name: str):
        def pre(_m: nn.Module, args: tuple) -> None:
            where[0] = name
            inputs[name] = args[0].untyped_storage().nbytes()
        return pre

    for i, stage in enumerate(trunk.stages):
        hooks.append(stage.register_forward_pre_hook(enter(f"s{i}")))
        for j, block in enumerate(getattr(stage, "blocks", [])):
            hooks.append(block.register_forward_pre_hook(enter(f"s{i}.b{j}")))

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) in param_ids or isinstance(t, nn.Parameter):
            return t
        s = t.untyped_storage()
        # Keep the storage alive so its id cannot be reused by a later tensor.
        seen.setdefault(id(s), (s, s.nbytes(), where[0]))
        return t

    # Meta trunks cost nothing; a real one works too (and is how the meta count was checked).
    x = torch.empty(batch, 3, res, res, device=next(trunk.parameters()).device, dtype=dtype)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            trunk(x)
    finally:
        for h in hooks:
            h.remove()
    return {"seen": [(n, w) for _, n, w in seen.values()], "inputs": inputs}


def activation_profile(trunk: nn.Module, resolution: int, precision: str = "fp32") -> ActProfile:
    """Per-image saved bytes from two meta forwards (batch 1 and 2: the slope is per image),
    under the dtype policy of `precision` (applied to a copy of the trunk)."""
    if precision != "fp32":
        trunk = copy.deepcopy(trunk)
    hooks = _apply_dtype_policy(trunk, precision)
    trunk.train()
    try:
        recs = [_record(trunk, resolution, b, _TORCH_DTYPES[precision]) for b in (1, 2)]
    finally:
        for h in hooks:
            h.remove()

    def total(rec: dict[str, Any], pred) -> float:
        return float(sum(n for n, w in rec["seen"] if pred(w)))

    def slope(pred) -> float:
        return total(recs[1], pred) - total(recs[0], pred)

    n_st = len(trunk.stages)
    stages = [slope(lambda w, i=i: w == f"s{i}" or w.startswith(f"s{i}.")) for i in range(n_st)]
    bnames = [k for k in recs[0]["inputs"] if "." in k]
    blocks = [slope(lambda w, k=k: w == k) for k in bnames]
    inp = lambda k: float(recs[1]["inputs"][k] - recs[0]["inputs"][k])  # noqa: E731
    return ActProfile(
        resolution, slope(lambda w: w == "stem"), stages, [inp(f"s{i}") for i in range(n_st)],
        blocks, [inp(k) for k in bnames], float(max(n for n, _ in recs[1]["seen"])) / 2,
    )


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages alive at each op, and their peak: every op output is followed
    until its last tensor dies (a weakref finalizer; a storage counts once however many
    views share it). Storages alive before the forward (parameters, the input) are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage -> [bytes, tensors alive]
        self.now = self.peak = 0

    def _drop(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if not entry[1]:
            self.now -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st._cdata
            entry = self.live.get(key)
            if entry is None:
                entry = self.live[key] = [st.nbytes(), 0]
                self.now += entry[0]
                self.peak = max(self.peak, self.now)
            entry[1] += 1
            weakref.finalize(t, self._drop, key)
        return out


def forward_peak(trunk: nn.Module, resolution: int, precision: str = "fp32") -> float:
    """Per-image bytes alive at the peak of a forward under `no_grad` (a DINO teacher's: nothing
    is saved for backward, each tensor lives until the next layers no longer read it), under
    the dtype policy of `precision`: two meta forwards (batch 1 and 2), the slope."""
    if precision != "fp32":
        trunk = copy.deepcopy(trunk)
    hooks = _apply_dtype_policy(trunk, precision)
    trunk.train()  # DINO's teacher runs in training mode (batch statistics), as the student
    peaks = []
    try:
        for b in (1, 2):
            x = torch.empty(b, 3, resolution, resolution, device=next(trunk.parameters()).device,
                            dtype=_TORCH_DTYPES[precision])
            with torch.no_grad(), _LiveBytes() as live:
                out = trunk(x)
                del out
            peaks.append(live.peak)
    finally:
        for h in hooks:
            h.remove()
    return float(peaks[1] - peaks[0])
