"""Checkpointer policy and recovery (one process), metrics truncation, resume config checks,
preemption flags and the requeue cap."""
from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path
from typing import Any

import pytest
import torch

from seer_pipeline.checkpoint.checkpointer import Checkpointer, ckpt_config
from seer_pipeline.checkpoint.layout import find_resumable, list_checkpoints
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
    ck = Checkpointer(run, ckpt_config(every=1, **kw), config_yaml="a: 1\n")
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
    ck = Checkpointer(tmp_path, ckpt_config(every=1))
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
        Checkpointer(tmp_path, ckpt_config(), 0)  # rank and world size are keyword-only
    with pytest.raises(TypeError, match="no field 'evry'"):
        ckpt_config(evry=3)


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
    # Longer on the same schedule: train.steps grows with optim.total_steps pinned to the saved one.
    ok = load_train_config("cpu_tiny", ["train.steps=99", "optim.total_steps=30", "ckpt.every=3",
                                        "dist.nproc=4"])
    assert set(check_resume_compatible(saved, ok)) == {"train.steps", "optim.total_steps", "ckpt.every",
                                                       "dist.nproc"}
    longer = load_train_config("cpu_tiny", ["train.steps=99"])  # a 99-step cosine: another trajectory
    with pytest.raises(ConfigError, match="optim.total_steps=30"):
        check_resume_compatible(saved, longer)
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


@pytest.fixture
def scontrol_calls(tmp_path: Path, monkeypatch) -> Path:
    """Inside SLURM job 4242, with an `scontrol` that appends its arguments to the file returned."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    fake = bin_dir / "scontrol"  # records its arguments instead of talking to SLURM
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    return log


def test_requeue_counts_against_cap(tmp_path: Path, monkeypatch, scontrol_calls: Path) -> None:
    log = scontrol_calls
    assert requeue_job(tmp_path, 2, 10, "SIGUSR2") and requeue_job(tmp_path, 2, 20, "SIGTERM")
    assert not requeue_job(tmp_path, 2, 30, "SIGUSR2")  # over the cap: no third requeue
    calls = log.read_text().splitlines()  # besides `-o show job 4242`: was the job cancelled?
    assert [c for c in calls if c.startswith("requeue")] == ["requeue 4242", "requeue 4242"]
    data = json.loads((tmp_path / "requeues.json").read_text())
    assert data["count"] == 2 and [h["requeued"] for h in data["history"]] == [True, True, False]
    monkeypatch.delenv("SLURM_JOB_ID")
    assert not requeue_job(tmp_path, 2, 40, "SIGUSR2")  # not under SLURM: nothing to requeue


def test_ctrl_c_under_slurm_is_an_operator_stop_not_requeued(tmp_path: Path, scontrol_calls: Path) -> None:
    """Ctrl-C of an srun (or scancel --signal=INT) stops the run: saved, booked, not requeued."""
    assert not requeue_job(tmp_path, 5, 10, "SIGINT")
    assert not scontrol_calls.exists()  # scontrol never ran
    data = json.loads((tmp_path / "requeues.json").read_text())
    assert data["count"] == 0 and [(h["reason"], h["requeued"]) for h in data["history"]] == [("SIGINT", False)]
    assert requeue_job(tmp_path, 5, 20, "SIGTERM")  # the scheduler's signal still requeues


@pytest.mark.parametrize("state,restarts,requeued,runs_scontrol", [
    ("RUNNING", "0", True, True),  # a signal to a running job (USR2 before the time limit, TERM)
    # `scontrol requeue` or a preemption: SLURM requeues it already (Restarts 0 -> 1); a second
    # `scontrol requeue` would fail ("Job is pending execution") and was logged as an error.
    ("COMPLETING", "1", True, False),
    ("COMPLETING", "0", False, False),  # `scancel`: the owner cancelled it; it must not come back
])
def test_requeue_refused_for_a_cancelled_job(tmp_path: Path, monkeypatch, state: str, restarts: str,
                                             requeued: bool, runs_scontrol: bool) -> None:
    """Found by the chaos soak (seed 1): `scancel` sends the tasks the same SIGTERM as a
    preemption, and the trainer requeued the job its owner had just cancelled."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    fake = bin_dir / "scontrol"  # `show job` answers as slurmctld did in the soak; calls recorded
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n"
                    f"[ \"$2\" = show ] && echo 'JobId=4242 JobName=seer JobState={state} Reason=None "
                    f"Requeue=1 Restarts={restarts} BatchFlag=1'\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)  # the job's first run
    assert requeue_job(tmp_path, 5, 10, "SIGTERM") is requeued
    assert ("requeue 4242" in log.read_text().splitlines()) is runs_scontrol
    data = json.loads((tmp_path / "requeues.json").read_text())
    assert data["count"] == int(requeued) and data["history"][0].get("cancelled", False) is not requeued
    assert data["history"][0].get("by_scheduler", False) is (requeued and not runs_scontrol)


