"""seer-eval protocols at scale: low-shot subsets, the SGD BN+linear head, chunked k-NN."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from seer_pipeline.eval.knn import knn_scores, knn_topk
from seer_pipeline.eval.linear_sgd import SGDConfig, lr_at, topk_correct, train_sgd_linear
from seer_pipeline.eval.lowshot import balanced_subset, parse_percents

torch.set_num_threads(1)


def test_balanced_subset_is_per_class_and_deterministic() -> None:
    y = np.repeat(np.arange(5), [100, 200, 300, 400, 1000])
    idx = balanced_subset(y, 10, seed=3)
    counts = np.bincount(y[idx], minlength=5)
    assert counts.tolist() == [10, 20, 30, 40, 100]  # 10% of every class, not of the whole
    assert np.array_equal(idx, balanced_subset(y, 10, seed=3))  # same seed: the same images
    assert not np.array_equal(idx, balanced_subset(y, 10, seed=4))
    assert len(np.unique(idx)) == len(idx) and np.all(np.diff(idx) > 0)
    one = balanced_subset(y, 1, seed=0)
    assert np.bincount(y[one], minlength=5).tolist() == [1, 2, 3, 4, 10]
    tiny = balanced_subset(np.array([0, 0, 1]), 1)
    assert sorted(np.array([0, 0, 1])[tiny].tolist()) == [0, 1]  # every class keeps one image
    with pytest.raises(ValueError):
        balanced_subset(y, 0)
    assert parse_percents("1,10") == (1.0, 10.0) and parse_percents("") == ()
    with pytest.raises(ValueError):
        parse_percents("1,200")


def test_topk_and_schedules() -> None:
    logits = torch.tensor([[0.0, 3, 2, 1, -1, -2], [5, 4, 3, 2, 1, 0]])
    assert topk_correct(logits, torch.tensor([2, 5])) == [0, 1]
    assert topk_correct(logits, torch.tensor([1, 0])) == [2, 2]
    assert topk_correct(logits[:, :3], torch.tensor([2, 0]), (1, 5)) == [1, 2]  # k capped at C
    cfg = SGDConfig(epochs=28)
    assert lr_at(cfg, 1.0, 0) == 1.0 and lr_at(cfg, 1.0, 7.9) == 1.0
    assert lr_at(cfg, 1.0, 8.0) == pytest.approx(0.1) and lr_at(cfg, 1.0, 27) == pytest.approx(1e-3)
    cos = SGDConfig(epochs=10, schedule="cosine")
    assert lr_at(cos, 1.0, 5) == pytest.approx(0.5) and lr_at(cos, 1.0, 10) == pytest.approx(0.0)


def _blobs(n: int, d: int = 32, c: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g) * 3
    y = torch.arange(n) % c
    # A large shared offset and scale: the BN in the head must undo it for SGD to work.
    return 50 + 10 * (centres[y] + torch.randn(n, d, generator=g)), y


def test_sgd_linear_learns_and_fails_on_shuffled_labels(tmp_path) -> None:
    x, y = _blobs(2400)
    cfg = SGDConfig(epochs=6, batch_size=128, base_lr=0.1)
    res = train_sgd_linear(x[:2000], y[:2000], x[2000:], y[2000:], 8, cfg)
    assert res.top1 > 95 and res.top5 >= res.top1
    # The same from memmapped features (as seer-eval streams them), bit for bit the same run.
    mm = np.lib.format.open_memmap(tmp_path / "f.npy", "w+", np.float32, tuple(x.shape))
    mm[:] = x.numpy()
    again = train_sgd_linear(mm[:2000], y[:2000], mm[2000:], y[2000:], 8, cfg)
    assert again.top1 == res.top1
    bad = train_sgd_linear(x[:2000], y[:2000][torch.randperm(2000)], x[2000:], y[2000:], 8, cfg)
    assert bad.top1 < 30  # chance is 12.5%


def test_knn_chunked_over_train_matches_one_pass() -> None:
    x, y = _blobs(1500, c=5)
    one = knn_scores(x[:1200], y[:1200], x[1200:], 5, k=20, train_chunk=10**6)
    chunked = knn_scores(x[:1200].numpy(), y[:1200], x[1200:].numpy(), 5, k=20, chunk=64, train_chunk=97)
    torch.testing.assert_close(chunked, one)
    t1, t5 = knn_topk(x[:1200], y[:1200], x[1200:], y[1200:], 5, train_chunk=100)
    assert t1 > 95 and t5 == 100.0
    with pytest.raises(ValueError):
        knn_scores(x[:10], y[:9], x[:2], 5)
