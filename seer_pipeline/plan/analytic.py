"""The analytic plan: what a SEER-style run costs at scale, from the real model graph.

Parameters and multiply-adds come from the model built on the meta device: the trunk
(`count_macs` per crop resolution) and the head (SwAV's projection MLP + prototypes, or DINO's
MLP + weight-normalised last layer) of the preset named, or of the SEER preset that trains the
named trunk. Activation memory is measured on the meta device under the trainer's dtype policy
(seer_pipeline.plan.activations). Parameters, gradients and LARS momentum are divided by the
shard group (the whole world for full sharding, one node for hybrid), with FSDP2's dim-0
padding. A DINO config (train.objective=dino) adds its teacher: a second copy of the sharded
parameters and buffers (no gradients, no momentum), its forward on the global crops (FLOPs, one
all-gather, the tensors alive at its peak) and its fp32 targets. Nothing is allocated.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from importlib import resources
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf
from torch import nn

from seer_pipeline.config.train import load_train_config, trunk_name
from seer_pipeline.config.crops import crop_counts
from seer_pipeline.models import build_trunk, count_macs, list_trunks
from seer_pipeline.models.build import build_for
from seer_pipeline.models.dino_head import WeightNormLinear
from seer_pipeline.plan.activations import (
    ActProfile,
    activation_peak,
    activation_profile,
    forward_peak,
    gathered_peak,
)
from seer_pipeline.plan.gpus import GPUS
from seer_pipeline.plan.shape import (
    GIB,
    RunShape,
    Teacher,
    teacher_of,
)

SEER_MS_PER_ITER = 6125.0  # SEER 2021 paper, section 3.2 (512 V100-32GB, RegNetY-256GF)


def _meta_model(model: Any, with_head: bool) -> tuple[nn.Module, nn.Module | None, str, Any]:
    """(trunk, head or None, where the head came from, the training config or None)."""
    if not isinstance(model, str):
        with torch.device("meta"):
            m = build_for(model)
        return m.trunk, m.head if with_head else None, "config" if with_head else "left out", model
    name = trunk_name(model)
    preset = model if model.lower() not in list_trunks() else _preset_for(name)
    with torch.device("meta"):
        if preset is None or not with_head:
            why = "left out" if not with_head else "none (no preset trains this trunk)"
            cfg = load_train_config(preset) if preset is not None and preset == model else None
            return build_trunk(name), None, why, cfg
        cfg = load_train_config(preset)
        m = build_for(cfg)
    return m.trunk, m.head, preset, cfg if preset == model else None


def build_meta(model: Any, with_head: bool = True) -> tuple[nn.Module, nn.Module | None, str]:
    """(trunk, head or None, where the head came from), built on the meta device.

    A training config (DictConfig) or preset gives its own head (SwAV's or DINO's). A trunk name
    borrows the head of the first preset that trains that trunk (seer_32gf ... seer_10b); with
    none, no head.
    """
    return _meta_model(model, with_head)[:3]


def _preset_for(trunk: str) -> str | None:

    for f in sorted(resources.files("seer_pipeline.config").joinpath("presets").iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml") and OmegaConf.select(OmegaConf.load(str(f)), "model.trunk") == trunk:
            return f.name[:-5]
    return None


def head_macs(head: nn.Module | None) -> int:
    """Multiply-adds of the head per crop: its Linear layers (projection MLP and prototypes;
    DINO's weight-normalised last layer is a plain [K, d] matrix product too)."""
    if head is None:
        return 0
    return sum(m.in_features * m.out_features if isinstance(m, nn.Linear) else m.weight.numel()
               for m in head.modules() if isinstance(m, (nn.Linear, WeightNormLinear)))


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


def _compute(trunk: nn.Module, head: nn.Module | None, shape: RunShape, teacher: Teacher | None) -> dict[str, Any]:
    """Parameters, multiply-adds per crop and FLOPs per image (the teacher's forward included)."""
    trunk_params = sum(p.numel() for p in trunk.parameters())
    head_params = sum(p.numel() for p in head.parameters()) if head is not None else 0
    trunk_macs = {r: count_macs(trunk, r) for _, r in shape.crops}
    macs = {r: trunk_macs[r] + head_macs(head) for r in trunk_macs}
    fwd_flops = sum(n * 2 * macs[r] for n, r in shape.crops)
    train_flops = 3 * fwd_flops  # backward = 2x forward (standard estimate, Kaplan et al. 2020)
    out = {"params": trunk_params + head_params, "trunk_params": trunk_params, "head_params": head_params,
           "macs": macs, "trunk_macs": trunk_macs, "fwd_flops": fwd_flops, "train_flops": train_flops}
    if teacher is not None:
        out["teacher_fwd_flops"] = sum(n * 2 * macs[r] for n, r in teacher.crops(shape.crops))
        out["train_flops"] += out["teacher_fwd_flops"]  # forward only: no backward
    return out


def _memory(trunk: nn.Module, head: nn.Module | None, shape: RunShape,
            teacher: Teacher | None) -> tuple[dict[str, float], float, dict[str, ActProfile]]:
    """(bytes per GPU by item, the peak, the activation profiles per resolution)."""
    crops, counts, b_act = shape.crops, shape.images_per_crop(), shape.b_act
    # Saved activations in the dtypes the FSDP2 policy produces (bf16 convs, fp32 BN inputs).
    profiles = {r: activation_profile(trunk, r, shape.precision) for _, r in crops}
    by_crop = [profiles[r] for _, r in crops]
    act = {a: activation_peak(by_crop, counts, a) for a in ("none", "stage", "block")}
    # Backward holds the gradient of the activation it differentiates: at most the largest
    # saved tensor, in the compute dtype (that tensor is an fp32 BN input under mixed precision).
    transient = max(n * p.max_tensor for n, p in zip(counts, by_crop)) * (
        b_act / 4 if shape.precision != "fp32" else 1)
    unit = max(_units(trunk, None, shape.blocks_per_unit))
    stage_params = [sum(p.numel() for p in st.parameters()) for st in trunk.stages]
    gathered = gathered_peak(by_crop, counts, shape.ac, stage_params, unit, b_act)
    local = 4 * sharded_numel([trunk, head], shape.shard)
    # The crops as the loader delivers them (fp32) and the root unit's cast to the compute dtype.
    pixels = shape.batch_per_gpu * sum(n * 3 * r * r for n, r in crops)
    mem = {
        "params_sharded": local,  # fp32 master weights
        "grads_sharded": local,  # fp32: FSDP2 reduces in fp32 (reduce_dtype) into fp32 shards
        "optimizer_sharded": local,  # LARS: one momentum buffer
        "buffers": _buffer_bytes([trunk, head]),  # BN running statistics, replicated
        # Gathered parameters at the peak (see gathered_peak) and the fp32 reduce-scatter
        # buffer of the largest unit, which FSDP2 keeps until the next reduce-scatter.
        "unsharded_units": gathered[1] + 4 * unit,
        "inputs": 4 * pixels,  # fp32 crops from the loader
        "activations_no_ac": act["none"],
        "activations_stage_ac": act["stage"],
        "activations_block_ac": act["block"],
        "backward_transient": transient,
    }
    # Activations and gathered parameters peak together (gathered[0] is their joint peak, at
    # least act[ac]); the activation line shows the activations alone.
    static = mem["params_sharded"] + mem["grads_sharded"] + mem["optimizer_sharded"] + mem["buffers"]
    dynamic = gathered[0] + transient
    if teacher is not None:
        t_crops = teacher.crops(crops)
        mem["teacher_params_sharded"] = local  # the same fp32 shards, never in the optimizer
        mem["teacher_buffers"] = mem["buffers"]
        # Its forward saves nothing (no_grad) and runs after the student's: what the student
        # kept, the teacher's live tensors at their peak and its two gathered units.
        mem["teacher_forward"] = sum(n * shape.batch_per_gpu * forward_peak(trunk, r, shape.precision)
                                     for n, r in t_crops)
        # The targets (softmax of its logits, fp32) are saved for the student's backward.
        mem["teacher_targets"] = 4 * sum(n for n, _ in t_crops) * shape.batch_per_gpu * teacher.n_outputs
        kept = sum(n * p.kept(shape.ac) for n, p in zip(counts, by_crop))
        static += mem["teacher_params_sharded"] + mem["teacher_buffers"]
        dynamic = max(dynamic + mem["teacher_targets"], kept + mem["teacher_forward"] + 2 * b_act * unit)
    peak = static + dynamic + 4 * unit + mem["inputs"]
    return mem, peak, profiles


def _traffic(shape: RunShape, params: int, local: float, teacher: Teacher | None) -> float:
    """Bytes each GPU sends per step. Within a shard group: all-gather in forward and again in
    backward, reduce-scatter the gradients; across replicas (hybrid): all-reduce of the fp32
    gradient shards. A teacher adds one all-gather (its forward)."""
    shard = shape.shard
    comm = (shard - 1) / shard * params * (2 * shape.b_act + 4)
    replicas = shape.gpus // shard
    comm += 2 * (replicas - 1) / replicas * local
    if teacher is not None:
        comm += (shard - 1) / shard * params * shape.b_act
    return comm


def plan(model: Any, gpus: int, batch_per_gpu: int, crops: str | list[tuple[int, int]] = "seer2021",
         precision: str | None = None, ac: str = "stage", gpu_type: str = "v100",
         mfu: float = 0.25, images: float = 1e9, with_head: bool = True,
         shard_size: int | None = None, blocks_per_unit: int = 1) -> dict[str, Any]:
    """Every number `seer-plan` prints, as one dict.

    `model`: a trunk name, a preset name or a training config (DictConfig); a DINO one
    (train.objective=dino) also counts its teacher. `shard_size`: ranks a parameter is split
    over (default `gpus`: full sharding; a node for hybrid sharding).
    """
    shape = RunShape.checked(gpus, batch_per_gpu, crops, precision, ac, gpu_type, mfu, images,
                             shard_size, blocks_per_unit)
    trunk, head, head_from, cfg = _meta_model(model, with_head)
    teacher = teacher_of(cfg)
    c = _compute(trunk, head, shape, teacher)
    mem, peak, profiles = _memory(trunk, head, shape, teacher)
    peak_flops = GPUS[gpu_type][shape.precision]
    step_s = batch_per_gpu * c["train_flops"] / (peak_flops * mfu)
    global_batch = gpus * batch_per_gpu
    ips = global_batch / step_s
    out = {
        "model": model if isinstance(model, str) else str(model.model.trunk), "gpus": gpus,
        "batch_per_gpu": batch_per_gpu, "global_batch": global_batch,
        "shard_size": shape.shard, "replicas": gpus // shape.shard, "blocks_per_unit": blocks_per_unit,
        "crops": shape.crops, "precision": shape.precision, "ac": ac, "gpu_type": gpu_type, "mfu": mfu,
        "params": c["params"], "trunk_params": c["trunk_params"], "head_params": c["head_params"],
        "head_from": head_from,
        "macs_per_crop": {str(r): v for r, v in c["macs"].items()},
        "trunk_macs_per_crop": {str(r): v for r, v in c["trunk_macs"].items()},
        "head_macs_per_crop": head_macs(head),
        "flops_per_image": c["train_flops"], "fwd_flops_per_image": c["fwd_flops"],
        "memory_per_gpu_bytes": mem, "peak_memory_per_gpu_bytes": peak,
        "memory_per_gpu_gib": peak / GIB, "gpu_memory_gib": GPUS[gpu_type]["mem_gib"],
        "step_time_s": step_s, "images_per_s": ips, "days_for_images": images / ips / 86400,
        "images": images,
        "comm_bytes_per_gpu_per_step": _traffic(shape, c["params"], mem["params_sharded"], teacher),
        "activation_profile": {str(r): asdict(p) for r, p in profiles.items()},
    }
    if teacher is not None:
        out["objective"] = "dino"
        out["teacher"] = {"global_crops": teacher.global_crops, "crops": teacher.crops(shape.crops),
                          "fwd_flops_per_image": c["teacher_fwd_flops"]}
    if (model, gpus, batch_per_gpu, crops, gpu_type) == ("regnety_256gf", 512, 16, "seer2021", "v100"):
        measured = SEER_MS_PER_ITER / 1000
        out["seer_check"] = {"paper_step_s": measured, "planned_step_s": step_s,
                             "implied_mfu": batch_per_gpu * c["train_flops"] / (measured * peak_flops)}
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
