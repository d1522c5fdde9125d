#!/usr/bin/env python3
"""seer-eval at scale: feature-extraction images/s on CPU and peak memory of the streaming path.

    python benchmarks/bench_eval.py [--tp-seconds 20] [--rss 10000,100000] [--shards DIR]

1. Throughput at 224 px for `cpu_tiny` and `regnety_1.6gf` (random weights, 2 threads):
   the trunk alone on a ready batch, and end to end (synthetic labelled JPEG shards -> DataLoader
   workers -> decode, resize 256, centre crop 224 -> trunk -> memmapped features).
2. Peak memory of `extract_features` + the SGD linear head + chunked k-NN over N images of
   224 px (default 10k and 100k): the PSS of the whole process tree (parent + DataLoader workers)
   sampled every 0.2 s, and the parent's ru_maxrss (peak RSS). Run it in a fresh process per N
   (`--rss 10000`, then `--rss 100000 --trunks ''`): ru_maxrss is a lifetime peak. So that 100k images finish on a 2-core machine, this step uses a stand-in trunk
   (8x8 average pooling: 192 dimensions, cpu_tiny's width); a real trunk adds its weights and
   one batch of activations, which section 1 measures (`forward_peak_mb`).
Figures are noisy on a shared machine; the load average is printed beside them. Last line: JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from seer_pipeline.eval import features  # noqa: E402
from seer_pipeline.eval.knn import knn_topk  # noqa: E402
from seer_pipeline.eval.linear_sgd import SGDConfig, train_sgd_linear  # noqa: E402
from seer_pipeline.eval.sources import EvalTransform, open_source  # noqa: E402
from seer_pipeline.eval.feature_stream import extract_features, to_input  # noqa: E402


def make_shards(out: Path, n: int, per_shard: int = 5000, side: int = 256, distinct: int = 500) -> str:
    """`n` labelled samples (10 classes) as JPEG tar shards; `distinct` images are encoded and reused."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    done = out / f"done-{n}"
    pattern = str(out / f"n{n}-*.tar")
    if done.exists():
        return pattern
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side]
    jpgs = []
    for i in range(distinct):  # smooth colour gradients: realistic JPEG sizes (~5-10 KB)
        a, b, c = rng.uniform(0.5, 3, 3)
        img = np.stack([(np.sin(xx / side * a * 6 + i) + 1) * 127, (np.cos(yy / side * b * 6) + 1) * 127,
                        ((xx + yy) / (2 * side) * 255 * c) % 255], -1).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=85)
        jpgs.append(buf.getvalue())
    for s, start in enumerate(range(0, n, per_shard)):
        with tarfile.open(out / f"n{n}-{s:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(start, min(n, start + per_shard)):
                for ext, data in (("jpg", jpgs[i % distinct]), ("cls", str(i % 10).encode())):
                    ti = tarfile.TarInfo(f"{i:08d}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
    done.touch()
    return pattern


def tree_pss_mb(pid: int) -> float:
    """Proportional set size of a process and all its descendants (MB): pages shared between the
    parent and its forked DataLoader workers are split between them, not counted once each."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            pass
    return total / 1024


class PeakSampler(threading.Thread):
    """Samples the tree's PSS every 0.2 s; every 30 s prints it with the feature rows written so
    far, so a run cut short still shows how memory behaved as the images went by."""

    def __init__(self, watch: Path | None = None, row_bytes: int = 4 * 192) -> None:
        super().__init__(daemon=True)
        self.peak, self.stop, self.watch, self.row_bytes = 0.0, threading.Event(), watch, row_bytes

    def rows(self) -> int:
        if self.watch is None:
            return 0
        return sum(p.stat().st_size for p in self.watch.glob("*.f32*") if p.is_file()) // self.row_bytes

    def run(self) -> None:
        t0 = last = time.monotonic()
        while not self.stop.is_set():
            now = tree_pss_mb(os.getpid())
            self.peak = max(self.peak, now)
            if time.monotonic() - last > 30:
                last = time.monotonic()
                print(f"  {last - t0:.0f} s: {self.rows()} images, PSS {now:.0f} MB, peak {self.peak:.0f} MB, "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
            time.sleep(0.2)


class PoolTrunk(torch.nn.Module):
    """Stand-in trunk for the memory run: 8x8 average pooling of the input (192 dims)."""

    def forward_features(self, x: torch.Tensor, stage: int = -1) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)


def throughput(name: str, pattern: str, seconds: float, workers: int) -> dict:
    trunk = features.build_random(name).eval().to(memory_format=torch.channels_last)
    bs = 32
    x = torch.randint(0, 255, (bs, 224, 224, 3), dtype=torch.uint8)
    res: dict = {}
    with torch.inference_mode():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        trunk.forward_features(to_input(x, "cpu"))  # warm-up
        res["forward_peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before, 1)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            trunk.forward_features(to_input(x, "cpu"))
            n += bs
        res["trunk_img_s"] = round(n / (time.perf_counter() - t0), 2)
    # End to end over as many images as the trunk alone did in `seconds` (at least one batch each side).
    m = max(2 * bs, n)
    src = open_source(f"wds:{pattern}", EvalTransform(256, 224), test_fraction=0.5)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fs = extract_features(trunk, src, Path(tmp), batch_size=bs, workers=workers,
                              limits=(m // 2, m // 2), progress=False)
        res["end_to_end_img_s"] = round((len(fs.train_y) + len(fs.test_y)) / (time.perf_counter() - t0), 2)
    return res


def memory(pattern: str, n: int, workers: int) -> dict:
    src = open_source(f"wds:{pattern}", EvalTransform(256, 224), test_fraction=0.1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        sampler = PeakSampler(Path(tmp))
        sampler.start()
        fs = extract_features(PoolTrunk(), src, Path(tmp), batch_size=256, workers=workers, progress=False)
        t1 = time.perf_counter()
        ytr, yte = torch.from_numpy(fs.train_y), torch.from_numpy(fs.test_y)
        sgd = train_sgd_linear(fs.train_x, ytr, fs.test_x, yte, 10, SGDConfig(epochs=2))
        knn = knn_topk(fs.train_x, ytr, fs.test_x, yte, 10, train_chunk=16384)
        n_img = len(ytr) + len(yte)
    sampler.stop.set()
    sampler.join()
    return {"images": n_img, "extract_s": round(t1 - t0, 1), "img_s": round(n_img / (t1 - t0), 1),
            "probes_s": round(time.perf_counter() - t1, 1), "peak_tree_pss_mb": round(sampler.peak, 1),
            "parent_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "sgd_top1": round(sgd.top1, 2), "knn_top1": round(knn[0], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default=str(Path(tempfile.gettempdir()) / "seer_bench_eval"))
    ap.add_argument("--tp-seconds", type=float, default=20.0)
    ap.add_argument("--trunks", default="cpu_tiny,regnety_1.6gf")
    ap.add_argument("--rss", default="10000,100000", help="image counts for the memory runs ('' skips)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out: dict = {"load_before": [round(x, 2) for x in os.getloadavg()], "threads": a.threads,
                 "workers": a.workers, "throughput_224px": {}, "memory_224px": {}}
    small = make_shards(Path(a.shards), 2000)
    for name in [t for t in a.trunks.split(",") if t]:
        out["throughput_224px"][name] = r = throughput(name, small, a.tp_seconds, a.workers)
        print(name, r, flush=True)
    for n in [int(v) for v in a.rss.split(",") if v]:
        out["memory_224px"][str(n)] = r = memory(make_shards(Path(a.shards), n), n, a.workers)
        print(n, r, flush=True)
    out["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
