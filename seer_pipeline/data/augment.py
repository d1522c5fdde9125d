"""SwAV multi-crop augmentation: decode once, then N random-resized, colour-distorted crops.

Per crop it draws the same distribution as swav's MultiCropDataset (RandomResizedCrop with ratio
3/4-4/3, flip p=0.5, colour jitter (0.8, 0.8, 0.8, 0.2) with p=0.8 in random order, grayscale
p=0.2, Gaussian blur p=0.5 with radius U(0.1, 2), normalise), made faster while every crop still
comes from at least as many source pixels as the reference's:
- crop boxes are drawn from the header size before decoding, so a JPEG can be decoded at a reduced
  DCT scale (simplejpeg's libjpeg-turbo, else `Image.draft`) exactly as far as every crop's source
  region stays >= its output size; simplejpeg also decodes full-size JPEGs faster than PIL; at
  1/8 a progressive JPEG is decoded from its DC scans only, with the same pixels
  (codecs/jpeg_scans.py);
- crop + resize is one `resize(box=...)` with a reducing gap (box pre-reduction over all source
  pixels, then bilinear), instead of copying the crop and resizing at full resolution;
- colour jitter and grayscale run as numba-compiled loops over the uint8 crop with PIL's own
  arithmetic (colour.py), as does uint8 HWC -> normalised float CHW (one pass into one buffer
  per crop size), and so does PIL's Gaussian blur (blur.py); WebP decodes straight to RGB through
  libwebp (seer_pipeline/codecs/webp.py).
Randomness comes only from the `numpy.random.Generator` passed in (per sample), never global RNG.
"""
from __future__ import annotations

import io
import logging
import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import PIL
import torch
from PIL import Image

from seer_pipeline.data.blur import gaussian_blur
from seer_pipeline.data.blur import warm_up as warm_up_blur
from seer_pipeline.data.colour import gray_inplace, jitter_inplace, normalise_into, warm_up
from seer_pipeline.codecs.jpeg_scans import eighth_scale_scans
from seer_pipeline.codecs.webp import decode_webp, webp_size

try:  # libjpeg-turbo with DCT scaling; ~15-30% faster than PIL's JPEG decode at full size (measured)
    import simplejpeg
except ImportError:  # pragma: no cover - declared dependency; PIL's draft() is the fallback
    simplejpeg = None

log = logging.getLogger(__name__)

MEAN = (0.485, 0.456, 0.406)
STD = (0.228, 0.224, 0.225)  # swav repo uses 0.228 for R (VISSL 0.229)
RATIO = (3 / 4, 4 / 3)
# Pre-reduce with a box filter until the remaining bilinear factor is < 1.5: measured 2.2x faster
# on a 1080 px region -> 224 with Pillow 13, and every source pixel still contributes.
REDUCING_GAP = 1.5


def pil_flavour() -> str:
    """'pillow-simd X' or 'pillow X' (pillow-simd versions carry a '.postN' suffix)."""
    v = PIL.__version__
    return f"pillow-simd {v}" if "post" in v else f"pillow {v}"


