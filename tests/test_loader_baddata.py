"""Bad data: undecodable samples, missing and truncated shards, failure limit; bounded memory."""
from __future__ import annotations

import logging
import os
import tracemalloc
from pathlib import Path
from typing import List

import pytest

from seer_pipeline.config.data import DataConfig
from seer_pipeline.data.loader import build_loader
from seer_pipeline.shards.synth import photo_variants, write_shards

TINY = dict(crops="custom", size_crops=[24, 12], nmb_crops=[2, 2], min_scale_crops=[0.3, 0.1],
            max_scale_crops=[1.0, 0.4])


def cfg(shards: Path, **kw) -> DataConfig:
    base = dict(shards=str(shards), batch_size=4, workers=0, shuffle_buffer=5, seed=0, **TINY)
    base.update(kw)
    return DataConfig(**base)


def epoch_uids(shards: Path, world: int, **kw) -> List[List[int]]:
    """One epoch's uids per rank (loaders in-process, one after another)."""
    out = []
    for r in range(world):
        ld = build_loader(cfg(shards, **kw), r, world)
        it = iter(ld)
        uids = []
        for _ in range(ld.batches_per_epoch):
            views = next(it)
            assert [v.shape[0] for v in views] == [4] * 4
            uids += ld.last_uids
        assert ld.epoch == 0
        out.append((uids, ld.metrics()))
        it.close()
    return out


def test_undecodable_samples_skipped_and_counted(tmp_path: Path, photo_dir: Path) -> None:
    imgs = photo_variants(photo_dir, 40, max_side=32)
    bad = {3, 17, 30}
    for i in bad:
        imgs[i] = b"\xff\xd8 this is not a jpeg"
    write_shards(tmp_path, imgs, 10)
    res = epoch_uids(tmp_path, 2, max_fail_fraction=0.5)
    seen = [u for uids, _ in res for u in uids]
    assert not bad & set(seen)
    assert sum(m["decode_failures"] for _, m in res) == 3
    assert sum(m["samples_ok"] for _, m in res) == 37
    # 5 batches/rank need 40 samples; 3 failed -> refilled from the own slices (counted repeats)
    assert sum(m["samples_repeated"] for _, m in res) == 3
    with pytest.raises(RuntimeError, match="max_fail_fraction"):
        epoch_uids(tmp_path, 2)  # default 1%


def test_missing_shard_warns_counts_and_keeps_batch_count(tmp_path: Path, photo_dir: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    write_shards(tmp_path, photo_variants(photo_dir, 48, max_side=32), 8)
    gone = tmp_path / "shard-000002.tar"
    os.remove(gone)
    with caplog.at_level(logging.WARNING, logger="seer_pipeline.data"):
        res = epoch_uids(tmp_path, 2, max_fail_fraction=0.5)
    assert any("shard-000002.tar" in r.getMessage() for r in caplog.records)
    seen = {u for uids, _ in res for u in uids}
    assert not seen & set(range(16, 24)), "samples of the missing shard were produced"
    assert sum(m["read_failures"] for _, m in res) == 8
    assert sum(m["shards_failed"] for _, m in res) == 1
    assert [n for _, m in res for n in m["failed_shard_names"]] == [str(gone)]
    with pytest.raises(RuntimeError, match="shard-000002.tar"):
        epoch_uids(tmp_path, 2)


def test_truncated_shard(tmp_path: Path, photo_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_shards(tmp_path, photo_variants(photo_dir, 32, max_side=32), 8)
    victim = tmp_path / "shard-000001.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="seer_pipeline.data"):
        res = epoch_uids(tmp_path, 1, max_fail_fraction=0.5)
    assert any("shard-000001.tar" in r.getMessage() for r in caplog.records)
    m = res[0][1]
    assert 1 <= m["read_failures"] <= 8 and m["shards_failed"] == 1
    assert m["samples_ok"] == 32 - m["read_failures"]


def test_failure_in_worker_process_reaches_trainer(tmp_path: Path, photo_dir: Path) -> None:
    write_shards(tmp_path, photo_variants(photo_dir, 24, max_side=32), 6)
    os.remove(tmp_path / "shard-000000.tar")
    ld = build_loader(cfg(tmp_path, workers=2), 0, 1)
    with pytest.raises(RuntimeError, match="shard-000000.tar"):
        for _ in zip(range(ld.batches_per_epoch), ld):
            pass


def _peak_bytes(shards: Path, buffer: int) -> tuple[int, int]:
    ld = build_loader(cfg(shards, shuffle_buffer=buffer, batch_size=2, size_crops=[8, 8]), 0, 1)
    it = iter(ld)
    tracemalloc.start()
    for _ in range(ld.batches_per_epoch):
        next(it)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    it.close()
    return peak, ld.metrics()["peak_buffered"]


def test_memory_bounded_by_shuffle_buffer(tmp_path: Path, photo_dir: Path) -> None:
    imgs = photo_variants(photo_dir, 240, max_side=64)
    small = write_shards(tmp_path / "small", imgs[:60], 20)
    big = write_shards(tmp_path / "big", imgs, 20)
    p_small, n_small = _peak_bytes(small, 8)
    p_big, n_big = _peak_bytes(big, 8)
    assert n_small <= 8 and n_big <= 8, "more samples held than the shuffle buffer"
    avg = sum(map(len, imgs)) / len(imgs)
    # 4x the data must not cost 4x the memory: the growth stays under a few buffers' worth of samples
    assert p_big - p_small < 8 * avg * 4 + 200_000, (p_small, p_big, avg)
    p_wide, n_wide = _peak_bytes(big, 64)
    assert 8 < n_wide <= 64


def test_resampled_mode_stops_on_undecodable_data(tmp_path: Path) -> None:
    write_shards(tmp_path, [b"not an image"] * 12, 4)
    pattern = str(tmp_path / "shard-{000000..000002}.tar")
    ld = build_loader(cfg(Path(pattern), epoch_samples=8), 0, 1)
    with pytest.raises(RuntimeError, match="undecodable"):
        next(iter(ld))
