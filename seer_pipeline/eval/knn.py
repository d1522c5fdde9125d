"""Weighted k-NN on cosine similarity, the usual SSL protocol (Wu et al. 2018; DINO, SwAV evals):
each of the k nearest train features votes for its class with weight exp(similarity / T).
k = 20 and T = 0.07 are the values those papers use (DINO `eval_knn.py` defaults).

Train features are visited once, in chunks, with a running top-k per test sample, so a million
train features (or a memmap of them) never have to sit on the device at once.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from seer_pipeline.eval.linear_sgd import rows, topk_correct


def _rows(x: torch.Tensor | np.ndarray, i: int, j: int, device: str) -> torch.Tensor:
    return F.normalize(rows(x, slice(i, j)).float().to(device), dim=1)


@torch.no_grad()
def knn_scores(
    train_x: torch.Tensor | np.ndarray, train_y: torch.Tensor, test_x: torch.Tensor | np.ndarray,
    num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024,
    train_chunk: int = 65536, device: str = "cpu",
) -> torch.Tensor:
    """Class votes [N_test, C] (on CPU) for test features from labelled train features."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, T={temperature}")
    n_tr = len(train_x)
    if n_tr == 0 or n_tr != len(train_y):
        raise ValueError(f"{n_tr} train features for {len(train_y)} labels")
    k = min(k, n_tr)
    queries = [_rows(test_x, i, i + chunk, device) for i in range(0, len(test_x), chunk)]
    best_sim = [torch.full((len(q), 0), 0.0, device=device) for q in queries]
    best_idx = [torch.zeros((len(q), 0), dtype=torch.long, device=device) for q in queries]
    for t0 in range(0, n_tr, train_chunk):
        keys = _rows(train_x, t0, t0 + train_chunk, device)
        for qi, q in enumerate(queries):
            sim, idx = (q @ keys.T).topk(min(k, len(keys)), dim=1)
            # Merge with what earlier chunks found: the top k of (old top k + this chunk's top k).
            sim = torch.cat([best_sim[qi], sim], 1)
            idx = torch.cat([best_idx[qi], idx + t0], 1)
            best_sim[qi], pos = sim.topk(min(k, sim.shape[1]), dim=1)
            best_idx[qi] = idx.gather(1, pos)
    labels = train_y.to(device)
    out = []
    for sim, idx in zip(best_sim, best_idx):
        votes = torch.zeros(len(sim), num_classes, device=device)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        out.append(votes.cpu())
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def knn_classify(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int,
    k: int = 20, temperature: float = 0.07, chunk: int = 1024, device: str = "cpu",
) -> torch.Tensor:
    """Predicted labels [N_test] for test features, from labelled train features."""
    return knn_scores(train_x, train_y, test_x, num_classes, k, temperature, chunk, device=device).argmax(1)


def knn_topk(
    train_x: torch.Tensor | np.ndarray, train_y: torch.Tensor, test_x: torch.Tensor | np.ndarray,
    test_y: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07,
    device: str = "cpu", train_chunk: int = 65536,
) -> tuple[float, float]:
    """(top-1, top-5) test accuracy in percent."""
    scores = knn_scores(train_x, train_y, test_x, num_classes, k, temperature, device=device,
                        train_chunk=train_chunk)
    c1, c5 = topk_correct(scores, test_y)
    n = max(1, len(test_y))
    return 100.0 * c1 / n, 100.0 * c5 / n


def knn_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    num_classes: int, k: int = 20, temperature: float = 0.07,
) -> float:
    """Top-1 test accuracy in percent."""
    return knn_topk(train_x, train_y, test_x, test_y, num_classes, k, temperature)[0]
