"""`seer-plan --simulate`: one real training step of a preset at its real world size, on fake tensors.

Nothing is allocated and nothing is sent: parameters and activations are `FakeTensor`s (shapes,
dtypes and devices only) and the process group is PyTorch's "fake" backend, which answers every
collective at any world size from one process. What runs is the product's own code: the
preset's model (`models.build.build_for`), `parallelize()` with the preset's mesh (full or
hybrid), FSDP units, AC and dtype policy, the multi-crop forward, the objective the trainer builds
(`train.objective.build_objective`; SwAV's loss with its Sinkhorn all-reduces), backward,
the trainer's flag all-reduce, `LARS.step` with its norm all-reduces, and the checkpoint state dict
(`average_bn_stats` + `get_state_dict`). `FSDPMemTracker` (the tool torchtitan's memory estimator
uses) counts the bytes alive per category at the peak.

Two concessions to fake tensors, both outside the code under test: LARS reads each norm as a
Python float (`float(norm)`), which a fake tensor cannot give, so every scalar read returns 1.0
(the trust ratio's value does not change any allocation); and the trainer's logging statistics
(`compute_stats`, a data-dependent `bincount`) are off, as on all but every `log_every`-th step.
The model lives on CPU fake tensors with the config's dtype policy (parallelize applies it on every device), so
SyncBN (CUDA only) is plain BN here: the same parameters and saved tensors.

For a DINO preset (train.objective=dino) that is `DINOObjective`: the teacher is built and
sharded like the student (without gradients), sees the global crops under `no_grad`, and follows
the student by EMA after the optimizer step; the tracker counts both models (`_PairTracker`).
"""
from __future__ import annotations

import dataclasses
import resource
import time
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode

from seer_pipeline.config.train import schedule_len, sections
from seer_pipeline.distributed.parallelize import ParallelPlan, build_mesh, parallelize
from seer_pipeline.models.build import build_for
from seer_pipeline.models.materialize import local_bytes
from seer_pipeline.plan.analytic import GIB, plan_config, preset_crops, preset_world
from seer_pipeline.train.objective import build_objective
from seer_pipeline.train.optim import LARS, build_param_groups
from seer_pipeline.train.trainer import average_bn_stats

#: The step simulated: the first one after the prototypes (DINO: the last layer) are unfrozen
#: (the steady state; before it their gradients are dropped and LARS skips them).
STEADY_STATE = {"swav": "swav.freeze_prototypes_iters", "dino": "dino.freeze_last_layer_iters"}


class _PairTracker(FSDPMemTracker):
    """FSDPMemTracker over the student and the teacher: it instruments the FSDP units it finds
    under its root (`_root_mod`, read only there), so the root is a container of the two (each
    stays its own FSDP root for FSDP itself)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, optimizer: Any) -> None:
        super().__init__(student, optimizer)
        self._root_mod = nn.ModuleList([student, teacher])


class _ScalarReads(TorchDispatchMode):
    """Answers `tensor.item()` / `float(tensor)` on fake tensors with 1.0 (see module doc)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1.0
        return func(*args, **(kwargs or {}))


def _fake_group(world: int) -> None:
    if dist.is_initialized():
        raise RuntimeError("seer-plan --simulate needs a process without a process group")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