def sample_crop_box(width: int, height: int, scale: Tuple[float, float],
                    rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """(left, top, w, h) drawn like torchvision's RandomResizedCrop.get_params."""
    area = width * height
    lo, hi = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(lo, hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height  # fallback: centred crop with the aspect clamped into RATIO
    if in_ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif in_ratio > RATIO[1]:
        w, h = int(round(height * RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def draft_factor(boxes: Sequence[Tuple[int, int, int, int]], sizes: Sequence[int]) -> int:
    """Largest JPEG DCT scale (1, 2, 4, 8) keeping each crop's source >= min(output, own) size."""
    for f in (8, 4, 2):
        if all(w // f >= min(s, w) and h // f >= min(s, h) for (_, _, w, h), s in zip(boxes, sizes)):
            return f
    return 1


def _decode_jpeg(data: bytes, boxes: Sequence[Tuple[int, int, int, int]], sizes: Sequence[int],
                 width: int, height: int) -> Optional[Image.Image]:
    """RGB image at the largest DCT reduction `draft_factor` allows, or None (let PIL try)."""
    if simplejpeg is None:
        return None
    f = draft_factor(boxes, sizes)
    if f == 8:  # a progressive JPEG needs only its DC scans at 1/8 (same pixels: jpeg_scans.py)
        data = eighth_scale_scans(data) or data
    try:  # only 1/2^k scales: libjpeg-turbo's 3/8..7/8 scales measured slower than full size
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=math.ceil(width / f),
                                     min_height=math.ceil(height / f))
    except ValueError:  # CMYK, odd subsampling, recoverable corruption: PIL decides
        return None
    return Image.fromarray(arr, "RGB")


def _probe(data: bytes) -> Optional[Tuple[str, int, int]]:
    """(format, width, height) of a JPEG or still WebP from its header, without PIL (whose open
    costs 70 us for a JPEG and 120 us for a WebP: 1.3% of a sample); None: let PIL open it."""
    if data[:3] == b"\xff\xd8\xff" and simplejpeg is not None:
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            return None
        return "JPEG", width, height
    size = webp_size(data)
    return ("WEBP", *size) if size else None


def _jitter(crop: np.ndarray, rng: np.random.Generator, b: float = 0.8, c: float = 0.8,
            s: float = 0.8, hue: float = 0.2) -> None:
    """Brightness/contrast/saturation/hue jitter in a random order, in place on [H,W,3] uint8."""
    order = rng.permutation(4)
    fb = rng.uniform(max(0.0, 1 - b), 1 + b)
    fc = rng.uniform(max(0.0, 1 - c), 1 + c)
    fs = rng.uniform(max(0.0, 1 - s), 1 + s)
    fh = rng.uniform(-hue, hue)
    # The reference's hue arithmetic: a fraction of a turn, truncated toward 0, wrapped mod 256.
    jitter_inplace(crop, order, fb, fc, fs, int(fh * 255) & 0xFF)


class MultiCrop:
    """Callable `(encoded_bytes, rng) -> list[Tensor]`, one float32 [3,S,S] tensor per crop."""

    def __init__(self, size_crops: Sequence[int], nmb_crops: Sequence[int],
                 min_scale_crops: Sequence[float], max_scale_crops: Sequence[float],
                 jitter_p: float = 0.8, gray_p: float = 0.2, blur_p: float = 0.5,
                 blur_radius: Tuple[float, float] = (0.1, 2.0),
                 jitter: Tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)) -> None:
        lens = {len(size_crops), len(nmb_crops), len(min_scale_crops), len(max_scale_crops)}
        if len(lens) != 1 or not size_crops:
            raise ValueError("size_crops, nmb_crops, min/max_scale_crops must be non-empty and of equal length")
        self.plan: List[Tuple[int, Tuple[float, float]]] = []
        for size, n, lo, hi in zip(size_crops, nmb_crops, min_scale_crops, max_scale_crops):
            if not (0 < lo <= hi <= 1) or size <= 0 or n < 0:
                raise ValueError(f"bad crop spec size={size} n={n} scale=({lo}, {hi})")
            self.plan += [(int(size), (float(lo), float(hi)))] * int(n)
        for name, p in (("jitter_p", jitter_p), ("gray_p", gray_p), ("blur_p", blur_p)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if not 0 < blur_radius[0] <= blur_radius[1]:
            raise ValueError(f"blur_radius must be 0 < min <= max, got {blur_radius}")
        if min(jitter) < 0 or jitter[3] > 0.5:
            raise ValueError(f"jitter strengths must be >= 0 and hue <= 0.5, got {jitter}")
        self.jitter_p, self.gray_p, self.blur_p, self.blur_radius = jitter_p, gray_p, blur_p, blur_radius
        self.jitter = jitter
        self.mean = np.array(MEAN, dtype=np.float32) * 255
        self.inv_std = (1.0 / (np.array(STD, dtype=np.float64) * 255)).astype(np.float32)
        warm_up()
        warm_up_blur()

    def __call__(self, data: bytes, rng: Optional[np.random.Generator] = None) -> List[torch.Tensor]:
        rng = rng if rng is not None else np.random.default_rng()
        probe = _probe(data)
        pil = None if probe else Image.open(io.BytesIO(data))
        fmt, width, height = probe or (pil.format, *pil.size)
        sizes = [s for s, _ in self.plan]
        boxes = [sample_crop_box(width, height, sc, rng) for _, sc in self.plan]
        img = self._decode(pil, data, boxes, sizes, fmt, width, height)
        fx, fy = img.size[0] / width, img.size[1] / height
        crops = []
        for (size, _), (left, top, w, h) in zip(self.plan, boxes):
            box = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
            crops.append(self._distort(img.resize((size, size), Image.Resampling.BILINEAR, box=box,
                                                  reducing_gap=REDUCING_GAP), rng))
        return self._to_tensors(crops)

    @staticmethod
    def _decode(img: Optional[Image.Image], data: bytes, boxes: Sequence[Tuple[int, int, int, int]],
                sizes: Sequence[int], fmt: str = "", width: int = 0, height: int = 0) -> Image.Image:
        """RGB image of `data`; `img` is PIL's opened file, or None when `_probe` read the header."""
        if img is not None:
            fmt, (width, height) = img.format, img.size
        if fmt == "JPEG":
            fast = _decode_jpeg(data, boxes, sizes, width, height)
            if fast is not None:
                return fast
        elif fmt == "WEBP":
            fast = decode_webp(data)
            if fast is not None:
                return fast
        if img is None:  # the fast decoder declined: PIL decodes, or raises for a broken file
            img = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            f = draft_factor(boxes, sizes)
            if f > 1:
                img.draft("RGB", (math.ceil(width / f), math.ceil(height / f)))
        if img.mode == "RGB":
            img.load()  # convert("RGB") of an RGB image is a full copy: 2 ms at 2 MP
            return img
        return img.convert("RGB")

    def _distort(self, crop: Image.Image, rng: np.random.Generator) -> np.ndarray:
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.array(crop)  # a writable copy for the in-place colour kernels
        if rng.random() < self.jitter_p:
            _jitter(arr, rng, *self.jitter)
        if rng.random() < self.gray_p:
            gray_inplace(arr)
        if rng.random() < self.blur_p:
            arr = gaussian_blur(arr, rng.uniform(*self.blur_radius))  # PIL's GaussianBlur, exactly
        return arr

    def _to_tensors(self, crops: List[np.ndarray]) -> List[torch.Tensor]:
        # One float buffer per group of equal-size consecutive crops, filled by a compiled loop.
        out: List[torch.Tensor] = []
        i = 0
        while i < len(crops):
            j = i
            while j < len(crops) and crops[j].shape == crops[i].shape:
                j += 1
            h, w = crops[i].shape[:2]
            x = torch.empty((j - i, 3, h, w), dtype=torch.float32)
            xn = x.numpy()
            for k in range(i, j):
                normalise_into(crops[k], xn[k - i], self.mean, self.inv_std)
            out.extend(x.unbind(0))
            i = j
        return out


def multicrop_factory(size_crops: Sequence[int], nmb_crops: Sequence[int],
                      min_scale: Sequence[float], max_scale: Sequence[float]) -> Callable[[bytes], List[torch.Tensor]]:
    """`fn(encoded_bytes) -> list[Tensor]` for the reference benchmark (fresh entropy per call)."""
    mc = MultiCrop(size_crops, nmb_crops, min_scale, max_scale)
    rng = np.random.default_rng()
    log.info("multicrop uses %s", pil_flavour())
    return lambda data: mc(data, rng)
