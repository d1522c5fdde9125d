"""GPU check (run on a CUDA machine; never needed by CI): the NCCL path of the trainer.

Checks, per model: NCCL process group with async error handling, FSDP2 with bf16 parameters and
fp32 BatchNorm units (asserted from inside the forward), SyncBatchNorm conversion, activation
checkpointing by stage, a finite SwAV loss, LARS steps, a DCP save (timed: it must fit SLURM's
signal lead). Then img/s and model-FLOPs utilisation of regnety_32gf and regnety_128gf at 16
images per GPU with SEER crops (2x224 + 4x96, the 2021 recipe).

    python benchmarks/gpu_check.py                  # one GPU, standalone
    torchrun --nproc_per_node=8 benchmarks/gpu_check.py
Last stdout line: JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from seer_pipeline.plan.gpus import GPUS, gpu_key  # noqa: E402


def peak_flops(name: str) -> float | None:
    key = gpu_key(name)
    return GPUS[key]["bf16"] if key else None


def check_model(preset: str, batch: int, steps: int, warmup: int, ac: str, compile_: bool,
                rank: int, world: int, device: torch.device, save: bool) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from bench_trainer import bare_step  # the same bare step the CPU benchmark times
    from seer_pipeline.models import count_macs
    from seer_pipeline.train.optim import LARS
    from seer_pipeline.dist.parallelize import ParallelPlan, build_mesh, parallelize
    from seer_pipeline.config.train import load_train_config
    from seer_pipeline.models.swav import build_model

    cfg = load_train_config(preset, [f"data.batch_size={batch}", "data.crops=seer2021",
                                     f"parallel.ac={ac}", f"parallel.compile={str(compile_).lower()}",
                                     "parallel.fsdp=full", "train.precision=bf16"])
    torch.manual_seed(0)
    with torch.device("meta"):
        probe = build_model(cfg)
    sizes = [(224, 2), (96, 4)]
    macs_img = sum(n * count_macs(probe.trunk, r) for r, n in sizes)
    head_macs = sum(p.numel() for p in probe.head.parameters() if p.ndim == 2) * sum(n for _, n in sizes)
    n_params = sum(p.numel() for p in probe.parameters())
    del probe
    model = build_model(cfg)
    plan = ParallelPlan.from_config(cfg.parallel, "bf16")
    mesh = build_mesh(plan, "cuda", world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    model = parallelize(model, plan, mesh, device, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    n_sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    seen: dict[str, set] = {"bn": set(), "conv": set()}

    def hook(kind):
        return lambda m, inp: seen[kind].add(str(m.weight.dtype))

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(hook("bn"))
        elif isinstance(m, torch.nn.Conv2d):
            m.register_forward_pre_hook(hook("conv"))
    opt = LARS(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-5, trust=0.001)
    g = torch.Generator(device=device).manual_seed(rank)
    views = [torch.randn(batch, 3, r, r, device=device, generator=g) for r, n in sizes for _ in range(n)]
    torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i in range(warmup + steps):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss = bare_step(model, opt, views, cfg)
        torch.cuda.synchronize(device)
        losses.append(float(loss))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    flops_step = 3 * 2 * (macs_img + head_macs) * batch  # fwd + bwd (2x fwd) per GPU
    peak = peak_flops(torch.cuda.get_device_name(device))
    out = {
        "preset": preset, "trunk": cfg.model.trunk, "params_M": n_params / 1e6, "batch_per_gpu": batch,
        "crops": "2x224+4x96", "ac": ac, "compile": compile_, "gpus": world,
        "step_s": step_s, "img_s_per_gpu": batch / step_s, "img_s_total": batch * world / step_s,
        "model_tflops_per_gpu": flops_step / step_s / 1e12,
        "mfu": (flops_step / step_s / peak) if peak else None,
        "max_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30,
        "bn_param_dtypes_in_forward": sorted(seen["bn"]), "conv_param_dtypes_in_forward": sorted(seen["conv"]),
        "syncbn_modules": n_sync, "losses_finite": all(map(lambda x: x == x and abs(x) < 1e9, losses)),
        "first_loss": losses[0], "last_loss": losses[-1],
    }
    assert out["bn_param_dtypes_in_forward"] == ["torch.float32"], out
    assert out["conv_param_dtypes_in_forward"] == ["torch.bfloat16"], out
    assert out["losses_finite"], losses
    if save:
        with tempfile.TemporaryDirectory() as tmp:
            msd, osd = get_state_dict(model, opt)
            obj = [tmp]
            dist.broadcast_object_list(obj, src=0)
            dist.barrier()
            t0 = time.perf_counter()
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=obj[0] + "/ck")
            dist.barrier()
            out["dcp_save_s"] = time.perf_counter() - t0
    del model, opt
    torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="seer_32gf,seer_128gf")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ac", default="stage", choices=["none", "stage", "block"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: this script is for GPU machines"}))
        return 1
    if "RANK" not in os.environ:  # standalone: one process, one GPU
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1")
        from seer_pipeline.dist.setup import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    from seer_pipeline.dist.setup import init_distributed, resolve_env

    denv = resolve_env()
    if denv.world_size == 1:  # init_distributed skips world 1; the check wants NCCL anyway
        import datetime

        torch.cuda.set_device(0)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{denv.master_port}", rank=0,
                                world_size=1, timeout=datetime.timedelta(seconds=600),
                                device_id=torch.device("cuda", 0))
        device = torch.device("cuda", 0)
    else:
        device = init_distributed(denv, 600, "nccl")
    t = torch.ones(1, device=device)
    dist.all_reduce(t)
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "cuda": torch.version.cuda, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
              "backend": dist.get_backend(), "all_reduce_ok": float(t) == denv.world_size,
              "nccl_async_error_handling": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"),
              "models": []}
    for i, preset in enumerate(p for p in args.presets.split(",") if p):
        try:
            r = check_model(preset, args.batch, args.steps, args.warmup, args.ac, args.compile,
                            denv.rank, denv.world_size, device, save=not args.no_save and i == 0)
        except Exception as e:  # noqa: BLE001 - report and go on with the next model
            r = {"preset": preset, "error": f"{type(e).__name__}: {e}"}
        result["models"].append(r)
        if denv.rank == 0:
            print(json.dumps(r), flush=True)
    dist.destroy_process_group()
    if denv.rank == 0:
        print(json.dumps(result))
    return 0 if all("error" not in m for m in result["models"]) else 1


if __name__ == "__main__":
    sys.exit(main())
