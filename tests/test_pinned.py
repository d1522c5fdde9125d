"""Published numbers, written out as literals here (never read back from the table under test).

Sources: SwAV = Caron et al. 2020 (§3.2, App. A) and facebookresearch/swav's main_swav.py /
src/multicropdataset.py; SimCLR = Chen et al. 2020 (App. A); SEER = Goyal et al. 2021 (§3) and
VISSL's SEER configs (configs/config/pretrain/seer/, TEMP_FROZEN_PARAMS_ITER_MAP 313).
A failure here means a default moved away from the recipe: fix the code, or change the literal
with the new source in the comment.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from seer_pipeline.config.train import SwavConfig, load_train_config
from seer_pipeline.data.augment import MEAN, STD, MultiCrop
from seer_pipeline.config.data import DataConfig
from seer_pipeline.config.crops import CROP_PRESETS, crop_counts
from seer_pipeline.data.stream import EpochStream
from seer_pipeline.train import swav


def test_crop_presets_are_the_published_ones() -> None:
    # (sizes, counts, min scales, max scales)
    assert CROP_PRESETS["swav"] == ([224, 96], [2, 6], [0.14, 0.05], [1.0, 0.14])  # SwAV §3.2
    assert CROP_PRESETS["seer"] == ([160, 96], [2, 4], [0.14, 0.05], [1.0, 0.14])  # SEER 10B, VISSL
    assert CROP_PRESETS["seer2021"] == ([224, 96], [2, 4], [0.14, 0.05], [1.0, 0.14])  # SEER §3.1
    assert set(CROP_PRESETS) == {"swav", "seer", "seer2021"}
    assert crop_counts("seer2021") == [(2, 224), (4, 96)]
    assert crop_counts("swav") == [(2, 224), (6, 96)]


def test_multicrop_emits_the_preset_shapes(photo_dir) -> None:
    data = (photo_dir / "opencv-doc__examples_data_butterfly.jpg").read_bytes()
    want = {"swav": [224] * 2 + [96] * 6, "seer": [160] * 2 + [96] * 4, "seer2021": [224] * 2 + [96] * 4}
    for name, sizes in want.items():
        out = MultiCrop(*CROP_PRESETS[name])(data, np.random.default_rng(0))
        assert [tuple(t.shape) for t in out] == [(3, s, s) for s in sizes], name


def test_distortion_and_normalisation_defaults() -> None:
    d = DataConfig()
    assert (d.jitter_p, list(d.jitter), d.gray_p) == (0.8, [0.8, 0.8, 0.8, 0.2], 0.2)  # SimCLR s=1
    assert (d.blur_p, list(d.blur_radius)) == (0.5, [0.1, 2.0])  # swav multicropdataset.py
    assert MEAN == (0.485, 0.456, 0.406) and STD == (0.228, 0.224, 0.225)  # ditto (0.228: swav's R)


def test_swav_defaults() -> None:
    s = SwavConfig()
    assert s.temperature == 0.1 and s.epsilon == 0.05  # SwAV §3.2 / VISSL SEER configs
    assert s.sinkhorn_iters == 10  # SEER configs (SwAV's ImageNet runs use 3)
    assert s.freeze_prototypes_iters == 313  # SEER/SwAV: first epoch at batch 4096
    assert list(s.crops_for_assign) == [0, 1] and s.queue_length == 0 and s.queue_start == 0
    assert swav.DEFAULT_TEMPERATURE == 0.1 and swav.DEFAULT_EPSILON == 0.05
    assert swav.SEER_FREEZE_PROTOTYPES_ITERS == 313


def test_presets_carry_the_recipes() -> None:
    for name in ("seer_32gf", "seer_128gf"):
        c = load_train_config(name)
        assert (c.data.crops, c.swav.epsilon, c.swav.sinkhorn_iters, c.swav.temperature,
                c.swav.freeze_prototypes_iters, c.swav.queue_length) == ("seer2021", 0.05, 10, 0.1, 313, 0), name
    c = load_train_config("seer_10b")
    assert (c.data.crops, c.swav.epsilon) == ("seer", 0.03)  # SEER 10B: 2x160+4x96, eps 0.03
    c = load_train_config("swav_rn50like")
    assert (c.data.crops, c.swav.epsilon, c.swav.sinkhorn_iters, c.model.n_prototypes) == ("swav", 0.05, 3, 3000)


def test_prototypes_freeze_through_iteration_312() -> None:
    head = nn.Module()
    head.prototypes = nn.Linear(4, 3, bias=False)
    for it, frozen in ((0, True), (312, True), (313, False), (10_000, False)):
        head.prototypes.weight.grad = torch.ones(3, 4)
        assert swav.cancel_prototype_grads(head, it) is frozen, it
        assert (head.prototypes.weight.grad is None) is frozen, it


def test_queue_fills_from_its_start_step() -> None:
    q = swav.EmbeddingQueue(length=4, dim=2, n_assign_crops=2, start_iter=15)
    e = [torch.ones(2, 2), torch.ones(2, 2)]
    assert q.push(e, 14) is False and not q.is_full
    assert q.push(e, 15) is True and q.push(e, 16) is True and q.is_full


def test_epoch_stream_takes_keywords_only() -> None:
    assert all(f.kw_only for f in dataclasses.fields(EpochStream))
    with pytest.raises(TypeError):
        EpochStream([], True, None, 0, 0, 0, 1, 1, 2, 8, 0.1)  # type: ignore[misc]
