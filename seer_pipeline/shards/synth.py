"""Small WebDataset shard sets made from a few photos, for tests and the loader benchmark.

Written through the format module, as `seer-shards` is, but without data_prep's build
machinery, so loader tests do not depend on it.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import List, Sequence

import numpy as np
from PIL import Image

from seer_pipeline.shards import format as fmt

PHOTO_EXTS = (".jpg", ".jpeg", ".png", ".webp")


def photo_variants(photo_dir: str | os.PathLike, n: int, max_side: int = 128, seed: int = 0) -> List[bytes]:
    """n distinct JPEGs: random crops (>= 1/2 side) of the photos, shrunk to <= max_side px."""
    paths = sorted(p for p in Path(photo_dir).iterdir() if p.suffix.lower() in PHOTO_EXTS)
    if not paths:
        raise ValueError(f"no photos in {photo_dir}")
    rng = np.random.default_rng(seed)
    base = [Image.open(p).convert("RGB") for p in paths]
    out = []
    for i in range(n):
        im = base[i % len(base)]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.5, 1)), int(h * rng.uniform(0.5, 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = im.crop((x, y, x + cw, y + ch))
        crop.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def write_shards(out_dir: str | os.PathLike, images: Sequence[bytes], per_shard: int) -> Path:
    """Write `images` as shards of `per_shard` samples plus manifest.json; returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for s, start in enumerate(range(0, len(images), per_shard)):
        name = fmt.shard_name("shard", s)
        chunk = images[start:start + per_shard]
        samples = ((f"{i:08d}", jpg, json.dumps({"uid": i}).encode()) for i, jpg in enumerate(chunk, start=start))
        count, nbytes, sha = fmt.write_shard(str(out / name), samples)
        entries.append({"name": name, "count": count, "bytes": nbytes, "sha256": sha})
    fmt.write_manifest(str(out), {"shards": entries, "written": len(images)})
    return out
