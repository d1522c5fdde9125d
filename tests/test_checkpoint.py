"""Checkpointer policy and recovery (one process), metrics truncation, resume config checks,
preemption flags and the requeue cap."""
from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import pytest
import torch

from seer_pipeline.checkpoint.checkpointer import Checkpointer, find_resumable, list_checkpoints
from seer_pipeline.config.base import ConfigError, to_container
from seer_pipeline.train.metrics import MetricsLogger, read_metrics
from seer_pipeline.core.requeue import requeue_job
from seer_pipeline.train.signals import PreemptionFlag
from seer_pipeline.config.train import check_resume_compatible, load_train_config


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((4, 3), float(step))}, "train": {"step": step}}


def _template() -> dict:
    return {"model": {"w": torch.zeros(4, 3)}, "train": {"step": -1}}


def _save_steps(run: Path, steps: list[int], **kw) -> Checkpointer:
    ck = Checkpointer(run, every=1, config_yaml="a: 1\n", **kw)
    for s in steps:
        ck.save(s, _state(s), {"rng": torch.tensor([s]), "loader": {"batches": s}})
    return ck


def test_keep_latest_and_milestones(tmp_path: Path) -> None:
    _save_steps(tmp_path, [1, 2, 3, 4, 5, 6], keep_latest=2, keep_every=3)
    assert sorted(s for s, _ in list_checkpoints(tmp_path / "checkpoints")) == [3, 5, 6]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000000006"


def test_load_roundtrip_with_per_rank_state(tmp_path: Path) -> None:
    ck = _save_steps(tmp_path, [4, 8], keep_latest=3)
    step, state, per_rank, meta = ck.load_latest(_template)
    assert step == 8 and state["train"]["step"] == 8 and meta["world_size"] == 1
    assert torch.equal(state["model"]["w"], torch.full((4, 3), 8.0))
    assert per_rank[0]["loader"] == {"batches": 8} and int(per_rank[0]["rng"]) == 8


class _Counter:
    """A global component: a tensor and a python value."""

    def __init__(self) -> None:
        self.w, self.n = torch.zeros(3), 0

    def state_dict(self) -> dict:
        return {"w": self.w, "n": self.n}

    def load_state_dict(self, sd: dict) -> None:
        self.w.copy_(sd["w"])
        self.n = int(sd["n"])


class _PerRank:
    def __init__(self, v: int) -> None:
        self.v, self.got = v, None

    def state_dict(self) -> dict:
        return {"v": self.v}

    def load_state_dict(self, states: list) -> None:
        self.got = states


def test_registered_components_are_collected_and_restored(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path, every=1)
    c, r = _Counter(), _PerRank(7)
    ck.register("counter", c)
    ck.register("thing", r, per_rank=True)
    with pytest.raises(ValueError, match="taken or reserved"):
        ck.register("counter", c)
    c.w += 2.5
    c.n = 3
    ck.save(5)
    c.w.zero_()
    c.n = 0
    late = _PerRank(0)  # a component the checkpoint does not hold gets None for its rank
    ck.register("late", late, per_rank=True)
    assert ck.restore() == 5
    assert torch.equal(c.w, torch.full((3,), 2.5)) and c.n == 3
    assert r.got == [{"v": 7}] and late.got == [None]
    seen = []
    with pytest.raises(RuntimeError, match="refused"):
        ck.restore(lambda meta: seen.append(meta["step"]) or (_ for _ in ()).throw(RuntimeError("refused")))
    assert seen == [5]
    with pytest.raises(TypeError):
        Checkpointer(tmp_path, 1)  # keyword-only


def test_truncated_checkpoint_is_skipped_for_previous(tmp_path: Path, caplog) -> None:
    ck = _save_steps(tmp_path, [4, 8], keep_latest=3)
    data = next(p for p in (tmp_path / "checkpoints" / "step_000000008").iterdir() if p.suffix == ".distcp")
    data.write_bytes(data.read_bytes()[:10])  # a torn write
    step, state, _, _ = ck.load_latest(_template)
    assert step == 4 and torch.equal(state["model"]["w"], torch.full((4, 3), 4.0))
    assert "skipping checkpoint" in caplog.text


def test_corrupt_content_falls_back_and_partial_is_ignored(tmp_path: Path, caplog) -> None:
    ck = _save_steps(tmp_path, [4, 8], keep_latest=3)
    step8 = tmp_path / "checkpoints" / "step_000000008"
    (step8 / ".metadata").write_bytes(b"garbage of the same kind" * 3)
    meta = json.loads((step8 / "meta.json").read_text())
    meta["files"][".metadata"] = (step8 / ".metadata").stat().st_size  # sizes agree, content bad
    (step8 / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "checkpoints" / "step_000000009.partial").mkdir()  # a save killed mid-way
    step, _, _, _ = ck.load_latest(_template)
    assert step == 4 and "could not be loaded" in caplog.text


