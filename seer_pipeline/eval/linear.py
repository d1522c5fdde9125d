"""Quick linear probe: multinomial logistic regression on standardised frozen features (L-BFGS).

The protocol of the SEER paper is `linear_sgd` (BN + Linear head, SGD); this is the fast mode.

The weight decay is picked from a small sweep on a held-out part of train (never on test),
then the classifier is refitted on all of train with it and scored once on test.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from seer_pipeline.eval.linear_sgd import topk_correct

log = logging.getLogger(__name__)

WD_SWEEP = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class LinearResult:
    accuracy: float  # percent, on test
    weight_decay: float
    val_accuracy: dict[str, float] = field(default_factory=dict)  # wd -> held-out percent
    train_accuracy: float = 0.0
    top5: float = 0.0  # percent, on test


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Zero mean, unit variance per dimension, with statistics from train only."""
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, wd: float, max_iter: int = 200,
        seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch L-BFGS on mean cross-entropy + wd * ||W||^2. Returns (W [C,D], b [C])."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(num_classes, x.shape[1], generator=g) * 0.01).requires_grad_()
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + wd * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def accuracy(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x @ w.T + b).argmax(1) == y).float().mean()) * 100.0


def linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    num_classes: int, wds: tuple[float, ...] = WD_SWEEP, holdout: float = 0.1,
    max_holdout: int = 5000, max_iter: int = 100, seed: int = 0, max_sweep: int = 10000,
) -> LinearResult:
    """Sweep weight decay on a held-out part of train; refit on all of train; score test.

    The sweep fits on at most `max_sweep` train samples with half the iterations (it only
    has to rank the weight decays); the final fit uses all of train.
    """
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("features and labels differ in length")
    train_x, test_x = standardise(train_x.float(), test_x.float())
    n_hold = min(max_holdout, max(1, int(len(train_x) * holdout)))
    if len(train_x) - n_hold < num_classes:
        raise ValueError(f"too few train samples ({len(train_x)}) for a held-out split")
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    hold, fit_idx = perm[:n_hold], perm[n_hold:n_hold + max_sweep]
    val: dict[str, float] = {}
    for wd in wds:
        w, b = fit(train_x[fit_idx], train_y[fit_idx], num_classes, wd, max(10, max_iter // 2), seed)
        val[f"{wd:g}"] = accuracy(w, b, train_x[hold], train_y[hold])
        log.info("linear: wd %g -> held-out %.2f%%", wd, val[f"{wd:g}"])
    # Ties go to the larger weight decay (the simpler model).
    best = max(wds, key=lambda wd: (val[f"{wd:g}"], wd))
    w, b = fit(train_x, train_y, num_classes, best, max_iter, seed)

    top5 = 100.0 * topk_correct(test_x @ w.T + b, test_y, (5,))[0] / max(1, len(test_y))
    res = LinearResult(accuracy(w, b, test_x, test_y), best, val, accuracy(w, b, train_x, train_y), top5)
    log.info("linear: wd %g, train %.2f%%, test %.2f%%", best, res.train_accuracy, res.accuracy)
    return res
