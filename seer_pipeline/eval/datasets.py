"""Labelled evaluation data from a spec string: fashion-mnist[:DIR], imagefolder:PATH, wds:PATTERN.

Everything is loaded into memory as uint8 arrays [N, H, W, C] (C = 1 or 3): evaluation sets
here are small, and a frozen trunk then sees exactly the same pixels for every probe.
Images that cannot be decoded are skipped, counted and reported, never silently dropped.
"""
from __future__ import annotations

import glob
import hashlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seer_pipeline.shards.reader import braceexpand

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class DataSpecError(ValueError):
    """A --data spec that cannot be parsed or points at nothing usable."""


@dataclass
class LabelledData:
    """Both splits of a labelled set: the images (`load_data`: uint8 [N, H, W, C] in memory) or
    a frozen trunk's features of them (`feature_stream.extract_features`: float32 [N, D] memmaps).
    One type for both, so a probe or `subset` takes either."""
    name: str
    train_x: np.ndarray  # uint8 [N, H, W, C] images, or float32 [N, D] features
    train_y: np.ndarray  # int64 [N]
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, n_train: int | None, n_test: int | None, seed: int = 0) -> "LabelledData":
        """A class-stratified-by-chance random subset (seeded), for smoke runs."""
        rng = np.random.default_rng(seed)

        def pick(x: np.ndarray, y: np.ndarray, n: int | None) -> tuple[np.ndarray, np.ndarray]:
            if n is None or n >= len(x):
                return x, y
            idx = np.sort(rng.permutation(len(x))[:n])
            return x[idx], y[idx]

        trx, try_ = pick(self.train_x, self.train_y, n_train)
        tex, tey = pick(self.test_x, self.test_y, n_test)
        return LabelledData(self.name, trx, try_, tex, tey, self.classes, dict(self.skipped))


def _is_test(key: str, test_fraction: float) -> bool:
    # A hash of the name, not of the order: the split survives added/removed files.
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return (h / 2**64) < test_fraction


def wds_split_key(shard: str, key: str) -> str:
    """What a shard sample's split hashes: the shard's file name and the key, never its folder,
    so the split survives moving the set (another mount, a copy to S3); the name is kept because
    keys may repeat across shards."""
    return f"{shard.rsplit('/', 1)[-1]}/{key}"


def _to_array(img: "object", size: int | None) -> np.ndarray:
    # PIL only for the data kinds that decode images: seer-eval's start-up time
    from PIL import Image

    assert isinstance(img, Image.Image)
    img = img.convert("RGB")
    if size is not None:
        # Shorter side to `size`, then a centre crop: the usual evaluation transform.
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def _stack(arrs: list[np.ndarray], what: str) -> np.ndarray:
    if not arrs:
        raise DataSpecError(f"{what}: no images")
    shapes = {a.shape for a in arrs}
    if len(shapes) > 1:
        raise DataSpecError(f"{what}: images differ in size {sorted(shapes)[:3]}...; pass --size N")
    return np.stack(arrs)


def _split(items: list[tuple[str, np.ndarray, int]], test_fraction: float, name: str,
           classes: list[str], skipped: dict[str, int]) -> LabelledData:
    tr = [(x, y) for k, x, y in items if not _is_test(k, test_fraction)]
    te = [(x, y) for k, x, y in items if _is_test(k, test_fraction)]
    if not tr or not te:
        raise DataSpecError(f"{name}: the split left an empty side ({len(tr)} train, {len(te)} test)")
    return LabelledData(
        name, _stack([x for x, _ in tr], name), np.array([y for _, y in tr], dtype=np.int64),
        _stack([x for x, _ in te], name), np.array([y for _, y in te], dtype=np.int64),
        classes, skipped,
    )


def load_fashion_mnist(root: str | None) -> LabelledData:
    # fashion-mnist's loader only when asked for: seer-eval's start-up time
    from seer_pipeline.eval import fmnist
    trx, try_ = fmnist.load_split("train", root)
    tex, tey = fmnist.load_split("test", root)
    return LabelledData("fashion-mnist", trx[..., None], try_, tex[..., None], tey, list(fmnist.CLASSES))


def _read_folder(folder: Path, classes: list[str], size: int | None, skipped: dict[str, int],
                 prefix: str) -> list[tuple[str, np.ndarray, int]]:
    # PIL only for image folders: seer-eval's start-up time
    from PIL import Image

    items = []
    for ci, c in enumerate(classes):
        for p in sorted((folder / c).rglob("*")):
            if p.suffix.lower() not in IMAGE_EXTS or not p.is_file():
                continue
            try:
                with Image.open(p) as im:
                    items.append((f"{prefix}{c}/{p.relative_to(folder / c)}", _to_array(im, size), ci))
            except Exception as e:  # noqa: BLE001 - any undecodable file is counted and skipped
                skipped["undecodable"] = skipped.get("undecodable", 0) + 1
                log.warning("skipping %s: %s", p, e)
    return items


