"""Hostile shard sets (issue 24): FIFOs among the shards, members declaring or holding gigabytes.

Every reader (the loader, `seer-shards verify`, eval's stream) applies the builder's rules: regular
files only, members capped at MAX_MEMBER_BYTES; each failure is counted and reported like any
other read failure, within a bounded time and memory.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import tarfile
import time
import tracemalloc
from pathlib import Path
from typing import Iterator

import pytest

from data_prep.verify import verify
from seer_pipeline.config.data import DataConfig
from seer_pipeline.data.loader import build_loader
from seer_pipeline.eval.sources import EvalTransform, open_source
from seer_pipeline.eval.feature_stream import extract_features
from seer_pipeline.shards import format as fmt
from seer_pipeline.shards.synth import photo_variants, write_shards

TINY = dict(crops="custom", size_crops=[24, 12], nmb_crops=[2, 2], min_scale_crops=[0.3, 0.1],
            max_scale_crops=[1.0, 0.4])
SPARSE = 6 << 30  # the "real 6 GiB member": a hole on disk, 6 GiB to anyone reading it


class Hung(BaseException):
    """Not an OSError: a reader that catches read errors must not swallow the deadline."""


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) if the body blocks, e.g. in open() of a FIFO."""
    def fire(*_: object) -> None:
        raise Hung(f"still running after {seconds}s: a reader blocked")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def member(name: str, data: bytes) -> bytes:
    pad = b"\0" * (-len(data) % fmt.BLOCK)
    return fmt.ustar_header(name, len(data)) + data + pad


def huge_member_shard(path: Path, good: list[tuple[str, bytes, bytes]], big_key: str, size: int,
                      exts: tuple[str, str] = ("jpg", "json")) -> None:
    """`good` samples, then `<big_key>.<exts[0]>` of `size` bytes, then one more good sample.

    size < 8 GiB: a ustar header and a real payload, a hole in a sparse file (nothing written);
    larger: a GNU base-256 size field and no payload at all (the header lies).
    """
    with open(path, "wb") as f:
        for key, a, b in good:
            f.write(member(f"{key}.{exts[0]}", a) + member(f"{key}.{exts[1]}", b))
        if size < 8 ** 11:
            f.write(fmt.ustar_header(f"{big_key}.{exts[0]}", size))
            f.seek(size + -size % fmt.BLOCK, os.SEEK_CUR)  # the hole: a real member of `size` bytes
        else:
            ti = tarfile.TarInfo(f"{big_key}.{exts[0]}")
            ti.size = size
            f.write(ti.tobuf(format=tarfile.GNU_FORMAT))
        key, a, b = good[0]
        f.write(member(f"{key}x.{exts[0]}", a) + member(f"{key}x.{exts[1]}", b) + b"\0" * fmt.RECORD)


def cfg(shards: str, **kw: object) -> DataConfig:
    base = dict(shards=shards, batch_size=4, workers=0, shuffle_buffer=5, seed=0, **TINY)
    base.update(kw)
    return DataConfig(**base)  # type: ignore[arg-type]


def one_epoch(shards: str, **kw: object) -> dict:
    ld = build_loader(cfg(shards, **kw), 0, 1)
    it = iter(ld)
    for _ in range(ld.batches_per_epoch):
        assert [v.shape[0] for v in next(it)] == [4] * 4
    it.close()
    return ld.metrics()


