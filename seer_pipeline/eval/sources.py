"""Streaming labelled sources for evaluation: fashion-mnist[:DIR], imagefolder:PATH, wds:PATTERN.

Each source is a torch Dataset of (pixels, label, split) samples that a DataLoader with workers
reads; pixels are decoded and resized in the workers one image at a time, so a million-image set
never sits in RAM. `split` is 0 (train) or 1 (test): one pass over the data yields both sides.
Undecodable or unlabelled samples come out as a skip with its reason, counted by the collate.

Eval transform: shorter side to `resize`, then a `crop` x `crop` centre crop. For image files the
default is resize 256 / crop 224, the test transform of VISSL's linear benchmarks (`Resize 256`,
`CenterCrop 224` in configs/config/benchmark/linear_image_classification/imagenet1k/
eval_resnet_8gpu_transfer_in1k_linear.yaml) that the SEER paper's evaluations use.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from seer_pipeline.eval import fmnist
from seer_pipeline.eval.datasets import (
    IMAGE_EXTS,
    WDS_IMAGE_KEYS,
    DataSpecError,
    _is_test,
    wds_shards,
    wds_split_key,
)
from seer_pipeline.shards.reader import ShardReadError, iter_samples

log = logging.getLogger(__name__)

VISSL_RESIZE, VISSL_CROP = 256, 224
Sample = tuple[np.ndarray, int, int]  # (uint8 [H, W, C], label, split) ; or ("skip", reason)


@dataclass(frozen=True)
class EvalTransform:
    resize: int | None = None  # shorter side; None: keep
    crop: int | None = None  # centre crop side; None: keep

    @property
    def active(self) -> bool:
        return self.resize is not None or self.crop is not None

    def __call__(self, img: Any) -> np.ndarray:
        if self.resize is not None:
            w, h = img.size
            s = self.resize / min(w, h)
            img = img.resize((max(self.resize, round(w * s)), max(self.resize, round(h * s))),
                             Image.BILINEAR)
        if self.crop is not None:
            w, h = img.size
            if min(w, h) < self.crop:  # smaller than the crop: scale up rather than pad
                s = self.crop / min(w, h)
                img = img.resize((max(self.crop, round(w * s)), max(self.crop, round(h * s))),
                                 Image.BILINEAR)
                w, h = img.size
            left, top = (w - self.crop) // 2, (h - self.crop) // 2
            img = img.crop((left, top, left + self.crop, top + self.crop))
        return np.asarray(img, dtype=np.uint8)

    @classmethod
    def for_spec(cls, spec: str, size: int | None, resize: int | None) -> "EvalTransform":
        """--size (crop) / --resize, with VISSL's 256/224 for image files and native for FMNIST."""
        if spec.startswith("fashion-mnist"):
            return cls(resize if resize is not None else size, size)
        crop = size if size is not None else VISSL_CROP
        return cls(resize if resize is not None else round(crop * VISSL_RESIZE / VISSL_CROP), crop)


def _decode(data: bytes | Path, tf: EvalTransform) -> np.ndarray:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        return tf(im.convert("RGB"))


