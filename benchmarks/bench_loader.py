#!/usr/bin/env python3
"""Loader benchmark: multi-crop speed vs the SwAV reference, and full DataLoader throughput.

1. Times a SwAV reference pipeline and `seer_pipeline.data.augment:multicrop_factory` side by side
   (interleaved in one process) for `swav` and `seer` crops, on the whole photo set and on its
   >= 2 MP subset. The reference is tests/reference_multicrop.py unless --reference names an
   external harness with the same contract (`main(argv)` taking --candidate module:factory, as
   the one the figures in docs/benchmarks.md were measured with). Pin it to one core:
       taskset -c 0 .venv/bin/python benchmarks/bench_loader.py --photos DIR [--reference FILE]
2. Builds shards from the photos (original bytes, any format) and times one epoch of
   `build_loader` with --workers DataLoader workers (samples/s, swav crops).
The last line is JSON: ratios candidate/reference (median over runs of the paired wall-clock
ratio; cpu-time ratios and the ratio of medians beside), the load average before and after, and
the loader throughput. Targets (issue 3): swav >= 3x, seer >= 2x on the mixed set, >= 1.8x on 2 MP.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from reference_multicrop import ReferenceMultiCrop  # noqa: E402
from seer_pipeline.data.augment import pil_flavour, multicrop_factory  # noqa: E402
from seer_pipeline.config.data import DataConfig  # noqa: E402
from seer_pipeline.config.crops import CROP_PRESETS  # noqa: E402
from seer_pipeline.data.loader import build_loader  # noqa: E402
from seer_pipeline.shards.synth import write_shards  # noqa: E402

# What an external harness imports as the candidate (`--candidate module:factory`);
# tests/test_benchmarks_cli.py resolves it, since only a run with --reference would.
CANDIDATE = "seer_pipeline.data.augment:multicrop_factory"

EXTS = (".jpg", ".jpeg", ".png", ".webp")


def load_reference(path: Path):
    spec = importlib.util.spec_from_file_location("bench_reference_loader", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def big_subset(photos: Path, out: Path, min_mp: float) -> int:
    """Symlink the photos of >= min_mp megapixels into `out`; returns how many."""
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for p in sorted(photos.iterdir()):
        if p.suffix.lower() in EXTS:
            with Image.open(p) as im:
                if im.size[0] * im.size[1] >= min_mp * 1e6:
                    os.symlink(p, out / p.name)
                    n += 1
    return n


def _timed(fn, blobs: list) -> tuple:
    c0, t0 = time.process_time(), time.perf_counter()
    for b in blobs:
        fn(b)
    return len(blobs) / (time.perf_counter() - t0), len(blobs) / (time.process_time() - c0)


def in_repo_pair(root: Path, crops: str, limit: int, runs: int) -> dict:
    """tests/reference_multicrop.py vs ours, runs interleaved: {name: per-run rates}."""
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in EXTS)
    random.Random(0).shuffle(paths)
    blobs = [p.read_bytes() for p in (paths[:limit] if limit > 0 else paths)]
    spec = CROP_PRESETS[crops]
    fns = {"ref": ReferenceMultiCrop(*spec, seed=0), "cand": multicrop_factory(*spec)}
    for fn in fns.values():  # warm-up: imports, numba compilation, caches
        _timed(fn, blobs[:8])
    rates = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            rates[k].append(_timed(fn, blobs))
    out = {}
    for k, key in (("ref", f"multicrop-{crops}"), ("cand", f"candidate-{crops}")):
        w, c = [r for r, _ in rates[k]], [r for _, r in rates[k]]
        out[key] = {"median_per_s": round(statistics.median(w), 2), "runs_per_s": w, "cpu_runs_per_s": c}
    return out


def side_by_side(ref, root: Path, crops: str, limit: int, runs: int) -> dict:
    if ref is None:
        out = in_repo_pair(root, crops, limit, runs)
    else:
        out = ref.main([str(root), "--crops", crops, "--limit", str(limit), "--runs", str(runs),
                        "--candidate", CANDIDATE])
    r, c = out[f"multicrop-{crops}"], out[f"candidate-{crops}"]
    # Runs alternate reference, candidate, ...: the ratio within a pair sees the same machine load,
    # so the median of the paired ratios is steadier than a ratio of medians on a shared box.
    paired = [cw / rw for cw, rw in zip(c["runs_per_s"], r["runs_per_s"])]
    cpu_paired = [cc / rc for cc, rc in zip(c["cpu_runs_per_s"], r["cpu_runs_per_s"])]
    return {"ratio": round(statistics.median(paired), 2), "cpu_ratio": round(statistics.median(cpu_paired), 2),
            "ratio_of_medians": round(c["median_per_s"] / r["median_per_s"], 2),
            "paired_ratios": [round(x, 2) for x in paired],
            "reference_per_s": r["median_per_s"], "candidate_per_s": c["median_per_s"]}


def loader_throughput(photos: Path, workers: int, n: int, batch: int, tmp: Path) -> float:
    blobs = [p.read_bytes() for p in sorted(photos.iterdir()) if p.suffix.lower() in EXTS][:n]
    if not blobs:
        raise SystemExit(f"bench_loader: no images in {photos}")
    # The default set (the 12 test photos) cannot fill an epoch of batches: repeat the photos up
    # to `n` images (at least two batches; the first is not timed). Decoding and cropping cost
    # the same for a repeated photo, so the rate stays a per-image figure.
    n = max(n, 2 * batch)
    blobs = (blobs * -(-n // len(blobs)))[:n]
    shards = write_shards(tmp / "shards", blobs, 64)
    cfg = DataConfig(shards=str(shards), batch_size=batch, workers=workers, crops="swav", shuffle_buffer=64)
    ld = build_loader(cfg, 0, 1)
    it = iter(ld)
    next(it)  # worker start-up and first batch are not timed
    t0 = time.perf_counter()
    for _ in range(ld.batches_per_epoch - 1):
        next(it)
    dt = time.perf_counter() - t0
    it.close()
    return (ld.batches_per_epoch - 1) * batch / dt


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default=str(REPO / "tests" / "data" / "photos"),
                    help="folder of images (default: the 12 test photos; the published figures "
                         "used a 303-photo set, docs/benchmarks.md)")
    ap.add_argument("--reference", default=None,
                    help="external reference harness (.py with main(argv) and --candidate); "
                         "default: tests/reference_multicrop.py timed here")
    ap.add_argument("--limit", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--loader-images", type=int, default=256)
    ap.add_argument("--skip-loader", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    ref = load_reference(Path(a.reference)) if a.reference else None
    photos = Path(a.photos)
    result = {"pil": pil_flavour(), "affinity": sorted(os.sched_getaffinity(0)),
              "reference": a.reference or "tests/reference_multicrop.py",
              "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big"
        result["images_2mp"] = big_subset(photos, big, 2.0)
        for crops in ("swav", "seer"):
            result[f"{crops}_mixed"] = side_by_side(ref, photos, crops, a.limit, a.runs)
            if result["images_2mp"]:
                result[f"{crops}_2mp"] = side_by_side(ref, big, crops, a.limit, a.runs)
        if not a.skip_loader:
            result["loader_samples_per_s"] = round(
                loader_throughput(photos, a.workers, a.loader_images, a.batch, Path(tmp)), 1)
            result["loader_workers"] = a.workers
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["ratios"] = {k: result[k]["ratio"] for k in ("swav_mixed", "seer_mixed", "swav_2mp", "seer_2mp")
                        if k in result}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