# ---------------------------------------------------------------- FIFOs
def test_fifo_shard_is_counted_not_waited_on(tmp_path: Path, photo_dir: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    write_shards(tmp_path, photo_variants(photo_dir, 32, max_side=32), 8)
    fifo = tmp_path / "shard-000002.tar"
    fifo.unlink()
    os.mkfifo(fifo)  # no writer: a plain open() for reading waits forever
    t0 = time.monotonic()
    with deadline(120), caplog.at_level(logging.WARNING, logger="seer_pipeline.data"):
        m = one_epoch(str(tmp_path), max_fail_fraction=0.5)
    assert time.monotonic() - t0 < 120
    assert m["read_failures"] == 8 and m["samples_ok"] == 24 and m["samples_repeated"] == 8
    assert m["failed_shard_names"] == [str(fifo)]
    assert any("FIFO" in r.getMessage() and str(fifo) in r.getMessage() for r in caplog.records)
    # The documented policy: past max_fail_fraction (default 1%) the loader stops, naming the shard.
    with deadline(120), pytest.raises(RuntimeError, match="shard-000002.tar"):
        one_epoch(str(tmp_path))


def test_fifo_in_a_resampled_pattern_is_skipped_and_named(tmp_path: Path, photo_dir: Path) -> None:
    write_shards(tmp_path, photo_variants(photo_dir, 24, max_side=32), 8)
    fifo = tmp_path / "shard-000001.tar"
    fifo.unlink()
    os.mkfifo(fifo)
    pattern = str(tmp_path / "shard-{000000..000002}.tar")
    with deadline(120):
        m = one_epoch(pattern, epoch_samples=24)
    assert m["samples_ok"] >= 24 and m["failed_shard_names"] == [str(fifo)]
    only = tmp_path / "only"
    only.mkdir()
    os.mkfifo(only / "a.tar")
    with deadline(120), pytest.raises(RuntimeError, match="no readable shard"):
        one_epoch(str(only / "a.tar"), epoch_samples=8)


def test_verify_and_stats_name_a_fifo_shard(tmp_path: Path, photo_dir: Path) -> None:
    from data_prep.verify import stats

    write_shards(tmp_path, photo_variants(photo_dir, 8, max_side=32), 4)
    man = fmt.load_manifest(str(tmp_path))
    fmt.write_manifest(str(tmp_path), dict(man, inputs_seen=8, skipped=0, duplicates=0))
    (tmp_path / "shard-000001.tar").unlink()
    os.mkfifo(tmp_path / "shard-000001.tar")
    with deadline(120):
        assert "shard-000001.tar: not a regular file" in verify(str(tmp_path), decode=False)
        with pytest.raises(ValueError, match="shard-000001.tar: unreadable .*FIFO"):
            stats(str(tmp_path))


def test_eval_counts_a_fifo_shard(tmp_path: Path, photo_dir: Path) -> None:
    d = tmp_path / "sh"
    d.mkdir()
    good = [(f"s{i:03d}", img, str(i % 2).encode()) for i, img in enumerate(photo_variants(photo_dir, 12, max_side=32))]
    for s in range(2):
        (d / f"s-{s}.tar").write_bytes(b"".join(member(f"{k}.jpg", a) + member(f"{k}.cls", c)
                                                for k, a, c in good[6 * s: 6 * s + 6]) + b"\0" * fmt.RECORD)
    os.mkfifo(d / "s-2.tar")
    src = open_source(f"wds:{d}/s-*.tar", EvalTransform(None, 24), test_fraction=0.3)
    with deadline(120):
        fs = extract_features(None, src, tmp_path / "f", batch_size=4, workers=0, progress=False)
    assert len(fs.train_y) + len(fs.test_y) == 12 and fs.skipped == {"damaged shard": 1}


# ---------------------------------------------------------------- huge members
def _good(photo_dir: Path, n: int) -> list[tuple[str, bytes, bytes]]:
    imgs = photo_variants(photo_dir, n, max_side=32)
    return [(f"{i:08d}", img, json.dumps({"uid": i}).encode()) for i, img in enumerate(imgs)]


@pytest.mark.parametrize("size", [SPARSE, 1 << 40], ids=["sparse-6GiB", "declared-1TiB"])
def test_loader_counts_a_huge_member_as_a_read_failure(tmp_path: Path, photo_dir: Path, size: int,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    write_shards(tmp_path, photo_variants(photo_dir, 24, max_side=32), 8)
    victim = tmp_path / "shard-000001.tar"
    good = [(f"{i:08d}", img, json.dumps({"uid": i}).encode())
            for i, img in enumerate(photo_variants(photo_dir, 24, max_side=32)[8:11], start=8)]
    huge_member_shard(victim, good, "00000011", size)  # 8, 9 read; 10 pends on the next header (huge): 10-15 unread
    tracemalloc.start()
    try:
        with deadline(120), caplog.at_level(logging.WARNING, logger="seer_pipeline.data"):
            m = one_epoch(str(tmp_path), max_fail_fraction=0.5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 << 20, f"peak {peak / 2**20:.0f} MiB: the member was read"
    assert m["read_failures"] == 6 and m["samples_ok"] == 18 and m["failed_shard_names"] == [str(victim)]
    assert any("00000011.jpg" in r.getMessage() and "cap" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("size", [SPARSE, 1 << 40], ids=["sparse-6GiB", "declared-1TiB"])
def test_verify_reports_a_huge_member(tmp_path: Path, photo_dir: Path, size: int) -> None:
    write_shards(tmp_path, photo_variants(photo_dir, 8, max_side=32), 4)
    victim = tmp_path / "shard-000001.tar"
    huge_member_shard(victim, _good(photo_dir, 6)[4:6], "00000006", size)
    man = fmt.load_manifest(str(tmp_path))
    fmt.write_manifest(str(tmp_path), dict(man, inputs_seen=8, skipped=0))  # verify's accounting
    with deadline(300):
        problems = verify(str(tmp_path), decode=True)
    assert any(p.startswith("shard-000001.tar: unreadable tar") and "00000006.jpg" in p and "cap" in p
               for p in problems), problems
    assert f"shard-000001.tar: {victim.stat().st_size} bytes, manifest says {man['shards'][1]['bytes']}" in problems
    assert not any(p.startswith("shard-000000.tar") and "unreadable" in p for p in problems)


@pytest.mark.parametrize("size", [SPARSE, 1 << 40], ids=["sparse-6GiB", "declared-1TiB"])
def test_eval_stream_counts_a_huge_member(tmp_path: Path, photo_dir: Path, size: int) -> None:
    d = tmp_path / "sh"
    d.mkdir()
    good = [(f"s{i:03d}", img, str(i % 2).encode()) for i, img in enumerate(photo_variants(photo_dir, 12, max_side=32))]
    (d / "s-0.tar").write_bytes(b"".join(member(f"{k}.jpg", a) + member(f"{k}.cls", c) for k, a, c in good[:8])
                                + b"\0" * fmt.RECORD)
    huge_member_shard(d / "s-1.tar", good[8:12], "big", size, exts=("jpg", "cls"))
    src = open_source(f"wds:{d}/s-*.tar", EvalTransform(None, 24), test_fraction=0.3)
    with deadline(120):
        fs = extract_features(None, src, tmp_path / "f", batch_size=4, workers=0, progress=False)
    # 8 + 3: the fourth good sample of s-1 pends on the next (huge) header, lost with the shard.
    assert len(fs.train_y) + len(fs.test_y) == 11 and fs.skipped == {"damaged shard": 1}


def test_builder_and_readers_share_the_member_cap() -> None:
    from data_prep.options import MAX_BYTES, ShardOptions

    assert MAX_BYTES == fmt.MAX_MEMBER_BYTES
    with pytest.raises(ValueError, match="member cap"):
        ShardOptions(max_bytes=fmt.MAX_MEMBER_BYTES + 1)
