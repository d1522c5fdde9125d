#!/usr/bin/env python3
"""How long a loader resume at another world size spends planning, at dump scale.

A resume at a different world size replays every old worker's shuffle buffer to find what it
consumed (`seer_pipeline.data.order.remainder`); every new rank does this once. This times it on a
synthetic manifest (shards of 10,000 images) for an old run of --world ranks x --workers loader
workers stopped half way through the epoch, and prints the seconds and the extrapolation to
1B images (the work is linear in the images of the epoch). No data is read.

    python benchmarks/bench_resume_plan.py [--images 20e6] [--world 32] [--workers 4]

Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from seer_pipeline.data.order import epoch_runs, remainder, runs_len, shuffle_order  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=float, default=20e6)
    ap.add_argument("--world", type=int, default=32)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--buffer", type=int, default=1000)
    a = ap.parse_args(argv)
    shuffle_order(2, 1, 0, 0, 0, 0)  # compile / load the kernel outside the timing
    plan = epoch_runs([10_000] * max(1, int(a.images) // 10_000), 0, 0)
    total = runs_len(plan)
    per_rank = total // (a.world * a.batch)
    half = (per_rank // 2 // a.workers) * a.batch  # outputs consumed per old worker
    outputs = [[half] * a.workers for _ in range(a.world)]
    t = time.perf_counter()
    rest = remainder(plan, a.world, a.workers, a.batch, a.buffer, 0, 0, outputs)
    secs = time.perf_counter() - t
    out = {"images": total, "old_world": a.world, "old_workers": a.workers, "batch": a.batch,
           "buffer": a.buffer, "remainder_s": round(secs, 3), "left": runs_len(rest), "runs": len(rest),
           "extrapolated_s_per_1e9_images": round(secs * 1e9 / total, 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
