"""Weighted k-NN on cosine similarity, the usual SSL protocol (Wu et al. 2018; DINO, SwAV evals):
each of the k nearest train features votes for its class with weight exp(similarity / T).
k = 20 and T = 0.07 are the values those papers use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_classify(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int,
    k: int = 20, temperature: float = 0.07, chunk: int = 1024,
) -> torch.Tensor:
    """Predicted labels [N_test] for test features, from labelled train features."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, T={temperature}")
    k = min(k, len(train_x))
    train = F.normalize(train_x.float(), dim=1)
    preds = []
    for i in range(0, len(test_x), chunk):
        q = F.normalize(test_x[i:i + chunk].float(), dim=1)
        sim, idx = (q @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    num_classes: int, k: int = 20, temperature: float = 0.07,
) -> float:
    """Test accuracy in percent."""
    pred = knn_classify(train_x, train_y, test_x, num_classes, k, temperature)
    return float((pred == test_y).float().mean()) * 100.0
