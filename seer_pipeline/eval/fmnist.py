"""Fashion-MNIST: read the idx .gz files and export the train images as a raw dump of PNGs.

The demo treats Fashion-MNIST train as an *unlabelled* dump of image files, the same kind of
input `seer-shards build` gets from a web crawl; the labels are used only by `seer-eval`.
"""
from __future__ import annotations

import gzip
import logging
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FILES = {
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class FashionMNISTMissing(FileNotFoundError):
    """The idx files are not where we looked; the message says how to get them."""


def missing_message(root: Path, missing: list[str]) -> str:
    return (
        f"Fashion-MNIST not found in {root} (missing: {', '.join(missing)}).\n"
        f"  On Debian/Ubuntu: sudo apt-get install {DEBIAN_PACKAGE}   "
        f"(installs to {DEFAULT_DIR})\n"
        f"  Otherwise download the four files {', '.join(FILES.values())}\n"
        f"  from https://github.com/zalandoresearch/fashion-mnist (data/fashion/) into a folder\n"
        f"  and pass it as fashion-mnist:DIR (seer-eval) or --fmnist-dir DIR / "
        f"SEER_FMNIST_DIR=DIR (demo)."
    )


def check_dir(root: str | os.PathLike | None = None) -> Path:
    """Return the folder holding all four idx files or raise FashionMNISTMissing."""
    root = Path(root) if root else DEFAULT_DIR
    missing = [f for f in FILES.values() if not (root / f).is_file()]
    if missing:
        raise FashionMNISTMissing(missing_message(root, missing))
    return root


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one (optionally gzipped) idx file: uint8 data, big-endian int32 dims."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an idx header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not a uint8 idx file (magic {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} bytes")
    return body.reshape(dims).copy()  # writable: torch.from_numpy warns on read-only buffers


def load_split(split: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images [N,28,28] uint8, labels [N] int64) of split 'train' or 'test'."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = check_dir(root)
    images = read_idx(root / FILES[(split, "images")])
    labels = read_idx(root / FILES[(split, "labels")]).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels


def write_png(path: Path, img: np.ndarray) -> None:
    """One greyscale image as a PNG, atomically (a killed export leaves no half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(img, mode="L").save(tmp, format="PNG")
    os.replace(tmp, path)


def export_pngs(
    out_dir: str | os.PathLike, root: str | os.PathLike | None = None, limit: int | None = None,
    split: str = "train", workers: int = 2, progress: bool = True,
) -> int:
    """Dump `split` images as OUT/NNNNN/IIIIIIII.png (no labels: a raw dump). Returns the count.

    Idempotent: files already present are kept, so a rerun after a kill only finishes the job.
    """
    images, _ = load_split(split, root)
    if limit is not None:
        images = images[:limit]
    out = Path(out_dir)
    # 1000 files per folder keeps directory listings cheap, as crawl dumps usually are.
    todo: list[tuple[Path, np.ndarray]] = []
    for i, img in enumerate(images):
        p = out / f"{i // 1000:05d}" / f"{i:08d}.png"
        if not p.exists():
            todo.append((p, img))
    for d in {p.parent for p, _ in todo}:
        d.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max(1, workers)) as pool, tqdm(
        total=len(images), initial=len(images) - len(todo), desc="export png",
        unit="img", disable=not progress,
    ) as bar:
        for _ in pool.map(lambda t: write_png(*t), todo, chunksize=256):
            bar.update(1)
    log.info("exported %d %s images to %s (%d new)", len(images), split, out, len(todo))
    return len(images)
