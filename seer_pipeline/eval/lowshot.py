"""Class-balanced low-shot subsets of a labelled train split, as in the SEER paper's low-shot table
(Goyal et al. 2021, section 4.1: 1% and 10% of ImageNet, a fixed number of images per class).

The subset is a function of the labels, the fraction and the seed only -- never of the features --
so every model compared on a split sees exactly the same images.
"""
from __future__ import annotations

import numpy as np

LOW_SHOT_PERCENTS = (1.0, 10.0)


def balanced_subset(labels: np.ndarray, percent: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of `percent`% of each class (at least one image per class present)."""
    if not 0 < percent <= 100:
        raise ValueError(f"low-shot percent must be in (0, 100], got {percent}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        # Each class gets its own draw from one seeded stream: the choice for class c does not
        # depend on how many images other classes have beyond their order in np.unique.
        n = max(1, int(round(len(idx) * percent / 100.0)))
        picked.append(rng.permutation(idx)[:n])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def parse_percents(text: str) -> tuple[float, ...]:
    """'1,10' -> (1.0, 10.0); '' or 'none' -> ()."""
    if text.strip().lower() in ("", "none", "0"):
        return ()
    try:
        vals = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError as e:
        raise ValueError(f"--low-shot: expected percents like 1,10, got {text!r}") from e
    for v in vals:
        if not 0 < v <= 100:
            raise ValueError(f"--low-shot: {v} is not a percent in (0, 100]")
    return vals
