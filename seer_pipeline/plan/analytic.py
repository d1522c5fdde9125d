"""The analytic plan: what a SEER-style run costs at scale, from the real model graph.

Parameters and multiply-adds come from the model built on the meta device: the trunk
(`count_macs` per crop resolution) and the SwAV head (projection MLP + prototypes) of the preset
named, or of the SEER preset that trains the named trunk. Activation memory is measured on the
meta device under the trainer's dtype policy (seer_pipeline.plan.activations). Parameters,
gradients and LARS momentum are divided by the shard group (the whole world for full sharding,
one node for hybrid), with FSDP2's dim-0 padding. Nothing is allocated.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict
from importlib import resources
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf
from torch import nn

from seer_pipeline.config.train import load_train_config, trunk_name
from seer_pipeline.config.crops import CROP_PRESETS, crop_counts
from seer_pipeline.models import build_trunk, count_macs, list_trunks
from seer_pipeline.models.swav_head import build_model
from seer_pipeline.plan.activations import (
    activation_peak,
    activation_profile,
    gathered_peak,
)
from seer_pipeline.plan.gpus import GPUS

GIB = 2**30
CROPS = {name: crop_counts(name) for name in CROP_PRESETS}  # name -> [(count, resolution)]
CROPS["seer160"] = CROPS["seer"]  # the name earlier plans used for SEER's 2x160+4x96
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
SEER_MS_PER_ITER = 6125.0  # SEER 2021 paper, section 3.2 (512 V100-32GB, RegNetY-256GF)


def parse_crops(spec: str) -> list[tuple[int, int]]:
    """A preset name or 'NxR+NxR' (e.g. 2x224+4x96)."""
    if spec in CROPS:
        return CROPS[spec]
    if not re.fullmatch(r"\d+x\d+(\+\d+x\d+)*", spec):
        raise ValueError(f"--crops {spec!r}: a preset ({', '.join(CROPS)}) or like 2x224+4x96")
    return [(int(n), int(r)) for n, r in (p.split("x") for p in spec.split("+"))]


def build_meta(model: Any, with_head: bool = True) -> tuple[nn.Module, nn.Module | None, str]:
    """(trunk, SwAV head or None, where the head came from), built on the meta device.

    A training config (DictConfig) or preset gives its own head. A trunk name borrows the head
    of the first preset that trains that trunk (seer_32gf ... seer_10b); with none, no head.
    """

    if not isinstance(model, str):
        with torch.device("meta"):
            m = build_model(model)
        return m.trunk, m.head if with_head else None, "config" if with_head else "left out"
    name = trunk_name(model)
    preset = model if model.lower() not in list_trunks() else _preset_for(name)
    with torch.device("meta"):
        if preset is None or not with_head:
            why = "left out" if not with_head else "none (no preset trains this trunk)"
            return build_trunk(name), None, why
        m = build_model(load_train_config(preset))
    return m.trunk, m.head, preset


def _preset_for(trunk: str) -> str | None:

    for f in sorted(resources.files("seer_pipeline.config").joinpath("presets").iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml") and OmegaConf.select(OmegaConf.load(str(f)), "model.trunk") == trunk:
            return f.name[:-5]
    return None


def head_macs(head: nn.Module | None) -> int:
    """Multiply-adds of the head per crop: its Linear layers (projection MLP and prototypes)."""
    if head is None:
        return 0
    return sum(m.in_features * m.out_features for m in head.modules() if isinstance(m, nn.Linear))


def _units(trunk: nn.Module, head: nn.Module | None, blocks_per_unit: int) -> list[int]:
    """Parameter counts of the FSDP units `apply_fsdp` makes: block groups of each stage, the
    head's prototypes and the rest of the head; the root unit holds the stem."""
    sizes = []
    for s in trunk.stages:
        blocks = list(s.blocks)
        for k in range(0, len(blocks), blocks_per_unit):
            sizes.append(sum(p.numel() for b in blocks[k:k + blocks_per_unit] for p in b.parameters()))
    sizes.append(sum(p.numel() for p in trunk.stem.parameters()))
    if head is not None:
        sizes += [sum(p.numel() for p in head.projection.parameters()),
                  sum(p.numel() for p in head.prototypes.parameters())]
    return sizes


def largest_unit(trunk: nn.Module, head: nn.Module | None = None, blocks_per_unit: int = 1) -> int:
    """Parameters of the largest FSDP unit: a group of `blocks_per_unit` blocks, the stem, the
    head's projection MLP or the prototypes (the head's two units)."""
    return max(_units(trunk, head, blocks_per_unit))


