"""The streaming loader: split, once-per-epoch, determinism, exact resume, reshaped resume."""
from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch

from seer_pipeline.config.data import DataConfig
from seer_pipeline.data.loader import build_loader
from seer_pipeline.data.order import assign, epoch_runs, runs_len, shuffle_order, worker_batches
from seer_pipeline.shards.synth import photo_variants, write_shards

N_SAMPLES, PER_SHARD = 61, 9  # uneven: 6 shards of 9 + one of 7
TINY = dict(crops="custom", size_crops=[24, 12], nmb_crops=[2, 2], min_scale_crops=[0.3, 0.1],
            max_scale_crops=[1.0, 0.4])


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> str:
    out = tmp_path_factory.mktemp("loader_shards")
    return str(write_shards(out, photo_variants(photo_dir, N_SAMPLES, max_side=48), PER_SHARD))


def cfg(shards: str, **kw) -> DataConfig:
    base = dict(shards=shards, batch_size=4, workers=2, shuffle_buffer=6, seed=3, **TINY)
    base.update(kw)
    return DataConfig(**base)


def take(loader, n: int) -> List[Tuple[int, List[int], List[torch.Tensor]]]:
    """n batches as (epoch, uids, views); keeps the iterator alive only for these n."""
    out, it = [], iter(loader)
    for _ in range(n):
        views = next(it)
        out.append((loader.epoch, list(loader.last_uids), views))
    it.close()
    return out


