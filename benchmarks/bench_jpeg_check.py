"""What refusing JPEGs with libjpeg corrupt-data warnings costs `seer-shards build` (issue #24).

    python benchmarks/bench_jpeg_check.py [PHOTO_DIR] [--repeats 5]

CPU time per JPEG of PHOTO_DIR (default: the test photos), in this process (one core), the
contenders interleaved; the best of the repeats is kept, the run least disturbed by other load:
- pass-through `--check full`: before, Pillow decoding at 1/8 DCT scale (`draft` + `load`, which
  ignores libjpeg's warnings); now `data_prep.images.jpeg_damage` (simplejpeg, strict, 1/8);
- resize to a short side of 256 (`process_bytes`): now (one strict simplejpeg decode gives the
  verdict and the pixels) and before (Pillow's `draft` decode, no verdict: `jpeg_rgb` bypassed);
- a progressive JPEG (the first photo, 4x upscaled) shrunk >= 8x, where Pillow read only the DC
  scans (seer_pipeline/codecs/jpeg_scans.py) and the verdict needs every scan.
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
    real, real_rgb = images.jpeg_damage, images.jpeg_rgb
    runs: dict[str, list[float]] = {k: [] for k in ("pil_check", "strict_check", "resize", "resize_unchecked")}
    for _ in range(a.repeats):
        runs["pil_check"].append(_per_image(_pil_check, blobs))
        runs["strict_check"].append(_per_image(lambda b: real(b, modes[0]), blobs))
        runs["resize"].append(_per_image(lambda b: images.process_bytes(0, "x", b, opts), blobs))
        images.jpeg_rgb = lambda *args: (None, None)
        try:
            runs["resize_unchecked"].append(_per_image(lambda b: images.process_bytes(0, "x", b, opts), blobs))
        finally:
            images.jpeg_rgb = real_rgb
    # A progressive JPEG shrunk >= 8x: Pillow read only its DC scans (jpeg_scans); the verdict
    # needs every scan decoded.
    src = Image.open(io.BytesIO(blobs[0])).convert("RGB")
    buf = io.BytesIO()
    src.resize((src.width * 4, src.height * 4)).save(buf, "JPEG", quality=90, progressive=True)
    prog, popts = buf.getvalue(), images.ProcessOptions(resize_short_side=min(src.size) // 2)
    runs["prog8"], runs["prog8_unchecked"] = [], []
    for _ in range(a.repeats):
        runs["prog8"].append(_per_image(lambda b: images.process_bytes(0, "x", b, popts), [prog] * 5))
        images.jpeg_rgb = lambda *args: (None, None)
        try:
            runs["prog8_unchecked"].append(_per_image(lambda b: images.process_bytes(0, "x", b, popts), [prog] * 5))
        finally:
            images.jpeg_rgb = real_rgb
    med = {k: min(v) for k, v in runs.items()}  # the least-disturbed run: the box is shared
    mp = statistics.mean(Image.open(io.BytesIO(b)).size[0] * Image.open(io.BytesIO(b)).size[1] for b in blobs) / 1e6
    print(f"{len(blobs)} JPEGs, mean {mp:.2f} MP; CPU ms per image (best of {a.repeats}):")
    print(f"  pass-through check: Pillow 1/8 {med['pil_check']:.2f} -> simplejpeg strict 1/8 {med['strict_check']:.2f}")
    print(f"  resize to 256: Pillow, unchecked {med['resize_unchecked']:.2f} -> strict simplejpeg {med['resize']:.2f} "
          f"(+{100 * (med['resize'] / med['resize_unchecked'] - 1):.0f}%)")
    print(f"  progressive {src.width * 4}x{src.height * 4} to 1/8: Pillow DC scans only {med['prog8_unchecked']:.1f} "
          f"-> strict simplejpeg, every scan {med['prog8']:.1f}")
    print(json.dumps({"n": len(blobs), "mean_mp": mp, **med}))


if __name__ == "__main__":
    main()
