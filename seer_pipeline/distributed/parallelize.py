"""The one place that applies SyncBN, activation checkpointing, compile and FSDP2 to a model.

The model (a trunk with `.stem`/`.stages[i].blocks` and a SwAV head with `.prototypes`) knows
nothing of parallelism; this module mutates it in place, following torchtitan's order: AC and
compile per block first, then `fully_shard` bottom-up (BN units, block groups, prototypes, head,
root).

Why PyTorch FSDP2 and not fairscale (which SEER/VISSL used): fairscale's FSDP was upstreamed into
PyTorch, its last release is from 2022, and its FullyShardedDataParallel cannot run on CPU at all
("Torch not compiled with CUDA enabled", fairscale 0.4.13 tried here), so it could not be tested here.
FSDP2's per-parameter DTensor sharding also makes sharded DCP checkpoints and resharding free.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from seer_pipeline.config.train import ParallelConfig

log = logging.getLogger(__name__)

# fp16 is not offered: it needs a loss scaler whose inf check all ranks agree on, and bf16 (the
# GPU default, same exponent range as fp32) needs none.
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

#: torch releases this pipeline was tested with (pyproject.toml pins the same range): 2.13.0 in
#: the main venv (CPU), 2.14.1 in .venv-interop. Older releases admitted by FSDP2's API (>= 2.6)
#: raised "mixed torch.Tensor and DTensor" for FSDP2 + activation checkpointing + two crop
#: resolutions before one backward (fixed upstream in 2026), i.e. every SEER preset's step.
TESTED_TORCH = ((2, 13), (2, 15))  # [low, high) of (major, minor)
UNTESTED_TORCH_ENV = "SEER_UNTESTED_TORCH"


def check_torch_version(version: str | None = None) -> None:
    """Refuse, with one clear line, a torch outside the tested range (unless the user opts in).

    Only major.minor counts: NGC builds ("2.14.0a0+git...") are releases of their minor, and a
    nightly of the next minor ("2.15.0.dev...") is not tested."""
    v = version or torch.__version__
    m = re.match(r"(\d+)\.(\d+)", v)
    (lo_maj, lo_min), (hi_maj, hi_min) = TESTED_TORCH
    if m and (lo_maj, lo_min) <= (int(m[1]), int(m[2])) < (hi_maj, hi_min):
        return
    if os.environ.get(UNTESTED_TORCH_ENV) == "1":
        log.warning("torch %s is outside the tested range (%s=1 given): running anyway", v, UNTESTED_TORCH_ENV)
        return
    low, high = f"{lo_maj}.{lo_min}", f"{hi_maj}.{hi_min}"
    raise RuntimeError(
        f"torch {v} is outside the tested range >={low},<{high}: releases before the 2026 fix fail "
        f"FSDP2 + activation checkpointing with two crop resolutions ('mixed torch.Tensor and "
        f"DTensor'). Install a tested torch (pyproject.toml) or set {UNTESTED_TORCH_ENV}=1 to try it.")


@dataclass(frozen=True)
class ParallelPlan:
    """What `parallelize` applies; built from the `parallel` config section."""

    fsdp: str = "full"  # full | hybrid | none
    hybrid_shard_size: int = 0
    blocks_per_unit: int = 1
    ac: str = "none"  # none | stage | block
    compile: bool = False
    sync_bn_group: int = 0  # CUDA: 0 = per node, -1 = off, N = groups of N ranks
    reshard_after_forward: bool = True
    precision: str = "fp32"  # parameter/compute dtype of the FSDP units (train.precision)
    reduce_precision: str = "fp32"  # gradient reduce-scatter (master params and grads stay fp32)

    @property
    def param_dtype(self) -> torch.dtype:
        """FSDP2 parameter dtype: from the config, on every device (CPU tests run the GPU policy)."""
        if self.precision not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {self.precision!r}")
        return _DTYPES[self.precision]

    @property
    def reduce_dtype(self) -> torch.dtype:
        return _DTYPES[self.reduce_precision]

    @classmethod
    def from_config(cls, parallel: ParallelConfig, precision: str) -> "ParallelPlan":
        return cls(
            fsdp=parallel.fsdp, hybrid_shard_size=parallel.hybrid_shard_size,
            blocks_per_unit=parallel.blocks_per_unit, ac=parallel.ac, compile=parallel.compile,
            sync_bn_group=parallel.sync_bn_group,
            reshard_after_forward=parallel.reshard_after_forward, precision=precision,
        )


def build_mesh(plan: ParallelPlan, device_type: str, world: int, local_world: int) -> DeviceMesh | None:
    """1-D mesh ("shard") for full sharding; 2-D ("replicate", "shard") for hybrid."""
    if plan.fsdp == "none" or not dist.is_initialized():
        return None
    if plan.fsdp == "full":
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    shard = plan.hybrid_shard_size or local_world
    if shard < 1 or world % shard:
        raise ValueError(f"parallel.hybrid_shard_size={shard} must divide the world size {world}")
    return init_device_mesh(device_type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))


def _sync_bn_groups(group_size: int, local_world: int) -> Any:
    """Create SyncBN process groups of `group_size` consecutive ranks (every rank creates all)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    size = group_size or local_world
    if world % size:
        raise ValueError(f"parallel.sync_bn_group={size} must divide the world size {world}")
    mine = None
    for start in range(0, world, size):
        g = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = g
    return mine