def test_missing_latest_pointer_scans(tmp_path: Path) -> None:
    _save_steps(tmp_path, [2, 7], keep_latest=3)
    (tmp_path / "checkpoints" / "latest").unlink()
    assert [s for s, _, _ in find_resumable(tmp_path / "checkpoints")] == [7, 2]
    assert find_resumable(tmp_path / "nothing") == []


def test_metrics_drop_lines_past_checkpoint(tmp_path: Path) -> None:
    m = MetricsLogger(tmp_path, rank=0, tensorboard=True)
    for s in range(1, 8):
        m.log_step(s, {"loss": 1.0 / s, "lr": 0.1})
    m.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # torn last line from a kill -9
    m = MetricsLogger(tmp_path, rank=0, tensorboard=False, resumed_from=5)
    m.log_step(6, {"loss": 0.5, "lr": 0.1})
    m.log_step(7, {"loss": 0.25, "lr": 0.1})
    m.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert rows[5]["resumed_from"] == 5 and "resumed_from" not in rows[6]
    assert rows[6]["loss"] == 0.25 and any((tmp_path / "tb").iterdir())


def test_resume_config_policy() -> None:
    saved = to_container(load_train_config("cpu_tiny"))
    ok = load_train_config("cpu_tiny", ["train.steps=99", "ckpt.every=3", "dist.nproc=4"])
    assert set(check_resume_compatible(saved, ok)) == {"train.steps", "ckpt.every", "dist.nproc"}
    bad = load_train_config("cpu_tiny", ["model.n_prototypes=7", "data.batch_size=3"])
    with pytest.raises(ConfigError, match="model.n_prototypes.*data.batch_size|data.batch_size.*model"):
        check_resume_compatible(saved, bad)


def test_invalid_values_rejected() -> None:
    with pytest.raises(ConfigError, match="train.precision"):
        load_train_config("cpu_tiny", ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="unknown config key 'ckpt.asynch'"):
        load_train_config("cpu_tiny", ["ckpt.asynch=true"])
    assert load_train_config("cpu_tiny", ["ckpt.async=true"]).ckpt["async"] is True


def test_signal_only_sets_a_flag() -> None:
    flag = PreemptionFlag()
    flag.install()
    try:
        assert not flag.local
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag.local and flag.name() == "SIGUSR2"
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGUSR2) in (signal.SIG_DFL, None) or callable(signal.getsignal(signal.SIGUSR2))


def test_requeue_counts_against_cap(tmp_path: Path, monkeypatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    fake = bin_dir / "scontrol"  # records its arguments instead of talking to SLURM
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert requeue_job(tmp_path, 2, 10, "SIGUSR2") and requeue_job(tmp_path, 2, 20, "SIGTERM")
    assert not requeue_job(tmp_path, 2, 30, "SIGUSR2")  # over the cap: no third requeue
    assert log.read_text().splitlines() == ["requeue 4242", "requeue 4242"]
    data = json.loads((tmp_path / "requeues.json").read_text())
    assert data["count"] == 2 and [h["requeued"] for h in data["history"]] == [True, True, False]
    monkeypatch.delenv("SLURM_JOB_ID")
    assert not requeue_job(tmp_path, 2, 40, "SIGUSR2")  # not under SLURM: nothing to requeue


def test_presets_load_and_carry_the_seer_recipe() -> None:
    from seer_pipeline.models import list_trunks

    names = ["cpu_tiny", "seer_32gf", "seer_128gf", "seer_256gf", "seer_10b", "swav_rn50like"]
    cfgs = {n: load_train_config(n) for n in names}
    assert all(c.model.trunk in list_trunks() for c in cfgs.values())
    for n in names[1:5]:
        c = cfgs[n]
        assert (c.optim.base_lr, c.optim.weight_decay, c.optim.final_lr_ratio, c.optim.lars_trust,
                c.optim.momentum) == (0.3, 1e-5, 1e-3, 1e-3, 0.9), n
        assert (c.model.n_prototypes, c.model.head_bn, c.swav.freeze_prototypes_iters) == (16000, False, 313)
        assert c.data.batch_size == 16 and c.parallel.ac == "stage" and c.train.precision == "bf16"
    assert cfgs["seer_10b"].swav.epsilon == 0.03 and cfgs["seer_10b"].data.crops == "seer"
    assert cfgs["seer_256gf"].model.hidden_dims == [8192, 8192] and cfgs["seer_256gf"].model.out_dim == 256
    tiny = cfgs["cpu_tiny"]
    assert list(tiny.data.size_crops) == [28, 16] and tiny.train.threads == 1 and tiny.train.precision == "fp32"
