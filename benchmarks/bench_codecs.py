#!/usr/bin/env python3
"""What each hand-written codec buys end to end: the loader and the shard builder, each timed as
is and with one codec swapped for the library path it replaces (runs interleaved, one core).

    taskset -c 0 .venv/bin/python benchmarks/bench_codecs.py [PHOTO_DIR] [--limit 128] [--runs 3]
        [--only VARIANT,...] [--skip-builder] [--format all|webp|progressive-jpeg]

Loader = `MultiCrop` with swav crops (2x224+6x96) on the photos' bytes; builder = seer-shards'
per-image work (`process_bytes`, resize to a short side of 256). Variants:
- no_webp_ctypes: WebP through PIL instead of libwebp by ctypes (codecs/webp.py);
- no_dc_scans: progressive JPEGs at 1/8 scale decoded whole (codecs/jpeg_scans.py);
- pil_colour: colour jitter and grayscale through PIL's ImageEnhance/convert (data/colour.py);
- pil_blur: PIL's GaussianBlur instead of the numba kernel (data/blur.py);
- numpy_normalise: HWC uint8 -> normalised CHW float with numpy instead of the kernel.
Rates are images per CPU-second (one thread), so other jobs on the machine distort them less.
The last line is JSON: per variant the median images/s and its ratio to `base` (paired runs).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from data_prep import images  # noqa: E402
from seer_pipeline.data import augment  # noqa: E402
from seer_pipeline.config.crops import CROP_PRESETS  # noqa: E402

EXTS = (".jpg", ".jpeg", ".png", ".webp")


def _pil_jitter(a: np.ndarray, order: np.ndarray, fb: float, fc: float, fs: float, shift: int) -> None:
    im = Image.fromarray(a)
    for k in order:
        if k == 0:
            im = ImageEnhance.Brightness(im).enhance(fb)
        elif k == 1:
            im = ImageEnhance.Contrast(im).enhance(fc)
        elif k == 2:
            im = ImageEnhance.Color(im).enhance(fs)
        else:
            h, s, v = im.convert("HSV").split()
            im = Image.merge("HSV", (h.point(lambda x: (x + shift) & 0xFF), s, v)).convert("RGB")
    a[...] = np.asarray(im)


def _pil_gray(a: np.ndarray) -> None:
    a[...] = np.asarray(Image.fromarray(a).convert("L"))[..., None]


def _pil_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    return np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(sigma))).copy()


def _np_normalise(a: np.ndarray, out: np.ndarray, mean: np.ndarray, inv_std: np.ndarray) -> None:
    out[...] = ((a.astype(np.float32) - mean) * inv_std).transpose(2, 0, 1)


VARIANTS: dict[str, list[tuple[object, str, object]]] = {
    "base": [],
    "no_webp_ctypes": [(augment, "decode_webp", lambda *a, **k: None), (augment, "webp_size", lambda d: None),
                       (images, "decode_webp", lambda *a, **k: None)],
    "no_dc_scans": [(augment, "eighth_scale_scans", lambda d: None), (images, "eighth_scale_scans", lambda d: None)],
    "pil_colour": [(augment, "jitter_inplace", _pil_jitter), (augment, "gray_inplace", _pil_gray)],
    "pil_blur": [(augment, "gaussian_blur", _pil_blur)],
    "numpy_normalise": [(augment, "normalise_into", _np_normalise)],
}
BUILDER_VARIANTS = ("base", "no_webp_ctypes", "no_dc_scans")


@contextmanager
def variant(name: str) -> Iterator[None]:
    saved = [(m, a, getattr(m, a)) for m, a, _ in VARIANTS[name]]
    for m, a, f in VARIANTS[name]:
        setattr(m, a, f)
    try:
        yield
    finally:
        for m, a, f in saved:
            setattr(m, a, f)


def _rate(fn: Callable[[int, bytes], object], blobs: list[bytes]) -> float:
    # Images per CPU-second of this (single-threaded) process: on a shared box wall time mostly
    # measures the other jobs, CPU time much less so.
    t0 = time.process_time()
    for i, b in enumerate(blobs):
        fn(i, b)
    return len(blobs) / (time.process_time() - t0)


def compare(fn: Callable[[int, bytes], object], blobs: list[bytes], names: tuple, runs: int) -> dict:
    for n in names:  # warm-up: numba compilation, caches
        with variant(n):
            _rate(fn, blobs[:4])
    rates: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(runs):
        for n in names:
            with variant(n):
                rates[n].append(_rate(fn, blobs))
    return {n: {"per_s": round(statistics.median(r), 2),
                "vs_base": round(statistics.median(b / x for b, x in zip(rates["base"], r)), 3)}
            for n, r in rates.items()}


def _progressive(path: Path) -> bool:
    with Image.open(path) as im:
        return bool(im.info.get("progressive") or im.info.get("progression"))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("photos", nargs="?", default=str(REPO / "tests" / "data" / "photos"))
    ap.add_argument("--limit", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="", help="comma list of variants besides base (default: all)")
    ap.add_argument("--skip-builder", action="store_true")
    ap.add_argument("--format", choices=("all", "webp", "progressive-jpeg"), default="all",
                    help="time only the photos a codec acts on")
    a = ap.parse_args(argv)
    keep = ("base", *[v for v in a.only.split(",") if v]) if a.only else tuple(VARIANTS)
    torch.set_num_threads(1)
    paths = sorted(p for p in Path(a.photos).iterdir() if p.suffix.lower() in EXTS)
    if a.format == "webp":
        paths = [p for p in paths if p.suffix.lower() == ".webp"]
    elif a.format == "progressive-jpeg":
        paths = [p for p in paths if p.suffix.lower() in (".jpg", ".jpeg") and _progressive(p)]
    paths = paths[:: max(1, len(paths) // a.limit)][: a.limit]  # every k-th: keeps the format mix
    blobs = [p.read_bytes() for p in paths]
    mix = {e: sum(p.suffix.lower() == e for p in paths) for e in EXTS}
    mc = augment.MultiCrop(*CROP_PRESETS["swav"])
    # One seed per image: every variant and run draws the same crops, so the same decode scales
    # (a random draw decides how far a 15 MP JPEG is reduced, which swamps the differences here).
    opts = images.ProcessOptions(resize_short_side=256)
    out = {"images": len(blobs), "mix": mix, "loadavg_start": os.getloadavg()[0],
           "loader": compare(lambda i, b: mc(b, np.random.default_rng(i)), blobs, keep, a.runs)}
    if not a.skip_builder:
        out["builder"] = compare(lambda i, b: images.process_bytes(i, "x", b, opts), blobs,
                                 tuple(v for v in BUILDER_VARIANTS if v in keep), a.runs)
    out["loadavg_end"] = os.getloadavg()[0]
    for part in ("loader", "builder"):
        for n, r in out.get(part, {}).items():
            print(f"{part:8s} {n:16s} {r['per_s']:8.2f} img/CPU-s   base is {r['vs_base']:.3f}x this")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