_WRAPPER_ATTRS = ("_checkpoint_wrapped_module", "_orig_mod")  # checkpoint_wrapper, torch.compile


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP, activation-checkpoint and compile wrappers (FSDP2 modules are
    the model itself, so they need no unwrapping)."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
            continue
        inner = next((getattr(module, a) for a in _WRAPPER_ATTRS if hasattr(module, a)), None)
        if inner is None:
            return module
        module = inner


def _stage_blocks(stage: nn.Module) -> nn.Module:
    return unwrap(stage).blocks


def parallelize(
    model: nn.Module, plan: ParallelPlan, mesh: DeviceMesh | None, device: torch.device,
    local_world: int = 1,
) -> nn.Module:
    """Apply SyncBN / AC / compile / FSDP2 (or DDP when fsdp=none and world > 1); returns the model.

    `model` must have `.trunk` (with `.stem`, `.stages`) and `.head` (with `.prototypes`).
    """
    trunk = model.trunk
    on_cuda = device.type == "cuda"
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if on_cuda and dist.is_initialized() and plan.sync_bn_group >= 0:
        # SyncBN only trains on CUDA (PyTorch's SyncBatchNorm raises on CPU input), so CPU keeps plain BN.
        group = _sync_bn_groups(plan.sync_bn_group, local_world)
        model.trunk = trunk = nn.SyncBatchNorm.convert_sync_batchnorm(trunk, process_group=group)
    params = list(model.parameters())
    if any(p.device != device for p in params) and not any(p.is_meta for p in params):
        # Skipped when already there (fake-tensor models cannot be moved) and for a meta-built
        # model, which is materialized shard by shard after sharding (models.materialize).
        model.to(device)

    if plan.compile:
        # Every block shares one forward code object, so dynamo's per-frame recompile limit
        # (8) would send all but the first few (block, resolution) graphs back to eager.
        import torch._dynamo.config as dcfg

        n = sum(len(_stage_blocks(s)) for s in trunk.stages)
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dcfg, name):
                setattr(dcfg, name, max(getattr(dcfg, name), 4 * n + 8))
        if hasattr(dcfg, "accumulated_recompile_limit"):
            dcfg.accumulated_recompile_limit = max(dcfg.accumulated_recompile_limit, 8 * n + 64)
    for i, stage in enumerate(trunk.stages):
        blocks = _stage_blocks(stage)
        for j in range(len(blocks)):
            if plan.ac == "block":
                blocks[j] = checkpoint_wrapper(blocks[j])
            if plan.compile:
                # In place: parameter names (and checkpoints) stay the same. dynamic=False: each
                # crop resolution gets its own static graph (dynamic shapes failed in inductor on
                # CPU here: "Cannot convert expression to float").
                blocks[j].compile(dynamic=False)
        if plan.ac == "stage":
            # SEER checkpointed per stage segment (`stage_checkpoints` [[2],[7],[9,17],[]] in VISSL's SEER configs):
            # only stage inputs are kept, each stage is recomputed during backward.
            trunk.stages[i] = checkpoint_wrapper(stage)

    if plan.fsdp == "none":
        if distributed:
            return nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if on_cuda else None, broadcast_buffers=False)
        return model
    if mesh is None:
        return model

    # The dtype policy is the config's on every device, so CPU/gloo tests run the GPU layout.
    param_dtype = plan.param_dtype
    apply_fsdp(model, mesh, param_dtype, plan.blocks_per_unit, plan.reshard_after_forward,
               plan.reduce_dtype)
    log.info("FSDP2 applied: %s sharding, mesh %s, %d units, params %s, ac=%s, compile=%s",
             plan.fsdp, tuple(mesh.shape), fsdp_units(model), param_dtype, plan.ac, plan.compile)
    return model


