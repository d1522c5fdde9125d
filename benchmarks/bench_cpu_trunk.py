#!/usr/bin/env python3
"""SwAV training-step throughput of the small CPU trunks (Fashion-MNIST sized crops).

One step = forward + backward + SGD step of trunk + head + swav_loss on a batch of B images with
2 x 28 px and 4 x 16 px crops (crops of one size batched together, as the trainer does).
Trunks and memory formats run interleaved in one process, so their ratios survive a noisy
machine; wall-clock and process-CPU-time rates are both printed (CPU time is the per-core
figure when other jobs share the cores).

    .venv/bin/python benchmarks/bench_cpu_trunk.py --threads 2 --batch 64
Reference point (an early single-process trial, docs/demo.md): ~0.26M-parameter stride-2 trunk, ~320 images/s,
2 threads, one process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from seer_pipeline.models import build_trunk  # noqa: E402
from seer_pipeline.models.swav_head import SwAVHead  # noqa: E402
from seer_pipeline.train.swav import swav_loss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trunks", nargs="+", default=["cpu_tiny", "fmnist_small"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b = args.batch
    big, small = torch.randn(2 * b, 3, 28, 28), torch.randn(4 * b, 3, 16, 16)
    setups = {}
    for name in args.trunks:
        trunk = build_trunk(name)
        head = SwAVHead([trunk.out_dim, 256, 64], 300)
        opt = torch.optim.SGD([*trunk.parameters(), *head.parameters()], lr=0.01, momentum=0.9)
        for cl in (False, True):
            setups[(name, cl)] = (trunk, head, opt)

    def step(key: tuple[str, bool]) -> None:
        trunk, head, opt = setups[key]
        fmt = torch.channels_last if key[1] else torch.contiguous_format
        trunk.to(memory_format=fmt)
        feats = torch.cat((trunk(big.contiguous(memory_format=fmt)),
                           trunk(small.contiguous(memory_format=fmt))))
        loss, _ = swav_loss(head(feats)[1], 6, epsilon=0.05, n_iters=3, compute_stats=False)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for key in setups:  # warm-up
        step(key)
    wall: dict[tuple[str, bool], list[float]] = {k: [] for k in setups}
    cpu: dict[tuple[str, bool], list[float]] = {k: [] for k in setups}
    for _ in range(args.rounds):
        for key in setups:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step(key)
            wall[key].append(args.steps * b / (time.perf_counter() - t0))
            cpu[key].append(args.steps * b / (time.process_time() - c0))
    out = {}
    for (name, cl), rates in wall.items():
        label = f"{name}{'/channels_last' if cl else ''}"
        out[label] = {"img_per_s_wall": round(statistics.median(rates), 1),
                      "img_per_cpu_s": round(statistics.median(cpu[(name, cl)]), 1)}
        print(f"{label:28s} {out[label]['img_per_s_wall']:8.1f} img/s wall "
              f"{out[label]['img_per_cpu_s']:8.1f} img/cpu-s")
    print(json.dumps({"threads": args.threads, "batch": b, "results": out}))


if __name__ == "__main__":
    main()
