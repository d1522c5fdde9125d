"""Host (CPU) memory a training job needs per node: what `slurm.mem_gb` must cover.

`slurm.mem_gb=0` leaves the request to the site's default (`DefMemPerCPU`/`DefMemPerNode`),
often a few GB per CPU, and the kernel's OOM killer ends a rank with no Python traceback. This
module states the need from the planner's numbers (seer_pipeline.plan.analytic), per rank:

    runtime + max(init, steady)
    init   = the fp32 model built on the host before it is sharded and moved to the device
             (Trainer builds the whole model in every rank: 4 bytes x parameters)
    steady = async checkpoint staging (a CPU copy of the rank's parameter and LARS shards and
             the BN buffers, and a DINO teacher's shards and buffers, when ckpt.async) + the loader (per worker: an allowance for its
             process, plus prefetched fp32 batches in the worker and their copy in the rank)

The two phases do not overlap: the host copy of the model is freed once `parallelize` moved it
to the device, before the first save. The allowances are stated, not measured (no GPU here):
RUNTIME_GIB covers the torch, CUDA, cuDNN and NCCL libraries and the CUDA context of one
process; WORKER_GIB one DataLoader worker (decoder, crops, a shuffle buffer of encoded JPEGs).
A node asks for tasks_per_node ranks times that, plus MARGIN.
"""
from __future__ import annotations

import math
from typing import Any

from seer_pipeline.plan.analytic import GIB, plan_config

RUNTIME_GIB = 4.0  # per rank process: libraries + CUDA context (allowance)
WORKER_GIB = 1.0  # per DataLoader worker process (allowance)
MARGIN = 1.10  # on top of the sum: allocator fragmentation, page cache the job is charged for


def host_memory(cfg: Any, plan: dict[str, Any] | None = None) -> dict[str, float]:
    """Bytes per rank by item, the per-rank need, and `node_gb` (whole GB, with MARGIN) for
    `tasks_per_node` ranks. `plan`: a `plan_config(cfg)` already made (it takes seconds)."""
    p = plan if plan is not None else plan_config(cfg)
    mem = p["memory_per_gpu_bytes"]
    workers = int(cfg.data.workers)
    init = 4.0 * p["params"]
    # A DINO run also saves its teacher (the same shards and buffers once more; 0 for SwAV).
    saved = (mem["params_sharded"] + mem["optimizer_sharded"] + mem["buffers"]
             + mem.get("teacher_params_sharded", 0) + mem.get("teacher_buffers", 0))
    staging = saved if bool(cfg.ckpt["async"]) else 0.0
    batches = mem["inputs"] * int(cfg.data.prefetch_factor) * max(workers, 1)
    loader = workers * WORKER_GIB * GIB + 2 * batches  # in the workers, and received by the rank
    runtime = RUNTIME_GIB * GIB
    per_rank = runtime + max(init, staging + loader)
    node = int(cfg.slurm.tasks_per_node) * per_rank * MARGIN
    return {"runtime": runtime, "init_model": init, "async_staging": staging, "loader": loader,
            "per_rank": per_rank, "node_gb": float(math.ceil(node / 1e9))}


def describe(cfg: Any, need: dict[str, float]) -> str:
    """One line for seer-plan / docs: the node request and where it comes from."""
    g = {k: v / GIB for k, v in need.items() if k != "node_gb"}
    return (f"host memory: {need['node_gb']:.0f} GB per node ({int(cfg.slurm.tasks_per_node)} ranks x "
            f"{g['per_rank']:.1f} GiB: runtime {g['runtime']:.1f} + max(model build "
            f"{g['init_model']:.1f}, async staging {g['async_staging']:.1f} + loader "
            f"{g['loader']:.1f}), +{(MARGIN - 1) * 100:.0f}%)")