def sharded_numel(modules: Sequence[nn.Module | None], shard: int) -> int:
    """Elements one rank holds when every parameter is split on dim 0 into `shard` chunks:
    FSDP2 pads each parameter to ceil(dim0 / shard) rows per rank."""
    total = 0
    for m in modules:
        for p in (m.parameters() if m is not None else ()):
            rows = p.shape[0] if p.dim() else 1
            total += math.ceil(rows / shard) * (p.numel() // max(rows, 1))
    return total


def _buffer_bytes(modules: Sequence[nn.Module | None]) -> int:
    return sum(b.numel() * b.element_size() for m in modules if m is not None for b in m.buffers())


def plan(model: Any, gpus: int, batch_per_gpu: int, crops: str | list[tuple[int, int]] = "seer2021",
         precision: str | None = None, ac: str = "stage", gpu_type: str = "v100",
         mfu: float = 0.25, images: float = 1e9, with_head: bool = True,
         shard_size: int | None = None, blocks_per_unit: int = 1) -> dict[str, Any]:
    """Every number `seer-plan` prints, as one dict.

    `model`: a trunk name, a preset name or a training config (DictConfig). `shard_size`: ranks
    a parameter is split over (default `gpus`: full sharding; a node for hybrid sharding).
    """
    if gpu_type not in GPUS:
        raise ValueError(f"--gpu-type must be one of {', '.join(GPUS)}")
    precision = precision or ("fp16" if gpu_type == "v100" else "bf16")
    if not GPUS[gpu_type].get(precision):
        raise ValueError(f"{gpu_type} has no {precision} tensor cores")
    if gpus < 1 or batch_per_gpu < 1 or not 0 < mfu <= 1:
        raise ValueError("need gpus >= 1, batch_per_gpu >= 1 and 0 < mfu <= 1")
    shard = shard_size or gpus
    if shard < 1 or gpus % shard:
        raise ValueError(f"the shard group ({shard}) must divide the number of GPUs ({gpus})")
    crop_list = parse_crops(crops) if isinstance(crops, str) else [tuple(c) for c in crops]
    trunk, head, head_from = build_meta(model, with_head)
    model_name = model if isinstance(model, str) else str(model.model.trunk)
    trunk_params = sum(p.numel() for p in trunk.parameters())
    head_params = sum(p.numel() for p in head.parameters()) if head is not None else 0
    params = trunk_params + head_params
    trunk_macs = {r: count_macs(trunk, r) for _, r in crop_list}
    macs = {r: trunk_macs[r] + head_macs(head) for r in trunk_macs}
    fwd_flops = sum(n * 2 * macs[r] for n, r in crop_list)
    train_flops = 3 * fwd_flops  # backward = 2x forward (standard estimate, Kaplan et al. 2020)
    # Saved activations in the dtypes the FSDP2 policy produces (bf16 convs, fp32 BN inputs).
    profiles = {r: activation_profile(trunk, r, precision) for _, r in crop_list}
    b_act = DTYPE_BYTES[precision]
    act = {a: activation_peak([profiles[r] for _, r in crop_list], [n * batch_per_gpu for n, _ in crop_list], a)
           for a in ("none", "stage", "block")}
    # Backward holds the gradient of the activation it differentiates: at most the largest
    # saved tensor, in the compute dtype (that tensor is an fp32 BN input under mixed precision).
    transient = max(n * batch_per_gpu * profiles[r].max_tensor for n, r in crop_list) * (
        b_act / 4 if precision != "fp32" else 1)
    unit = max(_units(trunk, None, blocks_per_unit))
    stage_params = [sum(p.numel() for p in st.parameters()) for st in trunk.stages]
    gathered = {a: gathered_peak([profiles[r] for _, r in crop_list], [n * batch_per_gpu for n, _ in crop_list],
                                  a, stage_params, unit, b_act) for a in ("none", "stage", "block")}
    local = 4 * sharded_numel([trunk, head], shard)
    # The crops as the loader delivers them (fp32) and the root unit's cast to the compute dtype.
    pixels = batch_per_gpu * sum(n * 3 * r * r for n, r in crop_list)
    mem = {
        "params_sharded": local,  # fp32 master weights
        "grads_sharded": local,  # fp32: FSDP2 reduces in fp32 (reduce_dtype) into fp32 shards
        "optimizer_sharded": local,  # LARS: one momentum buffer
        "buffers": _buffer_bytes([trunk, head]),  # BN running statistics, replicated
        # Gathered parameters at the peak (see gathered_peak) and the fp32 reduce-scatter
        # buffer of the largest unit, which FSDP2 keeps until the next reduce-scatter.
        "unsharded_units": gathered[ac][1] + 4 * unit,
        "inputs": 4 * pixels,  # fp32 crops from the loader
        "activations_no_ac": act["none"],
        "activations_stage_ac": act["stage"],
        "activations_block_ac": act["block"],
        "backward_transient": transient,
    }
    # Activations and gathered parameters peak together (gathered[ac][0] is their joint peak,
    # at least act[ac]); the activation line shows the activations alone.
    peak = (mem["params_sharded"] + mem["grads_sharded"] + mem["optimizer_sharded"] + mem["buffers"]
            + gathered[ac][0] + 4 * unit + mem["inputs"] + transient)
    peak_flops = GPUS[gpu_type][precision]
    step_s = batch_per_gpu * train_flops / (peak_flops * mfu)
    global_batch = gpus * batch_per_gpu
    ips = global_batch / step_s
    # Within a shard group: all-gather in forward and again in backward, reduce-scatter the
    # gradients; across replicas (hybrid): all-reduce of the fp32 gradient shards.
    comm = (shard - 1) / shard * params * (2 * b_act + 4)
    replicas = gpus // shard
    comm += 2 * (replicas - 1) / replicas * local
    out = {
        "model": model_name, "gpus": gpus, "batch_per_gpu": batch_per_gpu, "global_batch": global_batch,
        "shard_size": shard, "replicas": replicas, "blocks_per_unit": blocks_per_unit,
        "crops": crop_list, "precision": precision, "ac": ac, "gpu_type": gpu_type, "mfu": mfu,
        "params": params, "trunk_params": trunk_params, "head_params": head_params, "head_from": head_from,
        "macs_per_crop": {str(r): macs[r] for r in macs},
        "trunk_macs_per_crop": {str(r): trunk_macs[r] for r in trunk_macs}, "head_macs_per_crop": head_macs(head),
        "flops_per_image": train_flops, "fwd_flops_per_image": fwd_flops,
        "memory_per_gpu_bytes": mem, "peak_memory_per_gpu_bytes": peak,
        "memory_per_gpu_gib": peak / GIB, "gpu_memory_gib": GPUS[gpu_type]["mem_gib"],
        "step_time_s": step_s, "images_per_s": ips, "days_for_images": images / ips / 86400,
        "images": images, "comm_bytes_per_gpu_per_step": comm,
        "activation_profile": {str(r): asdict(p) for r, p in profiles.items()},
    }
    if (model, gpus, batch_per_gpu, crops, gpu_type) == ("regnety_256gf", 512, 16, "seer2021", "v100"):
        measured = SEER_MS_PER_ITER / 1000
        out["seer_check"] = {"paper_step_s": measured, "planned_step_s": step_s,
                             "implied_mfu": batch_per_gpu * train_flops / (measured * peak_flops)}
    return out


def preset_world(cfg: Any, gpus: int | None = None, local_world: int | None = None) -> tuple[int, int]:
    """(world size, ranks per node) a training config is launched with: SLURM's nodes x tasks,
    else `dist.nproc` local ranks on one node; `gpus` / `local_world` override them."""
    slurm_world = int(cfg.slurm.nodes) * int(cfg.slurm.tasks_per_node)
    if slurm_world > 1:
        world, node = slurm_world, int(cfg.slurm.tasks_per_node)
        world = gpus or world
        return world, local_world or min(node, world)
    world = gpus or int(cfg.dist.nproc)
    return world, local_world or world


def preset_crops(cfg: Any) -> list[tuple[int, int]]:
    """[(count, resolution)] of the config's `data` section (a named preset or custom lists)."""
    if cfg.data.crops == "custom":
        return [(int(n), int(r)) for n, r in zip(cfg.data.nmb_crops, cfg.data.size_crops)]
    return crop_counts(str(cfg.data.crops))


def shard_group(cfg: Any, world: int, local_world: int) -> int:
    """Ranks each parameter is split over, as `build_mesh` builds the mesh."""
    if cfg.parallel.fsdp == "none":
        return 1
    if cfg.parallel.fsdp == "full":
        return world
    return int(cfg.parallel.hybrid_shard_size) or local_world


def plan_config(cfg: Any, gpus: int | None = None, local_world: int | None = None,
                gpu_type: str = "h100", mfu: float = 0.25, images: float = 1e9) -> dict[str, Any]:
    """The plan of a training config at its world size (or `gpus`), with its crops, batch,
    precision, sharding, FSDP units and AC."""
    world, node = preset_world(cfg, gpus, local_world)
    p = plan(cfg, world, int(cfg.data.batch_size), preset_crops(cfg), str(cfg.train.precision),
             str(cfg.parallel.ac), gpu_type, mfu, images, True, shard_group(cfg, world, node),
             int(cfg.parallel.blocks_per_unit))
    p["mesh"] = mesh_name(cfg, world, node)
    return p


def mesh_name(cfg: Any, world: int, local_world: int) -> str:
    """'full 512', 'hybrid 64x8' (replicas x shard) or 'none'."""
    if cfg.parallel.fsdp == "none":
        return "none"
    shard = shard_group(cfg, world, local_world)
    return f"full {world}" if cfg.parallel.fsdp == "full" else f"hybrid {world // shard}x{shard}"
