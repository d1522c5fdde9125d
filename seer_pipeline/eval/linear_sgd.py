"""Linear evaluation the way VISSL ran it for SEER, on precomputed frozen features.

Head: BatchNorm (no affine) then Linear -- VISSL's `eval_mlp` with `use_bn: True` (BN eps 1e-5,
momentum 0.1; Linear weights N(0, 0.01), bias 0). Optimiser: SGD, momentum 0.9, Nesterov,
weight decay 5e-4 on the Linear weight only, lr 0.01 per 256 images, 28 epochs, multistep decay
x0.1 at epochs 8, 16, 24 (VISSL `configs/config/benchmark/linear_image_classification/imagenet1k/
eval_resnet_8gpu_transfer_in1k_linear.yaml`). `schedule="cosine"` is the alternative.

This is the *precomputed-feature variant*: the trunk sees each train image once, centre-cropped,
instead of a fresh random-resized crop + flip every epoch (`seer_pipeline.eval.augmented` does
that). It is much faster and usually a point or two lower on ImageNet-sized sets.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class SGDConfig:
    epochs: int = 28
    batch_size: int = 256
    base_lr: float = 0.01  # per 256 images (VISSL auto_lr_scaling)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"  # "step" (x0.1 at 8/16/24 of 28 epochs, scaled) | "cosine"
    milestones: tuple[float, ...] = (8 / 28, 16 / 28, 24 / 28)


@dataclass
class SGDResult:
    top1: float  # percent, on test
    top5: float
    train_top1: float
    epochs: int
    lr: float


class BNLinear(nn.Module):
    """BatchNorm1d (no affine) then Linear: the head VISSL puts on frozen SEER features."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, eps=1e-5, momentum=0.1, affine=False)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


def lr_at(cfg: SGDConfig, lr0: float, epoch_frac: float) -> float:
    """The learning rate `epoch_frac` epochs into training."""
    if cfg.schedule == "cosine":
        return lr0 * 0.5 * (1 + math.cos(math.pi * min(1.0, epoch_frac / cfg.epochs)))
    if cfg.schedule != "step":
        raise ValueError(f"schedule must be 'step' or 'cosine', got {cfg.schedule!r}")
    drops = sum(epoch_frac >= m * cfg.epochs for m in cfg.milestones)
    return lr0 * 0.1 ** drops


def rows(x: torch.Tensor | np.ndarray, sel: slice | np.ndarray) -> torch.Tensor:
    """float32 rows of features that may be a tensor or a (read-only) memmap, as a fresh tensor."""
    if isinstance(x, torch.Tensor):
        return x[torch.as_tensor(sel)] if isinstance(sel, np.ndarray) else x[sel]
    return torch.from_numpy(np.array(x[sel], dtype=np.float32))


def topk_correct(logits: torch.Tensor, y: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k predictions, for each k (k capped at C)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == y[:, None]
    return [int(hit[:, :min(k, kmax)].any(1).sum()) for k in ks]


@torch.no_grad()
def evaluate(head: nn.Module, x: torch.Tensor | np.ndarray, y: torch.Tensor, device: str = "cpu",
             chunk: int = 65536) -> tuple[float, float]:
    """(top-1, top-5) percent of a head on features, in chunks (x may be a memmap)."""
    head.eval()
    c1 = c5 = 0
    for i in range(0, len(y), chunk):
        xb = rows(x, slice(i, i + chunk)).float().to(device)
        a, b = topk_correct(head(xb), y[i:i + chunk].to(device))
        c1, c5 = c1 + a, c5 + b
    n = max(1, len(y))
    return 100.0 * c1 / n, 100.0 * c5 / n


def train_sgd_linear(
    train_x: torch.Tensor | np.ndarray, train_y: torch.Tensor, test_x: torch.Tensor | np.ndarray,
    test_y: torch.Tensor, num_classes: int, cfg: SGDConfig | None = None, seed: int = 0,
    device: str = "cpu",
) -> SGDResult:
    """Train the BN+Linear head on frozen features with SGD; score top-1/top-5 on test.

    Features may be numpy memmaps: each batch is read as it is needed, so the train set never has
    to fit in RAM.
    """
    cfg = cfg or SGDConfig()
    n = len(train_y)
    if n < 2 or len(train_x) != n or len(test_x) != len(test_y):
        raise ValueError(f"need >= 2 train samples and matching lengths ({len(train_x)}/{n})")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = BNLinear(int(train_x.shape[1]), num_classes).to(device)
    decay = [head.fc.weight]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": [head.fc.bias], "weight_decay": 0.0}],
                          lr=cfg.base_lr, momentum=cfg.momentum, nesterov=True)
    bs = min(cfg.batch_size, n)
    lr0 = cfg.base_lr * bs / 256  # VISSL auto_lr_scaling: base_value per base_lr_batch_size 256
    steps_per_epoch = max(1, n // bs)  # drop the last partial batch: BN needs >1 sample
    for epoch in range(cfg.epochs):
        head.train()
        perm = torch.randperm(n, generator=g)
        for s in range(steps_per_epoch):
            # Sorted indices inside a batch: a memmap is then read forwards.
            idx = perm[s * bs:(s + 1) * bs].sort().values
            xb = rows(train_x, idx.numpy()).float().to(device)
            lr = lr_at(cfg, lr0, epoch + s / steps_per_epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = F.cross_entropy(head(xb), train_y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if epoch == 0 or (epoch + 1) % 7 == 0:
            log.info("sgd-linear: epoch %d/%d loss %.3f lr %.2g", epoch + 1, cfg.epochs, loss.item(), lr)
    top1, top5 = evaluate(head, test_x, test_y, device)
    tr1, _ = evaluate(head, train_x, train_y, device)
    log.info("sgd-linear: train %.2f%%, test top-1 %.2f%% top-5 %.2f%%", tr1, top1, top5)
    return SGDResult(top1, top5, tr1, cfg.epochs, lr0)