def fsdp_units(model: nn.Module) -> int:
    """FSDP units: parameter groups gathered and reduced together, one per `fully_shard` call
    that holds parameters. Not the FSDPModule count: a call on a list of modules (a group of
    blocks, the shared BN unit) makes each of them an FSDPModule around one group."""
    groups = {id(g) for m in model.modules() if isinstance(m, FSDPModule)
              for g in m._get_fsdp_state()._fsdp_param_groups}
    return len(groups)


def apply_fsdp(
    model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype = torch.float32,
    blocks_per_unit: int = 1, reshard_after_forward: bool = True,
    reduce_dtype: torch.dtype = torch.float32, bn_units: str = "shared",
) -> nn.Module:
    """fully_shard bottom-up: [BN unit(s)], block groups, prototypes, head, root.

    With mixed precision every BatchNorm stays fp32 outside its block's bf16 unit. `shared`: one
    fp32 unit holds them all (one all-gather per step, kept unsharded until backward: 0.6 MiB
    for seer_32gf's 65 BNs, 6 MiB for seer_10b's 86; one reduce-scatter). `each`: a unit per BN
    (the layout until issue 20: 65 units in 32GF, three collectives each per resolution pass).
    """
    trunk, head = model.trunk, model.head
    mixed = param_dtype != torch.float32
    # Without mixed precision the default policy casts nothing (float64 test models stay so).
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype) if mixed \
        else MixedPrecisionPolicy()
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32) if mixed \
        else MixedPrecisionPolicy()
    kw: dict[str, Any] = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    if mixed:
        # BN must stay fp32 in its own unit or FSDP2 mixed precision fails on it
        # ("expected scalar type BFloat16 but found Float" on torch 2.13; torchtitan #674; VISSL's auto_wrap_bn did the same). Its output
        # goes back to the compute dtype, or the next conv sees fp32 input with bf16 weights
        # (measured: "Input type (float) and weight type (BFloat16) should be the same").
        bn = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                  output_dtype=param_dtype)
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if bn_units == "each":
            for m in bns:
                fully_shard(m, mp_policy=bn, **kw)
        elif bn_units != "shared":
            raise ValueError(f"bn_units must be 'shared' or 'each', got {bn_units!r}")
        elif bns:
            # One group for modules all over the trunk: resharding it after forward would
            # all-gather it again in every block's backward (and in AC recomputation).
            fully_shard(bns, mp_policy=bn, mesh=mesh, reshard_after_forward=False)
    for stage in trunk.stages:
        blocks = list(_stage_blocks(stage))
        for k in range(0, len(blocks), blocks_per_unit):
            group = blocks[k:k + blocks_per_unit]
            fully_shard(group if len(group) > 1 else group[0], mp_policy=mp, **kw)
    # Prototypes (and thus the scores fed to Sinkhorn) always in fp32 (VISSL swav_head_fsdp).
    fully_shard(head.prototypes, mp_policy=fp32, **kw)
    fully_shard(head, mp_policy=mp, **kw)
    fully_shard(model, mp_policy=mp, **kw)
    return model


def is_fsdp(model: nn.Module) -> bool:
    """Whether fully_shard was applied (then FSDP casts dtypes; otherwise autocast does)."""
    return isinstance(model, FSDPModule)


def clean_fqn(name: str) -> str:
    """Parameter name without wrapper prefixes (checkpoint_wrapper, compile, DDP)."""
    for junk in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(junk, "")
    return name[len("module."):] if name.startswith("module.") else name
