"""SwAV's published multi-crop augmentation, written plainly with PIL: the yardstick for our loader.

What it follows (numbers and semantics, not code):
- Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
  Assignments" (SwAV), §3.2 and App. A: 2 crops of 224 at scale [0.14, 1] plus 6 of 96 at
  [0.05, 0.14]; each crop gets horizontal flip, colour distortion and Gaussian blur as in SimCLR.
- Chen et al. 2020, "A Simple Framework for Contrastive Learning" (SimCLR), App. A: colour jitter
  of strength s=1 -> brightness, contrast, saturation 0.8 and hue 0.2, applied with p=0.8 in a
  random order; grayscale with p=0.2.
- The public SwAV configuration (facebookresearch/swav, main_swav.py flags in
  scripts/swav_800ep_pretrain.sh, src/multicropdataset.py): blur with p=0.5 and a radius drawn
  uniformly in [0.1, 2.0]; normalisation mean (0.485, 0.456, 0.406), std (0.228, 0.224, 0.225).
- torchvision's documented transform semantics that SwAV's config relies on: RandomResizedCrop
  (area fraction uniform in `scale`, log aspect uniform in log(3/4)..log(4/3), 10 tries then a
  centre crop with the aspect clamped), bilinear resize; adjust_hue shifts PIL's 8-bit HSV hue
  by int(factor * 255) modulo 256; Grayscale keeps 3 channels (L copied three times).

One `random.Random` drives every draw, so a seed reproduces a run without touching global RNGs.
Slow on purpose: every step is a separate PIL call.
"""
from __future__ import annotations

import io
import math
import random
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

MEAN = (0.485, 0.456, 0.406)  # SwAV src/multicropdataset.py
STD = (0.228, 0.224, 0.225)  # ditto; 0.228 for red, where ImageNet's usual value is 0.229
SWAV = ([224, 96], [2, 6], [0.14, 0.05], [1.0, 0.14])  # SwAV §3.2
JITTER = (0.8, 0.8, 0.8, 0.2)  # SimCLR App. A, strength 1
RATIO = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop default, kept by SwAV

Box = Tuple[int, int, int, int]


def sample_crop_box(width: int, height: int, scale: Sequence[float], rng: random.Random,
                    ratio: Sequence[float] = RATIO) -> Box:
    """(left, top, w, h): area fraction and log aspect uniform; 10 tries, then a centre crop."""
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        area = width * height * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(lo, hi))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def shift_hue(img: Image.Image, factor: float) -> Image.Image:
    """Rotate the hue by `factor` of a turn in PIL's 8-bit HSV (wraps modulo 256)."""
    h, s, v = img.convert("HSV").split()
    step = int(factor * 255) & 0xFF  # truncation toward zero, then two's-complement wrap
    return Image.merge("HSV", (h.point(lambda x: (x + step) & 0xFF), s, v)).convert("RGB")


def colour_jitter(img: Image.Image, rng: random.Random, strength: Sequence[float] = JITTER) -> Image.Image:
    """Brightness, contrast, saturation and hue with uniform factors, in a random order."""
    b, c, s, hue = strength
    fb, fc, fs = (rng.uniform(max(0.0, 1 - x), 1 + x) for x in (b, c, s))
    fh = rng.uniform(-hue, hue)
    ops: List[Callable[[Image.Image], Image.Image]] = [
           lambda im: ImageEnhance.Brightness(im).enhance(fb),
           lambda im: ImageEnhance.Contrast(im).enhance(fc),
           lambda im: ImageEnhance.Color(im).enhance(fs),
           lambda im: shift_hue(im, fh)]
    rng.shuffle(ops)
    for op in ops:
        img = op(img)
    return img


def decode(data: bytes) -> Image.Image:
    """The whole image, RGB, as a plain PIL open + convert (no draft, no scaled decode)."""
    return Image.open(io.BytesIO(data)).convert("RGB")


class ReferenceMultiCrop:
    """bytes -> list of normalised float crops [3, S, S], one per (size, count) entry."""

    def __init__(self, size_crops: Sequence[int], nmb_crops: Sequence[int],
                 min_scale: Sequence[float], max_scale: Sequence[float], *, jitter_p: float = 0.8,
                 gray_p: float = 0.2, blur_p: float = 0.5,
                 blur_radius: Tuple[float, float] = (0.1, 2.0), seed: Optional[int] = 0) -> None:
        self.plan = [(int(s), (float(lo), float(hi)))
                     for s, n, lo, hi in zip(size_crops, nmb_crops, min_scale, max_scale)
                     for _ in range(int(n))]
        self.jitter_p, self.gray_p, self.blur_p, self.blur_radius = jitter_p, gray_p, blur_p, blur_radius
        self.rng = random.Random(seed)
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def crop(self, img: Image.Image, size: int, scale: Tuple[float, float]) -> torch.Tensor:
        rng = self.rng
        x, y, w, h = sample_crop_box(img.width, img.height, scale, rng)
        out = img.crop((x, y, x + w, y + h)).resize((size, size), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < self.jitter_p:
            out = colour_jitter(out, rng)
        if rng.random() < self.gray_p:
            out = out.convert("L").convert("RGB")
        if rng.random() < self.blur_p:
            out = out.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*self.blur_radius)))
        t = torch.from_numpy(np.asarray(out, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (t - self.mean) / self.std

    def from_image(self, img: Image.Image) -> List[torch.Tensor]:
        return [self.crop(img, size, scale) for size, scale in self.plan]

    def __call__(self, data: bytes) -> List[torch.Tensor]:
        return self.from_image(decode(data))
