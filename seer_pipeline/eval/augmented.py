"""Linear evaluation with the features recomputed every epoch, as VISSL ran it for SEER: each train
image is a fresh random-resized crop (scale 0.08-1, aspect 3/4-4/3) + horizontal flip per epoch,
passed through the frozen trunk, then the BatchNorm + linear head takes an SGD step (the same
head, optimiser and schedule as `linear_sgd`; train transforms `RandomResizedCrop 224` +
`RandomHorizontalFlip` in VISSL's eval_resnet_8gpu_transfer_in1k_linear.yaml). Test images use
the centre-crop features. Needs an indexable source (imagefolder, fashion-mnist): shards are read
as streams and cannot be reshuffled per epoch.
"""
from __future__ import annotations

import copy
import logging
import math
import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Subset

from seer_pipeline.eval.datasets import DataSpecError
from seer_pipeline.eval.linear_sgd import (
    BNLinear,
    SGDConfig,
    SGDResult,
    evaluate,
    lr_at,
)
from seer_pipeline.eval.sources import Source, collate
from seer_pipeline.eval.feature_stream import to_input

log = logging.getLogger(__name__)


class RandomResizedCropFlip:
    """PIL image -> uint8 [crop, crop, C]: a random-resized crop, then a flip with p = 0.5.

    Randomness comes from `random`, which the DataLoader seeds per worker from its generator, so a
    seeded run repeats exactly.
    """

    def __init__(self, crop: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.crop, self.scale, self.ratio = crop, scale, ratio
        self.active = True

    def box(self, w: int, h: int) -> tuple[int, int, int, int]:
        area = w * h
        for _ in range(10):
            target = area * random.uniform(*self.scale)
            aspect = math.exp(random.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                x, y = random.randint(0, w - cw), random.randint(0, h - ch)
                return x, y, x + cw, y + ch
        s = min(w, h)  # fallback: the central square
        return (w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s

    def __call__(self, img: Any) -> np.ndarray:
        img = img.resize((self.crop, self.crop), Image.BILINEAR, box=self.box(*img.size))
        if random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(img, dtype=np.uint8)


def train_sgd_linear_augmented(
    trunk: nn.Module, src: Source, train_idx: np.ndarray, test_x: Any, test_y: torch.Tensor,
    num_classes: int, crop: int, cfg: SGDConfig | None = None, stage: int = -1, workers: int = 2,
    device: str = "cpu", seed: int = 0,
) -> SGDResult:
    """Train the BN + linear head on per-epoch augmented features of `train_idx`; score test."""
    if not src.indexable():
        raise DataSpecError(f"{src.name}: the augmented linear protocol needs an imagefolder or "
                            "fashion-mnist source (shards cannot be reshuffled); use --protocol sgd")
    cfg = cfg or SGDConfig()
    ds = copy.copy(src.dataset)
    ds.tf = RandomResizedCropFlip(crop)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = BNLinear(int(test_x.shape[1]), num_classes).to(device)
    opt = torch.optim.SGD([{"params": [head.fc.weight], "weight_decay": cfg.weight_decay},
                           {"params": [head.fc.bias], "weight_decay": 0.0}],
                          lr=cfg.base_lr, momentum=cfg.momentum, nesterov=True)
    bs = min(cfg.batch_size, len(train_idx))
    lr0 = cfg.base_lr * bs / 256
    steps = max(1, len(train_idx) // bs)
    trunk.eval()
    correct = seen = 0
    for epoch in range(cfg.epochs):
        head.train()
        loader = DataLoader(Subset(ds, train_idx.tolist()), batch_size=bs, shuffle=True, drop_last=True,
                            num_workers=workers, collate_fn=collate, generator=g)
        for s, (x, y, _, _) in enumerate(loader):
            if len(x) < 2:
                continue
            with torch.no_grad():
                f = trunk.forward_features(to_input(x, device), stage=stage)
                f = f.mean(dim=(2, 3)) if f.dim() > 2 else f
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, lr0, epoch + s / steps)
            logits = head(f.float())
            loss = F.cross_entropy(logits, y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if epoch == cfg.epochs - 1:
                correct += int((logits.argmax(1).cpu() == y).sum())
                seen += len(y)
        log.info("sgd-linear (augmented): epoch %d/%d loss %.3f", epoch + 1, cfg.epochs, loss.item())
    top1, top5 = evaluate(head, test_x, test_y, device)
    return SGDResult(top1, top5, 100.0 * correct / max(1, seen), cfg.epochs, lr0)
