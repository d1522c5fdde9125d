"""What refusing JPEGs with libjpeg corrupt-data warnings costs `seer-shards build` (issue #24).

    python benchmarks/bench_jpeg_check.py [PHOTO_DIR] [--repeats 5]

Per JPEG of PHOTO_DIR (default: the test photos), in this process, interleaved and the median
kept (one core):
- pass-through `--check full`: before, Pillow decoding at 1/8 DCT scale (`draft` + `load`, which
  ignores libjpeg's warnings); now `data_prep.images.jpeg_damage` (simplejpeg, strict, 1/8);
- resize to a short side of 256 (`process_bytes`), with and without the added `jpeg_damage` pass.
The last line of output is JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

import data_prep.images as images  # noqa: E402


def _pil_check(data: bytes) -> None:
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    img.draft(img.mode, (max(1, w // 8), max(1, h // 8)))
    img.load()


def _per_image(fn, blobs: list[bytes]) -> float:
    t = time.process_time()
    for b in blobs:
        fn(b)
    return (time.process_time() - t) / len(blobs) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("photo_dir", nargs="?", type=Path, default=REPO / "tests" / "data" / "photos")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    blobs = [p.read_bytes() for p in sorted(a.photo_dir.rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg")]
    modes = [Image.open(io.BytesIO(b)).mode for b in blobs]
    opts = images.ProcessOptions(resize_short_side=256)
    real = images.jpeg_damage
    runs: dict[str, list[float]] = {k: [] for k in ("pil_check", "strict_check", "resize", "resize_unchecked")}
    for _ in range(a.repeats):
        runs["pil_check"].append(_per_image(_pil_check, blobs))
        runs["strict_check"].append(_per_image(lambda b: real(b, modes[0]), blobs))
        runs["resize"].append(_per_image(lambda b: images.process_bytes(0, "x", b, opts), blobs))
        images.jpeg_damage = lambda data, mode: None
        try:
            runs["resize_unchecked"].append(_per_image(lambda b: images.process_bytes(0, "x", b, opts), blobs))
        finally:
            images.jpeg_damage = real
    med = {k: statistics.median(v) for k, v in runs.items()}
    mp = statistics.mean(Image.open(io.BytesIO(b)).size[0] * Image.open(io.BytesIO(b)).size[1] for b in blobs) / 1e6
    print(f"{len(blobs)} JPEGs, mean {mp:.2f} MP; CPU ms per image (median of {a.repeats}):")
    print(f"  pass-through check: Pillow 1/8 {med['pil_check']:.2f} -> simplejpeg strict 1/8 {med['strict_check']:.2f}")
    print(f"  resize to 256: {med['resize_unchecked']:.2f} -> {med['resize']:.2f} with the strict check "
          f"(+{100 * (med['resize'] / med['resize_unchecked'] - 1):.0f}%)")
    print(json.dumps({"n": len(blobs), "mean_mp": mp, **med}))


if __name__ == "__main__":
    main()