def load_imagefolder(path: str, size: int | None, test_fraction: float) -> LabelledData:
    """PATH/<class>/*.jpg split by a hash of the file name, or PATH/{train,test|val}/<class>/."""
    root = Path(path)
    if not root.is_dir():
        raise DataSpecError(f"imagefolder: {root} is not a folder")
    skipped: dict[str, int] = {}
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
        tr = _read_folder(root / "train", classes, size, skipped, "train/")
        te = _read_folder(test_dir, classes, size, skipped, "test/")
        if not tr or not te:
            raise DataSpecError(f"imagefolder: {root}: no images in train/ or {test_dir.name}/")
        return LabelledData(
            f"imagefolder:{root}", _stack([x for _, x, _ in tr], str(root)),
            np.array([y for *_, y in tr], dtype=np.int64), _stack([x for _, x, _ in te], str(root)),
            np.array([y for *_, y in te], dtype=np.int64), classes, skipped,
        )
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise DataSpecError(f"imagefolder: {root} needs one sub-folder per class (found {classes})")
    items = _read_folder(root, classes, size, skipped, "")
    return _split(items, test_fraction, f"imagefolder:{root}", classes, skipped)


def wds_shards(pattern: str) -> list[str]:
    """The shards a wds: pattern names. A glob lists what exists; a brace pattern or a name
    lists what must exist, so a missing one is an error (an evaluation on part of the set would
    otherwise look complete). A FIFO or device stays in: the reader refuses it
    (shards/format.open_shard) and it is counted as a damaged shard, not dropped unseen."""
    globbed = any(c in pattern for c in "*?[")
    shards = sorted(glob.glob(pattern)) if globbed else braceexpand(pattern)
    if not shards:
        raise DataSpecError(f"wds: no shard matches {pattern}")
    missing = [s for s in shards if not Path(s).exists()]
    if missing:
        raise DataSpecError(f"wds: {len(missing)} of the {len(shards)} shards {pattern} names do not "
                            f"exist, first: {missing[0]}")
    folders = [s for s in shards if Path(s).is_dir()]
    if folders:
        raise DataSpecError(f"wds: {pattern} names {len(folders)} folder(s), not shards, first: "
                            f"{folders[0]}")
    return shards


def load_wds(pattern: str, size: int | None, test_fraction: float) -> LabelledData:
    """Shards (glob or brace pattern) whose samples carry an image and a `cls` integer label."""
    # webdataset (~0.3 s to import) only for wds: data
    import webdataset as wds
    from PIL import Image

    urls = wds_shards(pattern)
    skipped: dict[str, int] = {}
    raw: list[tuple[str, np.ndarray, int]] = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        key = sample.get("__key__", "")
        img_key = next((k for k in WDS_IMAGE_KEYS if k in sample), None)
        if img_key is None or "cls" not in sample:
            skipped["no image or cls"] = skipped.get("no image or cls", 0) + 1
            continue
        try:
            label = int(sample["cls"].decode().strip())
            with Image.open(io.BytesIO(sample[img_key])) as im:
                raw.append((wds_split_key(sample.get("__url__", ""), key), _to_array(im, size), label))
        except Exception as e:  # noqa: BLE001
            skipped["undecodable"] = skipped.get("undecodable", 0) + 1
            log.warning("skipping %s: %s", key, e)
    if not raw:
        raise DataSpecError(f"wds: no labelled images in {pattern} (skipped: {skipped})")
    labels = sorted({y for *_, y in raw})
    remap = {y: i for i, y in enumerate(labels)}
    items = [(k, x, remap[y]) for k, x, y in raw]
    return _split(items, test_fraction, f"wds:{pattern}", [str(y) for y in labels], skipped)


def load_data(spec: str, size: int | None = None, test_fraction: float = 0.2) -> LabelledData:
    """Parse a --data spec and load it."""
    kind, _, arg = spec.partition(":")
    if kind == "fashion-mnist":
        data = load_fashion_mnist(arg or None)
    elif kind == "imagefolder" and arg:
        data = load_imagefolder(arg, size, test_fraction)
    elif kind == "wds" and arg:
        data = load_wds(arg, size, test_fraction)
    else:
        raise DataSpecError(
            f"bad --data {spec!r}; expected fashion-mnist[:DIR], imagefolder:PATH or wds:PATTERN")
    if data.skipped:
        log.warning("%s: skipped %s", data.name, data.skipped)
    log.info("%s: %d train / %d test images, %d classes, %s pixels", data.name, len(data.train_x),
             len(data.test_x), data.num_classes, "x".join(map(str, data.train_x.shape[1:])))
    return data