def _category_bytes(snapshot: dict[Any, dict[Any, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for dev_snap in snapshot.values():
        for k, v in dev_snap.items():
            name = str(getattr(k, "value", k))
            out[name] = out.get(name, 0) + int(v)
    return out


def _train_step(cfg: Any, model: Any, objective: Any, optimizer: Any, device: torch.device,
                teacher: Any) -> None:
    """The trainer's `train_step` with the loader replaced by fake crops (trainer.py order)."""
    step = int(OmegaConf.select(cfg, STEADY_STATE[str(cfg.train.objective)]))
    b = int(cfg.data.batch_size)
    views = [torch.randn(b, 3, r, r, device=device) for n, r in preset_crops(cfg) for _ in range(n)]
    loss, _, _ = objective.forward(model, views, step, False)
    loss.backward()
    with _ScalarReads():  # only where the trainer reads values: dispatch through it costs time
        packed = torch.tensor([float(loss.detach()), 0.0, 0.0], dtype=torch.float64, device=device)
        dist.all_reduce(packed)
        objective.before_optimizer_step(step)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    objective.after_optimizer_step(step)
    for m in (model, teacher) if teacher is not None else (model,):
        average_bn_stats(m)
    get_state_dict(model, optimizer)


def simulate(cfg: Any, world: int | None = None, local_world: int | None = None,
             gpu_type: str = "h100", name: str | None = None) -> dict[str, Any]:
    """Run one fake training step of `cfg` at `world` ranks; the tracker's peak next to the plan."""


    t0 = time.perf_counter()
    world, node = preset_world(cfg, world, local_world)
    if cfg.parallel.fsdp == "none":
        raise ValueError("--simulate needs FSDP (parallel.fsdp=full|hybrid): FSDPMemTracker tracks FSDP modules")
    analytic = plan_config(cfg, world, node, gpu_type)
    plan = dataclasses.replace(ParallelPlan.from_config(cfg.parallel, cfg.train.precision),
                               compile=False)
    device = torch.device("cpu")
    _fake_group(world)
    try:
        mesh = build_mesh(plan, device.type, world, node)  # outside the fake mode (it must be)
        with FakeTensorMode(allow_non_fake_inputs=True):
            torch.manual_seed(int(cfg.run.seed))
            if cfg.train.objective == "dino":
                # As the trainer does: built on meta, sharded, then this rank's rows made (fake
                # here; DINO's trunc_normal_ init reads values, which fake tensors have none of).
                with torch.device("meta"):
                    inner, teacher = build_for(cfg), build_for(cfg).requires_grad_(False)
                model = parallelize(inner, plan, mesh, device, node).to_empty(device=device)
                teacher = parallelize(teacher, plan, mesh, device, node).to_empty(device=device)
            else:
                inner, teacher = build_for(cfg), None
                model = parallelize(inner, plan, mesh, device, node)
            optimizer = LARS(build_param_groups(inner, cfg.optim.lars_exclude_bn_bias), lr=0.1,
                             momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
                             trust=cfg.optim.lars_trust)
            units = sum(1 for m in model.modules() if type(m).__name__.startswith("FSDP"))
            # What the trainer's meta build + per-rank materialization holds for this rank.
            init = local_bytes(model)
            if teacher is not None:  # the teacher is built the same way, next to the student
                t_init = local_bytes(teacher)
                init.update(param_shards=init["param_shards"] + t_init["param_shards"],
                            buffers=init["buffers"] + t_init["buffers"])
            # The trainer's own typed sections and builder: the same objective it runs.
            objective = build_objective(sections(cfg), model, teacher, nullcontext(),
                                        total_steps=schedule_len(cfg), rank=0, world=world,
                                        device=device)
            tracker = (FSDPMemTracker(model, optimizer) if teacher is None
                       else _PairTracker(model, teacher, optimizer))
            with tracker:
                _train_step(cfg, model, objective, optimizer, device, teacher)
            peak = _category_bytes(tracker.get_tracker_snapshot("peak"))
    finally:
        dist.destroy_process_group()
    total = peak.pop("Total", sum(peak.values()))
    planned = analytic["memory_per_gpu_gib"]
    simulated = total / GIB
    return {
        "preset": name or str(cfg.run.dir).rsplit("/", 1)[-1], "trunk": str(cfg.model.trunk),
        "world_size": world, "local_world_size": node, "mesh": analytic["mesh"],
        "shard_size": analytic["shard_size"], "fsdp_units": units,
        "batch_per_gpu": int(cfg.data.batch_size), "crops": analytic["crops"],
        "precision": str(cfg.train.precision), "ac": str(cfg.parallel.ac),
        "blocks_per_unit": int(cfg.parallel.blocks_per_unit), "params": analytic["params"],
        "memory_per_gpu_gib": planned, "simulated_peak_gib": simulated,
        "planned_over_simulated": planned / simulated if simulated else float("nan"),
        "simulated_gib": {k: v / GIB for k, v in peak.items()},
        "planned_gib": {k: v / GIB for k, v in analytic["memory_per_gpu_bytes"].items()},
        "init_gib": {k: v / GIB for k, v in init.items()},
        "init_peak_gib": sum(init.values()) / GIB,
        "init_whole_model_gib": 4 * analytic["params"] / GIB,  # what every rank built until issue 20
        "wall_s": time.perf_counter() - t0,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