def _bn_save_and_resume(rank: int, world: int, run_dir: str) -> dict[str, list[torch.Tensor]]:
    """BN statistics on one rank: 6 steps uninterrupted; 6 steps with a save after step 3; the
    last 3 steps again after a restore of that save. Each rank sees its own data."""
    from seer_pipeline.train.state import ModelState, RankBNStats, bn_buffers
    from seer_pipeline.train.trainer import average_bn_stats

    data = [torch.randn(8, 3, generator=torch.Generator().manual_seed(100 * rank + i)) for i in range(6)]

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).train()

    def steps(model: torch.nn.Module, xs: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for x in xs:
                model(x)  # training mode: updates the running statistics

    def checkpointer(model: torch.nn.Module) -> tuple[Checkpointer, Any]:
        bn = RankBNStats([model], rank, world)
        ck = Checkpointer(run_dir, ckpt_config(every=0), rank=rank, world_size=world)
        ck.register("model", ModelState(model))
        ck.register("bn", bn, per_rank=True)
        ck.before_save(lambda: bn.average(average_bn_stats), after=bn.restore_own)  # as the trainer
        return ck, bn

    ref = fresh()
    steps(ref, data)
    cut = fresh()
    ck, bn = checkpointer(cut)
    steps(cut, data[:3])
    own = [b.clone() for b in bn_buffers(cut)]
    ck.save(3)  # a preemption save: a step the periodic saves skip
    steps(cut, data[3:])
    again = fresh()
    ck2, _ = checkpointer(again)
    assert ck2.restore() == 3
    steps(again, data[3:])
    saved = fresh()  # the checkpoint's model: the mean over ranks (what export reads)
    ck3 = Checkpointer(run_dir, ckpt_config(every=0), rank=rank, world_size=world)
    ck3.register("model", ModelState(saved))
    ck3.restore()
    return {"ref": bn_buffers(ref), "cut": bn_buffers(cut), "again": bn_buffers(again),
            "own3": own, "saved": [b.clone() for b in bn_buffers(saved)]}


def test_a_save_does_not_change_bn_statistics_and_resume_restores_them(tmp_path: Path) -> None:
    """Found by the chaos soak (seed 1): saves averaged the ranks' BN running statistics in
    place, so a preemption save at a step the periodic saves skip gave a final model that an
    uninterrupted run never has (losses equal, running_mean/var not)."""
    from seer_pipeline.distributed.testing import run_distributed

    out = run_distributed(_bn_save_and_resume, 2, str(tmp_path / "run"))
    for r in out:
        assert all(torch.equal(a, b) for a, b in zip(r["ref"], r["cut"])), "the save changed the run"
        assert all(torch.equal(a, b) for a, b in zip(r["ref"], r["again"])), "the resume is not exact"
    assert not all(torch.equal(a, b) for a, b in zip(out[0]["ref"], out[1]["ref"]))  # ranks differ
    mean = [(a.double() + b.double()) / 2 for a, b in zip(out[0]["own3"], out[1]["own3"])]
    for r in out:
        assert all(torch.allclose(m.float(), s) for m, s in zip(mean, r["saved"]))


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


# -- cost of a save and a resume at 496 ranks (issue #20) -------------------------------------------
class _Loaderish:
    """A per-rank component shaped like the loader: progress that differs per rank (summary keys)
    and settings that do not."""

    def __init__(self, rank: int) -> None:
        self.rank, self.got = rank, None

    def state_dict(self) -> dict:
        return {"rank": self.rank, "outputs": [self.rank, 2 * self.rank], "seed": 7, "big": [0] * 64}

    def load_state_dict(self, states: list) -> None:
        self.got = states


def _lay_out(run: Path, world: int, step: int = 3) -> None:
    """A `world`-rank checkpoint written as `world` real ranks would write it: DCP's save steps
    (local plans, the coordinator's global plan, each rank's write, finish) run here per rank,
    and rank 0's commit is the checkpointer's own."""
    import time

    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    from seer_pipeline.checkpoint import safe_dcp

    tmp = run / "checkpoints" / f"step_{step:09d}.partial"
    tmp.mkdir(parents=True)
    cks = [Checkpointer(run, ckpt_config(every=1), rank=r, world_size=world, config_yaml="a: 1\n")
           for r in range(world)]
    for r, ck in enumerate(cks):
        ck.register("train", _Counter())
        ck.register("loader", _Loaderish(r), per_rank=True, summary=("rank", "outputs"))
        ck.register("rng", _PerRank(r), per_rank=True)
    summaries = [{"loader": {"rank": r, "outputs": [r, 2 * r]}} for r in range(world)]
    planners, writers, plans = [], [], []
    for r, ck in enumerate(cks):
        state, mine = ck.collect()
        sd = ck.full_state(state, mine, summaries if r == 0 else None)
        sd[f"shard{r}"] = torch.full((2,), float(r))  # this rank's own shard of the model
        pl, wr = DefaultSavePlanner(), safe_dcp.HashingFileSystemWriter(tmp)
        pl.set_up_planner(state_dict=sd, storage_meta=wr.storage_meta(), is_coordinator=r == 0)
        wr.set_up_storage_writer(r == 0, rank=r, use_collectives=True)
        planners.append(pl)
        writers.append(wr)
        plans.append(wr.prepare_local_plan(pl.create_local_plan()))
    global_plans, metadata = planners[0].create_global_plan(plans)
    global_plans = writers[0].prepare_global_plan(global_plans)
    results = [writers[r].write_data(planners[r].finish_plan(global_plans[r]), planners[r]).wait()
               for r in range(world)]
    writers[0].finish(metadata, results)
    cks[0]._finalize(step, tmp, time.monotonic(), writers[0].files)


class _Opens:
    """Files opened under `root` while active (an audit hook: sees every open, Python or C)."""

    active: list = []  # audit hooks cannot be removed: one, installed once, feeds the active counter
    installed = False

    def __init__(self, root: Path) -> None:
        self.root, self.paths = str(root), []
        if not _Opens.installed:
            import sys
            sys.addaudithook(lambda ev, args: ev == "open" and _Opens.active and _Opens.active[-1]._see(args))
            _Opens.installed = True

    def _see(self, args: tuple) -> None:
        if isinstance(args[0], (str, bytes, os.PathLike)) and os.fsdecode(args[0]).startswith(self.root):
            self.paths.append(os.fsdecode(args[0]))

    def __enter__(self) -> "_Opens":
        _Opens.active.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _Opens.active.remove(self)


WORLD_496 = 496  # SEER's largest run: 512 GPUs, of which the paper's 10B logs show 496 in use


@pytest.fixture(scope="module")
def ckpt_496(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("w496") / "run"
    _lay_out(run, WORLD_496)
    return run


def _restore_496(ckpt: Path, rank: int, world: int, *extra: tuple[str, Any]) -> tuple[Any, Any, Any]:
    """Restore the 496-rank folder as rank `rank` of `world`: (loader, rng, files opened)."""
    ck = Checkpointer(ckpt, ckpt_config(every=1), rank=rank, world_size=world)
    loader, rng = _Loaderish(rank), _PerRank(-1)
    for name, component in extra:
        ck.register(name, component)
    ck.register("loader", loader, per_rank=True, summary=("rank", "outputs"))
    ck.register("rng", rng, per_rank=True)
    with _Opens(ckpt) as opens:
        assert ck.restore() == 3
    return loader, rng, opens


@pytest.mark.parametrize("rank", [0, 1, 255, 495])
def test_resume_opens_per_rank_do_not_grow_with_world_size(ckpt_496: Path, rank: int) -> None:
    loader, rng, opens = _restore_496(ckpt_496, rank, WORLD_496, ("train", _Counter()))
    # `latest`, meta.json, its share of files to hash (497 over 496 ranks: 1 or 2), DCP's
    # .metadata, its own file, rank 0's (per-rank entries, summaries) and the files DCP's dedup
    # gave the replicated values to (here `train` and `config`: ranks 1 and 2). Before: 496+.
    assert len(opens.paths) <= 9, " ".join(p.rsplit("/", 1)[1] for p in opens.paths)
    # ... and every rank still gets what it needs of every rank: the loader's progress of all
    # 496, its own state in full; other state of other ranks is not read.
    assert [s["outputs"] for s in loader.got] == [[r, 2 * r] for r in range(WORLD_496)]
    assert [s["rank"] for s in loader.got] == list(range(WORLD_496))
    assert loader.got[rank]["big"] == [0] * 64 and loader.got[100]["seed"] == 7
    assert rng.got[rank] == {"v": rank} and sum(s is not None for s in rng.got) == len({0, rank})


def test_resume_on_another_world_size_reads_the_summaries(ckpt_496: Path) -> None:
    loader, rng, opens = _restore_496(ckpt_496, 600, 640)  # a rank that did not exist
    assert len(opens.paths) <= 9, " ".join(p.rsplit("/", 1)[1] for p in opens.paths)
    assert [s["outputs"] for s in loader.got] == [[r, 2 * r] for r in range(WORLD_496)]
    assert rng.got[0] == {"v": 0} and all(s is None for s in rng.got[1:])


def test_checkpoint_without_summaries_reads_every_rank(ckpt_496: Path, tmp_path: Path) -> None:
    """Checkpoints saved before `rank_summaries` still load, the old way (one open per rank):
    the figure docs/benchmarks.md gives for the code before this change."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(ckpt_496, run)
    meta_p = run / "checkpoints" / "step_000000003" / "meta.json"
    meta = json.loads(meta_p.read_text())
    del meta["rank_summaries"]
    meta_p.write_text(json.dumps(meta))
    ck = Checkpointer(run, ckpt_config(every=1), rank=7, world_size=WORLD_496)
    loader = _Loaderish(7)
    ck.register("loader", loader, per_rank=True)
    with _Opens(run) as opens:
        assert ck.restore() == 3
    assert len(opens.paths) >= WORLD_496
    assert [s["big"] for s in loader.got] == [[0] * 64] * WORLD_496


def test_rank0_commit_touches_no_rank_files(tmp_path: Path, monkeypatch) -> None:
    """Each rank fsyncs its own files inside DCP's write (before the final collective); rank 0's
    commit opens only meta.json, `latest` and the folders it fsyncs, whatever the world size."""
    import time
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ck = Checkpointer(tmp_path, ckpt_config(every=1), config_yaml="a: 1\n")
    ck.register("train", _Counter())
    t0 = time.monotonic()
    state, mine = ck.collect()
    from seer_pipeline.checkpoint import safe_dcp
    import torch.distributed.checkpoint as dcp
    tmp = tmp_path / "checkpoints" / "step_000000001.partial"
    tmp.mkdir(parents=True)
    writer = safe_dcp.HashingFileSystemWriter(tmp)
    dcp.save(ck.full_state(state, mine, [{}]), checkpoint_id=str(tmp), storage_writer=writer, no_dist=True)
    data = sorted(p.name for p in tmp.iterdir() if p.suffix == ".distcp")
    assert data and all(any(s.endswith("/" + n) for s in synced) for n in data)  # fsynced while written
    assert set(writer.files) == {*data, ".metadata"}  # sizes and hashes came with the results
    big = {f"__{r}_0.distcp": (1, "0" * 64) for r in range(WORLD_496)}  # as if 496 ranks wrote
    with _Opens(tmp_path) as opens:
        ck._finalize(1, tmp, t0, {**writer.files, **big})
    assert len(opens.paths) <= 6, " ".join(p.rsplit("/", 1)[1] for p in opens.paths)
    meta = json.loads((tmp_path / "checkpoints" / "step_000000001" / "meta.json").read_text())
    assert len(meta["files"]) == WORLD_496 + len(data) + 1 - len(set(data) & set(big))


# -- purging never holds up a step or a preemption save; one policy owner --------------------------
def test_purge_runs_in_the_background_and_never_in_a_preemption_save(tmp_path: Path, monkeypatch) -> None:
    import shutil
    import threading

    from seer_pipeline.checkpoint import layout as mod

    release, started = threading.Event(), threading.Event()
    real_rmtree = shutil.rmtree

    def slow_rmtree(path, *a, **kw) -> None:  # a purge of a 10B checkpoint on a slow filesystem
        started.set()
        assert release.wait(60)
        real_rmtree(path, *a, **kw)

    monkeypatch.setattr(mod.shutil, "rmtree", slow_rmtree)
    ck = Checkpointer(tmp_path, ckpt_config(every=1, keep_latest=1), config_yaml="a: 1\n")
    ck.register("train", _Counter())
    ck.after_step(1, last=False, preempted=False)
    ck.after_step(2, last=False, preempted=False)  # returns while step 1 is still being deleted
    assert started.wait(30)
    ckd = tmp_path / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckd)] == [2]  # step 1 moved aside at once
    assert ck._purger is not None and ck._purger.is_alive()
    ck.after_step(3, last=False, preempted=True)  # preemption save: nothing purged
    assert [s for s, _ in list_checkpoints(ckd)] == [3, 2]
    assert (ckd / "latest").read_text().strip() == "step_000000003"
    release.set()
    ck.join_purge()
    assert not list(ckd.glob(".trash.*")) and [s for s, _ in list_checkpoints(ckd)] == [3, 2]


def test_after_step_decides_periodic_final_and_preemption_saves(tmp_path: Path) -> None:
    saved: list[tuple[int, bool]] = []
    ck = Checkpointer(tmp_path, ckpt_config(every=3, keep_latest=5, save_final=True), config_yaml="")
    ck.register("train", _Counter())
    real = ck.save

    def spy(step: int, *a, blocking: bool = True, **kw) -> float:
        saved.append((step, blocking))
        return real(step, *a, blocking=blocking, **kw)

    ck.save = spy
    for s in range(1, 8):
        ck.after_step(s, last=s == 7, preempted=False)
    assert saved == [(3, True), (6, True), (7, True)]  # every 3, and the final one
    assert ck.after_step(7, last=True, preempted=False) == 0.0  # already saved: nothing new
    assert ck.after_step(8, last=False, preempted=True) is not None
    assert saved[-1] == (8, True) and [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [8, 7, 6, 3]
    ck2 = Checkpointer(tmp_path / "b", ckpt_config(every=0, save_final=False), config_yaml="")
    ck2.register("train", _Counter())
    assert ck2.after_step(5, last=True, preempted=False) is None
    assert list_checkpoints(tmp_path / "b" / "checkpoints") == []


class _Tensors:
    def __init__(self, w: torch.Tensor) -> None:
        self.w = w

    def state_dict(self) -> dict:
        return {"w": self.w}

    def load_state_dict(self, sd: dict) -> None:
        self.w.copy_(sd["w"])


@pytest.mark.gpu  # pinned staging is the CUDA path (conftest skips it on CPU, and CI allows that)
def test_async_saves_stage_into_the_same_pinned_buffers_on_cuda(tmp_path: Path) -> None:
    w = torch.ones(1 << 16, device="cuda")
    ck = Checkpointer(tmp_path, ckpt_config(every=1, keep_latest=3, **{"async": True}))
    ck.register("model", _Tensors(w))
    staged, real = [], ck._stager.stage
    ck._stager.stage = lambda sd, **kw: staged.append(real(sd, **kw)) or staged[-1]
    for step in (1, 2):
        ck.save(step, blocking=False)
        ck.wait()
        w += 1
    a, b = staged[0]["model"]["w"], staged[1]["model"]["w"]
    assert a.device.type == "cpu" and a.is_pinned() and a.data_ptr() == b.data_ptr()
    w.zero_()
    assert ck.restore() == 2 and float(w[0]) == 2.0


def test_before_save_changes_are_undone_in_reverse_even_when_the_save_fails(tmp_path: Path) -> None:
    """What a before-save hook changes for the save (BN means) never outlives it: the `after`s
    run last-registered first, also when writing the checkpoint raised."""
    class Boom:
        def state_dict(self) -> dict:
            raise OSError(28, "No space left on device")

        def load_state_dict(self, sd: dict) -> None:
            pass

    calls: list[str] = []
    ck = Checkpointer(tmp_path / "run", ckpt_config(every=0), rank=0, world_size=1)
    ck.register("boom", Boom())
    ck.before_save(lambda: calls.append("a"), after=lambda: calls.append("undo a"))
    ck.before_save(lambda: calls.append("b"), after=lambda: calls.append("undo b"))
    with pytest.raises(OSError, match="No space"):
        ck.save(1)
    assert calls == ["a", "b", "undo b", "undo a"]
    assert list_checkpoints(tmp_path / "run") == []