class ArraySamples(Dataset):
    """In-memory uint8 images (Fashion-MNIST's 47 MB): index -> sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, splits: np.ndarray, tf: EvalTransform):
        self.images, self.labels, self.splits, self.tf = images, labels, splits, tf

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Sample:
        img = self.images[i]
        if self.tf.active:
            img = self.tf(Image.fromarray(img))
        return (img[..., None] if img.ndim == 2 else img), int(self.labels[i]), int(self.splits[i])


class FileSamples(Dataset):
    """Image files with known labels and splits: index -> decoded, transformed sample."""

    def __init__(self, files: list[Path], labels: np.ndarray, splits: np.ndarray, tf: EvalTransform):
        self.files, self.labels, self.splits, self.tf = files, labels, splits, tf

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Sample | tuple[str, str]:
        try:
            return _decode(self.files[i], self.tf), int(self.labels[i]), int(self.splits[i])
        except Exception as e:  # noqa: BLE001 - any undecodable file is counted and skipped
            log.warning("skipping %s: %s", self.files[i], e)
            return ("skip", "undecodable")


class ShardSamples(IterableDataset):
    """WebDataset tar shards, each worker reading its own shards; labels from the `cls` member."""

    def __init__(self, shards: list[str], test_fraction: float, tf: EvalTransform,
                 only_split: int | None = None):
        self.shards, self.test_fraction, self.tf, self.only_split = shards, test_fraction, tf, only_split

    def __iter__(self) -> Iterator[Sample | tuple[str, str]]:
        info = get_worker_info()
        mine = self.shards[info.id::info.num_workers] if info else self.shards
        for path in mine:
            try:
                for _, s in iter_samples(path, lambda i: True):
                    assert s is not None
                    key = wds_split_key(path, s["__key__"].decode())
                    split = int(_is_test(key, self.test_fraction))
                    if self.only_split is not None and split != self.only_split:
                        continue
                    img = next((s[k] for k in WDS_IMAGE_KEYS if k in s), None)
                    if img is None or "cls" not in s:
                        yield ("skip", "no image or cls")
                        continue
                    try:
                        label = int(s["cls"].decode().strip())
                        yield _decode(img, self.tf), label, split
                    except Exception as e:  # noqa: BLE001
                        log.warning("skipping %s in %s: %s", s["__key__"].decode(), path, e)
                        yield ("skip", "undecodable")
            except ShardReadError as e:  # what was readable is kept; the rest is counted
                log.warning("%s", e)
                yield ("skip", "damaged shard")


@dataclass
class Source:
    name: str
    dataset: Dataset
    classes: list[str] | None  # None: integer labels, classes found while reading (wds)
    splits: np.ndarray | None  # per-index split for indexable sources; None for streams

    def indexable(self) -> bool:
        return self.splits is not None


def _folder_items(folder: Path, classes: list[str]) -> tuple[list[Path], list[int], list[str]]:
    files, labels, keys = [], [], []
    for ci, c in enumerate(classes):
        for p in sorted((folder / c).rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
                files.append(p)
                labels.append(ci)
                keys.append(f"{c}/{p.relative_to(folder / c)}")
    return files, labels, keys


def open_source(spec: str, tf: EvalTransform, test_fraction: float = 0.2) -> Source:
    """Parse a --data spec into a streaming source (nothing decoded yet)."""
    kind, _, arg = spec.partition(":")
    if kind == "fashion-mnist":
        trx, try_ = fmnist.load_split("train", arg or None)
        tex, tey = fmnist.load_split("test", arg or None)
        splits = np.r_[np.zeros(len(try_), np.int64), np.ones(len(tey), np.int64)]
        ds = ArraySamples(np.concatenate([trx, tex]), np.r_[try_, tey], splits, tf)
        return Source("fashion-mnist", ds, list(fmnist.CLASSES), splits)
    if kind == "imagefolder" and arg:
        root = Path(arg)
        if not root.is_dir():
            raise DataSpecError(f"imagefolder: {root} is not a folder")
        test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
        if (root / "train").is_dir() and test_dir is not None:
            classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
            f1, l1, _ = _folder_items(root / "train", classes)
            f2, l2, _ = _folder_items(test_dir, classes)
            files, labels, splits = f1 + f2, l1 + l2, [0] * len(f1) + [1] * len(f2)
        else:
            classes = sorted(d.name for d in root.iterdir() if d.is_dir())
            if len(classes) < 2:
                raise DataSpecError(f"imagefolder: {root} needs one sub-folder per class (found {classes})")
            files, labels, keys = _folder_items(root, classes)
            splits = [int(_is_test(k, test_fraction)) for k in keys]
        sp = np.asarray(splits, np.int64)
        if not (sp == 0).any() or not (sp == 1).any():
            raise DataSpecError(f"imagefolder: {root}: the split left an empty side "
                                f"({int((sp == 0).sum())} train, {int((sp == 1).sum())} test)")
        return Source(f"imagefolder:{root}", FileSamples(files, np.asarray(labels), sp, tf), classes, sp)
    if kind == "wds" and arg:
        return Source(f"wds:{arg}", ShardSamples(wds_shards(arg), test_fraction, tf), None, None)
    raise DataSpecError(f"bad --data {spec!r}; expected fashion-mnist[:DIR], imagefolder:PATH or wds:PATTERN")


def collate(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, int]]:
    """(uint8 [B, H, W, C], labels [B], splits [B], {skip reason: count})."""
    skipped: dict[str, int] = {}
    good = []
    for item in batch:
        if isinstance(item[0], str):
            skipped[item[1]] = skipped.get(item[1], 0) + 1
        else:
            good.append(item)
    if not good:
        return torch.zeros(0, 1, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), \
            torch.zeros(0, dtype=torch.long), skipped
    shapes = {g[0].shape for g in good}
    if len(shapes) > 1:
        raise DataSpecError(f"images differ in size {sorted(shapes)[:3]}...; pass --size N")
    x = torch.from_numpy(np.stack([g[0] for g in good]))
    return x, torch.tensor([g[1] for g in good]), torch.tensor([g[2] for g in good]), skipped
