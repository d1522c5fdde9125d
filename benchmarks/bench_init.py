"""Peak host RSS of building + parallelizing + initialising a preset's model for ONE rank of its
real world size (seer_10b: 496 ranks), against that rank's shard of parameters.

Each measurement runs in a fresh process on PyTorch's fake process group (no peers needed; the
model is real, only collectives are answered locally; nothing is communicated while building):

- `after` (the trainer today): build on the meta device, `parallelize` (FSDP2), then
  `models.materialize` writes this rank's rows only;
- `before` (the trainer until issue 20): the whole fp32 model built on the host, then sharded.
  seer_10b's `before` needs the whole model in RAM (37.9 GB), more than this machine has: run it
  on a smaller preset.

Peak = ru_maxrss at the end minus the RSS just before building (an upper bound: it also counts
any import-time peak above the baseline), after the same pipeline ran once on a tiny trunk. `--check` fails unless peak <= 1.5x the rank's shard.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_init.py [--preset seer_10b] [--world 496]
        [--mode after|before|both] [--check] [--out F.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LIMIT = 1.5  # issue 20: at most 1.5x the rank's shard of parameters
MB = 2**20


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def measure(preset: str, world: int, mode: str, overrides: list[str], rank: int = 0) -> dict[str, Any]:
    """In this process (call it in a fresh one): build + parallelize + init for `rank` of `world`."""
    import resource
    import time

    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from seer_pipeline.config.train import load_train_config
    from seer_pipeline.distributed.parallelize import ParallelPlan, build_mesh, parallelize
    from seer_pipeline.models.materialize import local_bytes, materialize
    from seer_pipeline.models.swav_head import build_model

    cfg = load_train_config(preset, overrides)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    plan = ParallelPlan.from_config(cfg.parallel, cfg.train.precision)
    mesh = build_mesh(plan, "cpu", world, int(cfg.slurm.tasks_per_node))
    device = torch.device("cpu")
    # Warm-up on a tiny trunk: code loaded on first use (module classes, dispatch tables, FSDP2)
    # is a constant of the process, not a cost of the model, so it stays out of the figure.
    tiny = load_train_config(preset, [*overrides, "model.trunk=regnety_tiny"])
    with torch.device("meta"):
        warm = parallelize(build_model(tiny), plan, mesh, device)
    materialize(warm, device, 0)
    del warm
    base = _rss_kib()
    t0 = time.perf_counter()
    if mode == "after":
        with torch.device("meta"):
            model = build_model(cfg)
        model = parallelize(model, plan, mesh, device)
        materialize(model, device, int(cfg.run.seed))
    else:
        torch.manual_seed(int(cfg.run.seed))
        model = parallelize(build_model(cfg), plan, mesh, device)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    held = local_bytes(model)
    n_params = sum(p.numel() for p in model.parameters())
    dist.destroy_process_group()
    shard = held["param_shards"]
    return {"preset": preset, "overrides": overrides, "fsdp": plan.fsdp,
            "mesh": list(mesh.shape) if mesh is not None else [], "world": world, "rank": rank, "mode": mode, "params": n_params,
            "full_model_mib": n_params * 4 / MB, "shard_mib": shard / MB,
            "buffers_mib": held["buffers"] / MB, "peak_rss_delta_mib": peak / 1024,
            "peak_over_shard": peak * 1024 / shard if shard else float("nan"), "seconds": secs,
            "torch": torch.__version__}


def run_one(preset: str, world: int, mode: str, overrides: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", preset, str(world), mode,
           *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode:
        raise RuntimeError(f"{preset} {mode}: exited {out.returncode}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="seer_10b")
    ap.add_argument("--world", type=int, default=0, help="default: the preset's nodes x nproc")
    ap.add_argument("--mode", choices=("after", "before", "both"), default="after")
    ap.add_argument("--check", action="store_true", help=f"fail unless after <= {LIMIT}x the shard")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. parallel.fsdp=full (shard over all ranks)")
    ap.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(measure(a.one[0], int(a.one[1]), a.one[2], a.one[3:])))
        return 0
    world = a.world
    if not world:
        from seer_pipeline.config.train import load_train_config

        cfg = load_train_config(a.preset, a.set)
        world = int(cfg.slurm.nodes) * int(cfg.slurm.tasks_per_node)
    rows = [run_one(a.preset, world, m, a.set) for m in (("before", "after") if a.mode == "both" else (a.mode,))]
    for r in rows:
        print(f"{r['preset']} {r['fsdp']} mesh {r['mesh']} rank {r['rank']}/{r['world']} {r['mode']:>6}: peak RSS +{r['peak_rss_delta_mib']:.0f} MiB"
              f" for a {r['shard_mib']:.0f} MiB shard ({r['peak_over_shard']:.2f}x; whole model "
              f"{r['full_model_mib']:.0f} MiB), {r['seconds']:.1f} s")
    if a.out:
        a.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad = [r for r in rows if r["mode"] == "after" and not r["peak_over_shard"] <= LIMIT]
    if a.check and bad:
        print(f"FAIL: init peak above {LIMIT}x the shard", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
