"""What the per-tensor checks on imported weights cost (issue #24): shape check against the
trunk built on the meta device, and the NaN/inf scan, for one preset's random weights.

    python benchmarks/bench_weights_check.py regnety_1.6gf
"""
from __future__ import annotations

import argparse
import time

import torch

from seer_pipeline.models import build_trunk
from seer_pipeline.models.regnet import get_config
from seer_pipeline.weights.check import check_finite, check_shapes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trunk", nargs="?", default="regnety_1.6gf")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sd = build_trunk(args.trunk).state_dict()
    cfg = get_config(args.trunk)
    mb = sum(v.numel() * v.element_size() for v in sd.values()) / 1e6
    for name, fn in (("shapes", lambda: check_shapes(sd, cfg, "bench")),
                     ("finite", lambda: check_finite(sd, "bench"))):
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        print(f"{args.trunk}: {name} check {best:.3f} s for {len(sd)} tensors, {mb:.0f} MB "
              f"({best / mb * 1e3:.2f} s/GB)")


if __name__ == "__main__":
    main()