def test_plan_split_is_exact_and_equal() -> None:
    counts = [9, 9, 9, 9, 9, 9, 7]
    plan = epoch_runs(counts, seed=1, epoch=0)
    assert runs_len(plan) == 61
    for world, workers, batch in [(1, 1, 4), (2, 2, 4), (4, 3, 2), (8, 2, 3)]:
        seen: List[int] = []
        for r in range(world):
            per_rank = sum(worker_batches(61 // (world * batch), workers, w) for w in range(workers))
            assert per_rank == 61 // (world * batch)
            for w in range(workers):
                a = assign(plan, world, r, workers, w, batch)
                seen += [u for s, e in a.runs for u in range(s, e)]
                assert runs_len(a.runs) == a.batches * batch
        assert len(seen) == len(set(seen)) and 61 - len(seen) < world * batch
    o = shuffle_order(50, 8, 0, 0, 0, 0)
    assert sorted(o.tolist()) == list(range(50))
    assert all(o[t] <= t + 8 for t in range(50)), "an output came from beyond the shuffle buffer"


def _python_shuffle_order(n: int, buffer: int, seed: int, epoch: int, rank: int, w: int) -> np.ndarray:
    # The streaming buffer written plainly; the compiled one must give the same order, or a
    # checkpoint written before the kernel existed would resume onto other samples.
    from seer_pipeline.data.order import TAG_SHUFFLE, rng_for

    rng = rng_for(seed, epoch, rank, w, TAG_SHUFFLE)
    size = max(1, min(buffer, n))
    picks = rng.integers(0, size, size=max(0, n - size))
    buf, out = list(range(min(size, n))), []
    for nxt, k in enumerate(picks.tolist(), start=size):
        out.append(buf[k])
        buf[k] = nxt
    rest = np.array(buf, dtype=np.int64)
    rng.shuffle(rest)
    return np.concatenate([np.array(out, dtype=np.int64), rest])


def test_compiled_shuffle_and_bisected_slices_match_plain_versions() -> None:
    from seer_pipeline.data.order import run_starts, slice_runs

    for n, b in [(0, 5), (1, 5), (5, 5), (4, 10), (50, 8), (1000, 1), (3001, 97)]:
        for seed in range(3):
            assert np.array_equal(shuffle_order(n, b, seed, 1, 2, 3), _python_shuffle_order(n, b, seed, 1, 2, 3))
    rng = np.random.default_rng(0)
    for trial in range(20):
        plan = epoch_runs(rng.integers(0, 30, size=int(rng.integers(1, 25))).tolist(), trial, 0)
        total, starts = runs_len(plan), run_starts(plan)
        assert starts[-1] == total
        for _ in range(20):
            lo = int(rng.integers(0, total + 2))
            hi = int(rng.integers(lo, total + 3))
            assert slice_runs(plan, lo, hi, starts) == slice_runs(plan, lo, hi)


def test_two_ranks_two_workers_each_sample_once(shards: str) -> None:
    loaders = [build_loader(cfg(shards), r, 2) for r in range(2)]
    p = loaders[0].batches_per_epoch
    assert p == loaders[1].batches_per_epoch == 61 // 8
    epochs: Dict[int, List[int]] = {0: [], 1: []}
    for ld in loaders:
        got = take(ld, 2 * p)
        assert [e for e, _, _ in got] == [0] * p + [1] * p
        for e, uids, views in got:
            assert len(uids) == 4 and [v.shape[0] for v in views] == [4] * 4
            assert views[0].shape[1:] == (3, 24, 24) and views[2].shape[1:] == (3, 12, 12)
            epochs[e] += uids
    for e, uids in epochs.items():
        assert len(uids) == len(set(uids)) == 2 * p * 4, f"epoch {e}: a sample repeated"
        assert set(uids) <= set(range(61)) and 61 - len(uids) < 2 * 4
    assert epochs[0] != epochs[1], "epoch 1 replayed epoch 0's order"


def test_fewer_shards_than_slots_split_within_shards(tmp_path: Path, photo_dir: Path) -> None:
    d = write_shards(tmp_path, photo_variants(photo_dir, 20, max_side=32), 10)  # 2 shards, 4 slots
    uids = []
    for r in range(2):
        uids += [u for _, us, _ in take(build_loader(cfg(str(d), batch_size=2), r, 2), 5) for u in us]
    assert sorted(uids) == list(range(20))


def test_deterministic_not_global_rng(shards: str) -> None:
    torch.manual_seed(0)
    random.seed(0)
    a = take(build_loader(cfg(shards), 1, 2), 5)
    torch.manual_seed(123)
    random.seed(99)
    torch.rand(7)
    b = take(build_loader(cfg(shards), 1, 2), 5)
    for (_, ua, va), (_, ub, vb) in zip(a, b):
        assert ua == ub and all(torch.equal(x, y) for x, y in zip(va, vb))
    c = take(build_loader(cfg(shards, seed=4), 1, 2), 5)
    assert [u for _, u, _ in c] != [u for _, u, _ in a]


@pytest.mark.parametrize("stop", [3, 5])  # mid-epoch (odd: resumes on worker 1) and within epoch 0 end
def test_resume_same_world_identical_batches(shards: str, stop: int) -> None:
    p = 61 // 8
    full = {r: take(build_loader(cfg(shards), r, 2), p + 3) for r in range(2)}
    states = []
    for r in range(2):
        ld = build_loader(cfg(shards), r, 2)
        take(ld, stop)
        states.append(ld.state_dict())
    for r in range(2):
        ld = build_loader(cfg(shards), r, 2)
        ld.load_state_dict(states)
        rest = take(ld, p + 3 - stop)
        for (e1, u1, v1), (e2, u2, v2) in zip(full[r][stop:], rest):
            assert (e1, u1) == (e2, u2)
            assert all(torch.equal(x, y) for x, y in zip(v1, v2)), "pixels differ after resume"


@pytest.mark.parametrize("old,new", [(1, 2), (2, 1), (2, 4)])
def test_resume_other_world_exact_complement(shards: str, old: int, new: int) -> None:
    rng = random.Random(old * 10 + new)
    p_old = 61 // (old * 4)
    stop = rng.randrange(1, p_old)
    before, states = [], []
    for r in range(old):
        ld = build_loader(cfg(shards), r, old)
        before += [u for _, us, _ in take(ld, stop) for u in us]
        states.append(ld.state_dict())
    after = []
    for r in range(new):
        ld = build_loader(cfg(shards), r, new)
        ld.load_state_dict(states)
        assert ld.epoch == 0
        n = ld.batches_this_epoch
        assert n == (61 - len(before)) // (new * 4)
        got = take(ld, n + 1)
        assert [e for e, _, _ in got] == [0] * n + [1], "epoch did not end after the remainder"
        after += [u for _, us, _ in got[:n] for u in us]
    assert len(before) == len(set(before)) and len(after) == len(set(after))
    assert not set(before) & set(after), "a sample consumed before the interruption came again"
    missing = set(range(61)) - set(before) - set(after)
    assert len(missing) < new * 4, f"{len(missing)} samples lost, more than the equal-batch remainder"


def test_reshape_twice_then_same_world(shards: str) -> None:
    # 2 ranks -> 1 rank (partial epoch) -> checkpoint again -> 1 rank resumes exactly.
    states = []
    for r in range(2):
        ld = build_loader(cfg(shards), r, 2)
        take(ld, 2)
        states.append(ld.state_dict())
    ld = build_loader(cfg(shards, workers=1), 0, 1)
    ld.load_state_dict(states)
    first = take(ld, 2)
    st = ld.state_dict()
    assert st["plan"] is not None
    ref = build_loader(cfg(shards, workers=1), 0, 1)
    ref.load_state_dict(states)
    full = take(ref, 5)
    again = build_loader(cfg(shards, workers=1), 0, 1)
    again.load_state_dict([st])
    for (e1, u1, v1), (e2, u2, v2) in zip(full[2:], take(again, 3)):
        assert (e1, u1) == (e2, u2) and all(torch.equal(x, y) for x, y in zip(v1, v2))
    assert [u for _, u, _ in first] == [u for _, u, _ in full[:2]]


def test_state_mismatch_is_refused(shards: str) -> None:
    ld = build_loader(cfg(shards), 0, 2)
    take(ld, 1)
    s0 = ld.state_dict()
    with pytest.raises(ValueError, match="all 2 old ranks|ranks 0..1"):
        build_loader(cfg(shards), 0, 2).load_state_dict([s0])
    with pytest.raises(ValueError, match="seed"):
        other = build_loader(cfg(shards, seed=9), 0, 1)
        other.load_state_dict([dict(s0, world_size=1, rank=0)])


def test_tiny_shards_from_builder(tiny_shards: Path) -> None:
    # Real `seer-shards` output: 3 shards x 4 full-size photos; one epoch over 2 ranks in-process.
    seen = []
    for r in range(2):
        ld = build_loader(cfg(str(tiny_shards), batch_size=2, workers=0), r, 2)
        assert ld.batches_per_epoch == 3
        seen += [u for _, us, _ in take(ld, 3) for u in us]
        assert ld.metrics()["samples_ok"] == 6
    assert sorted(seen) == list(range(12))


def test_resampled_mode(shards: str) -> None:
    pattern = str(Path(shards) / "shard-{000000..000006}.tar")
    ld = build_loader(cfg(pattern, epoch_samples=32), 0, 2)
    assert ld.batches_per_epoch == 4
    got = take(ld, 6)
    assert [e for e, _, _ in got] == [0, 0, 0, 0, 1, 1]
    st = ld.state_dict()
    again = build_loader(cfg(pattern, epoch_samples=32), 0, 2)
    again.load_state_dict([st, dict(st, rank=1)])
    assert again.epoch == 1 and len(take(again, 3)) == 3
    with pytest.raises(ValueError, match="epoch_samples"):
        build_loader(cfg(pattern), 0, 1)


def test_config_errors(shards: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown data.crops"):
        build_loader(DataConfig(shards=shards, crops="nope"), 0, 1)
    with pytest.raises(ValueError, match="manifest"):
        build_loader(DataConfig(shards=str(tmp_path)), 0, 1)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        build_loader(cfg(shards, batch_size=40), 0, 2)


def test_brace_patterns() -> None:
    from seer_pipeline.shards.reader import braceexpand, expand_pattern
    assert braceexpand("s-{008..010}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar"]
    assert braceexpand("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert [s.path for s in expand_pattern("d/{0..1}.tar, e/x.tar")] == ["d/0.tar", "d/1.tar", "e/x.tar"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2, signal.SIGINT])
def test_a_worker_signalled_while_it_starts_survives(shards: str, monkeypatch: pytest.MonkeyPatch,
                                                     signum: int) -> None:
    """SLURM's preemption signals every process of a task, loader workers included. A worker hit
    after torch installed its own SIGTERM handler (which kills the worker unless the parent sent
    it) and before worker_init_fn ignored the signals died, the rank failed without its save and
    the requeued job resumed from the save before (CI, test_slurm, seed-free). The loader starts
    a worker at each epoch, so a run meets this window once per epoch per worker; here the
    window is held open and the signal sent inside it."""
    import multiprocessing as mp
    import threading
    import time

    from seer_pipeline.train.signals import PreemptionFlag

    in_window = mp.Event()

    def slow_thread_name(name: str) -> None:  # the worker's next call after torch's handlers
        in_window.set()
        time.sleep(1.0)

    monkeypatch.setattr(torch.multiprocessing, "_set_thread_name", slow_thread_name)
    sent: list[int] = []

    def scheduler() -> None:
        if in_window.wait(60):
            for child in mp.active_children():
                os.kill(child.pid, signum)
                sent.append(child.pid)

    flag = PreemptionFlag()
    flag.install()  # as in the trainer: the rank's own process records the signal
    try:
        killer = threading.Thread(target=scheduler)
        killer.start()
        got = take(build_loader(cfg(shards, workers=1), 0, 1), 2)
        killer.join()
    finally:
        flag.restore()
    assert sent, "the worker never reached the window"
    assert len(got) == 2 and not flag.local  # the worker's signal is not the rank's
