"""Issue #13, run folders: reading one never runs code, checkpoints are verified by content,
corrupt bookkeeping falls back with a warning, and one job owns a run folder at a time."""
from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seer_pipeline.checkpoint.checkpointer import Checkpointer, ckpt_config

# The modules this issue added are imported inside the tests, so that on the code before it
# each test fails on its own behaviour rather than the whole file on an import.

REPO = Path(__file__).resolve().parent.parent
STEP4, STEP8 = "step_000000004", "step_000000008"


class Planted:
    """Unpickling this creates the marker file (what a crafted pickle would do with os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((64, 64), float(step))}, "train": {"step": step}}


def _template() -> dict:
    return {"model": {"w": torch.zeros(64, 64)}, "train": {"step": -1}}


def _save(run: Path, steps=(4, 8), per_rank=None) -> Checkpointer:
    ck = Checkpointer(run, ckpt_config(every=1, keep_latest=3), config_yaml="a: 1\n")
    for s in steps:
        ck.save(s, _state(s), per_rank(s) if per_rank else {"rng": torch.tensor([s]), "loader": {"b": s}})
    return ck


def _rehash(step_dir: Path) -> None:
    """Record the planted file's hash, as an attacker with write access could: the unpickler,
    not the hash, must be what stops it."""
    from seer_pipeline.checkpoint import integrity
    meta = json.loads((step_dir / "meta.json").read_text())
    for name in meta["sha256"]:
        meta["sha256"][name] = integrity.hash_file(step_dir / name)
        meta["files"][name] = (step_dir / name).stat().st_size
    (step_dir / "meta.json").write_text(json.dumps(meta))


# -- nothing in a run folder runs code -------------------------------------------------------------
def test_planted_per_rank_payload_is_not_executed(tmp_path: Path, caplog) -> None:
    marker = tmp_path / "pwned"
    ck = _save(tmp_path / "run", steps=(8,), per_rank=lambda s: {"rng": Planted(marker)})
    assert not marker.exists()
    with caplog.at_level(logging.WARNING):
        got = ck.load_latest(_template)
    assert not marker.exists(), "loading the per-rank payload ran code"
    assert got is None  # the only checkpoint was refused ...
    assert "could not be loaded" in caplog.text and "open" in caplog.text  # ... naming the global


def test_planted_dcp_value_is_not_executed(tmp_path: Path, caplog) -> None:
    """A non-tensor DCP value (torch.load with weights_only off in DCP's default planner)."""
    marker = tmp_path / "pwned"
    ck = Checkpointer(tmp_path / "run", ckpt_config(every=1), config_yaml="a: 1\n")
    ck.save(4, _state(4), {"x": 1})
    ck.save(8, {"model": _state(8)["model"], "train": {"step": Planted(marker)}}, {"x": 1})
    with caplog.at_level(logging.WARNING):
        step, state, _, _ = ck.load_latest(_template)
    assert not marker.exists()
    assert step == 4 and state["train"]["step"] == 4  # fell back to the previous checkpoint


def test_planted_dcp_metadata_is_not_executed(tmp_path: Path, caplog, capsys) -> None:
    from seer_pipeline.weights.cli import main as ckpt_main

    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    ck = _save(run)
    step_dir = run / "checkpoints" / STEP8
    (step_dir / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    _rehash(step_dir)
    with caplog.at_level(logging.WARNING):
        step, _, _, _ = ck.load_latest(_template)
    assert not marker.exists(), "DCP .metadata ran code"
    assert step == 4
    assert "refusing to load global io.open" in caplog.text
    # seer-ckpt reads it the same way.
    meta = json.loads((step_dir / "meta.json").read_text())
    meta["config_yaml"] = "model: {trunk: regnety_tiny, hidden_dims: [], n_prototypes: 8}\n"
    (step_dir / "meta.json").write_text(json.dumps(meta))
    assert ckpt_main(["consolidate", str(step_dir), "--out", str(tmp_path / "t.pt")]) == 1
    assert not marker.exists()
    assert "refusing to load global io.open" in capsys.readouterr().err


def test_dcp_metadata_of_real_saves_passes_the_allow_list(tmp_path: Path) -> None:
    from seer_pipeline.checkpoint.safe_dcp import load_dcp_metadata

    ck = Checkpointer(tmp_path, ckpt_config(every=1), config_yaml="")
    state = {"model": {"w": torch.ones(3, dtype=torch.bfloat16), "i": torch.arange(4),
                       "cl": torch.ones(1, 2, 3, 3).to(memory_format=torch.channels_last)},
             "optim": {"lr": 0.1, "nesterov": False, "names": ["a", "b"], "none": None}}
    ck.save(1, state, {"rng": torch.get_rng_state()})
    with open(tmp_path / "checkpoints" / "step_000000001" / ".metadata", "rb") as f:
        md = load_dcp_metadata(f)
    assert "model.w" in md.state_dict_metadata and "optim.lr" in md.state_dict_metadata


def test_planted_submitit_result_is_not_executed(tmp_path: Path) -> None:
    from launch.status import run_status

    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    (run / "slurm" / "77").mkdir(parents=True)
    (run / "launch.json").write_text(json.dumps({"jobs": [{"job_id": "77", "executor": "local"}]}))
    (run / "slurm" / "77" / "77_0_result.pkl").write_bytes(pickle.dumps(("success", Planted(marker))))
    st = run_status(run)
    assert not marker.exists(), "seer-status ran code from a result file"
    assert "refusing to load global io.open" in st["error"]
    # A genuine result (plain containers) still reads.
    (run / "slurm" / "77" / "77_0_result.pkl").write_bytes(
        pickle.dumps(("success", {"rank": 0, "exit_code": 0})))
    assert run_status(run)["state"] == "COMPLETED"


def test_per_rank_payload_roundtrips_numpy_and_python_rng() -> None:
    import random

    import numpy as np

    from seer_pipeline.checkpoint.safe_dcp import pack, unpack

    st = {"numpy": np.random.get_state(), "python": random.getstate(), "t": torch.get_rng_state(),
          "loader": {"plan": [[1, 2]], "metrics": {"n": np.int64(3)}}}
    back = unpack(pack(st))
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], st["numpy"][1])
    assert back["numpy"][1].dtype == np.uint32 and back["python"] == st["python"]
    assert torch.equal(back["t"], st["t"]) and back["loader"]["metrics"]["n"] == 3
    np.random.set_state(back["numpy"])  # accepted as a real numpy state


# -- content hashes --------------------------------------------------------------------------------
def test_flipped_bytes_in_distcp_fall_back_to_previous(tmp_path: Path, caplog) -> None:
    ck = _save(tmp_path)
    step_dir = tmp_path / "checkpoints" / STEP8
    meta = json.loads((step_dir / "meta.json").read_text())
    assert set(meta["sha256"]) == {p.name for p in step_dir.iterdir() if p.name != "meta.json"}
    assert not list(step_dir.glob("*.sha256"))  # sidecars folded into meta.json
    data = next(step_dir.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 4096] = bytes(b ^ 0xFF for b in raw[mid:mid + 4096])  # same size, new content
    data.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        step, state, _, _ = ck.load_latest(_template)
    assert step == 4 and torch.equal(state["model"]["w"], torch.full((64, 64), 4.0))
    assert "content hash" in caplog.text and "trying the previous one" in caplog.text


def test_hashes_are_checked_by_a_share_of_ranks(tmp_path: Path) -> None:
    from seer_pipeline.checkpoint import integrity
    _save(tmp_path, steps=(4,))
    step_dir = tmp_path / "checkpoints" / STEP4
    meta = integrity.read_meta(step_dir)
    names = sorted(meta["sha256"])
    assert len(names) == 2  # one .distcp and .metadata
    shares = [integrity.verify_hashes(step_dir, meta, r, 2) for r in range(2)]
    assert sum(shares) == sum((step_dir / n).stat().st_size for n in names) and all(shares)


# -- corrupt bookkeeping -----------------------------------------------------------------------------
_OUTSIDE = json.dumps({"step": 8, "world_size": 1, "files": {}, "config_yaml": "",
                       "sha256": {"../../../../dev/zero": "0" * 64}})  # would never finish hashing


@pytest.mark.parametrize("content", ["{}", "[]", "{\"step\": 8}", "\xff\xfe", "{\"step\": 8, \"files\": 3}",
                                     _OUTSIDE])
def test_bad_meta_json_falls_back_with_one_warning(tmp_path: Path, caplog, content: str) -> None:
    ck = _save(tmp_path)
    (tmp_path / "checkpoints" / STEP8 / "meta.json").write_bytes(content.encode("latin-1"))
    with caplog.at_level(logging.WARNING):
        step, _, _, _ = ck.load_latest(_template)
    assert step == 4
    warns = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warns) == 1 and "\n" not in warns[0].getMessage() and STEP8 in warns[0].getMessage()


def test_latest_symlink_to_a_file_is_ignored_and_not_logged(tmp_path: Path, caplog) -> None:
    from launch.job import latest_checkpoint

    ck = _save(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET-TOKEN\n")
    latest = tmp_path / "checkpoints" / "latest"
    latest.unlink()
    latest.symlink_to(secret)
    with caplog.at_level(logging.WARNING):
        step, _, _, _ = ck.load_latest(_template)
        assert latest_checkpoint(tmp_path) == ""  # seer-status does not echo it either
    assert step == 8  # the scan finds the newest complete checkpoint
    assert "TOPSECRET" not in caplog.text and "symlink" in caplog.text
    latest.unlink()
    latest.write_text("TOPSECRET-TOKEN " * 10)  # a regular file that is not a step name
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert ck.load_latest(_template)[0] == 8
    assert "TOPSECRET" not in caplog.text


def _fake_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake = bin_dir / "scontrol"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    return calls


@pytest.mark.parametrize("content", ['{"count": 3, "hist', "[1, 2]", '{"count": "x"}'])
def test_truncated_requeues_json_still_requeues(tmp_path: Path, monkeypatch, caplog, content: str) -> None:
    from seer_pipeline.core.requeue import requeue_job

    calls = _fake_scontrol(tmp_path, monkeypatch)
    (tmp_path / "requeues.json").write_text(content)
    with caplog.at_level(logging.WARNING):
        assert requeue_job(tmp_path, 30, 10, "SIGUSR2")  # a preemption still requeues
    assert [c for c in calls.read_text().splitlines() if c.startswith("requeue")] == ["requeue 4242"]
    assert "counting requeues from 0" in caplog.text
    data = json.loads((tmp_path / "requeues.json").read_text())
    assert data["count"] == 1 and data["history"][0]["requeued"] is True


def test_launcher_and_trainer_share_one_requeues_writer(tmp_path: Path, monkeypatch) -> None:
    """launch.job books through seer_pipeline.core.requeue (one record shape, one writer)."""
    import launch.job as job_mod
    from seer_pipeline.core import requeue

    booked = []
    real = requeue.book_requeue
    monkeypatch.setattr(job_mod, "book_requeue", lambda *a, **k: booked.append(a) or real(*a, **k))
    (tmp_path / "requeues.json").write_text("{\"count\": 1,")  # truncated
    job = job_mod.TrainJob(argv=[], run_dir=str(tmp_path), max_requeues=5)
    assert job.checkpoint() is not None
    assert len(booked) == 1
    assert json.loads((tmp_path / "requeues.json").read_text())["count"] == 1
    src = (REPO / "launch" / "job.py").read_text()
    assert "atomic_write_json" not in src and "requeues.json\"" not in src


# -- one job per run folder --------------------------------------------------------------------------
def _hold(run: Path, job_id: str = "4242") -> subprocess.Popen:
    code = ("import sys, time; from seer_pipeline.core.runlock import acquire; "
            f"lock = acquire(sys.argv[1], job_id={job_id!r}); print('held', flush=True); time.sleep(120)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, "-c", code, str(run)], env=env, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.mark.parametrize("nproc", [1, 2])
def test_second_job_on_a_run_folder_stops_before_touching_it(
        tmp_path: Path, capsys, tiny_shards: Path, nproc: int) -> None:
    from seer_pipeline.core import runlock
    from seer_pipeline.train.cli import main

    run = tmp_path / "run"
    holder = _hold(run)
    try:
        (run / "metrics.jsonl").write_text('{"step": 1}\n')
        (run / "checkpoints" / "step_000000010.partial").mkdir(parents=True)
        t0 = time.monotonic()
        rc = main(["--config", "cpu_tiny", f"run.dir={run}", f"data.shards={tiny_shards}",
                   f"dist.nproc={nproc}", "train.steps=2"])
        took = time.monotonic() - t0
        err = capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert rc == runlock.LOCKED_EXIT, err
    assert f"job 4242 on host {socket.gethostname()} (pid {holder.pid})" in err
    assert took < 30, took  # at once, not after a collective timeout
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (run / "checkpoints" / "step_000000010.partial").is_dir()
    assert not (run / "logs").exists() and not (run / "config.yaml").exists()


def test_lock_is_released_when_the_holder_dies(tmp_path: Path) -> None:
    from launch.status import run_status
    from seer_pipeline.core import runlock

    holder = _hold(tmp_path)
    assert run_status(tmp_path)["lock_holder"] == f"job 4242 on host {socket.gethostname()} (pid {holder.pid})"
    with pytest.raises(runlock.RunLocked, match="pid"):
        _acquire_in_child(tmp_path)
    holder.kill()
    holder.wait()
    assert runlock.holder_if_locked(tmp_path) is None and run_status(tmp_path)["lock_holder"] == ""
    lock = runlock.acquire(tmp_path, job_id="99")
    assert runlock.read_holder(tmp_path)["job_id"] == "99"
    lock.release()


def _acquire_in_child(run: Path) -> None:
    """POSIX locks are per process: a second acquire must come from another process."""
    from seer_pipeline.core import runlock
    code = ("import sys; from seer_pipeline.core.runlock import acquire, RunLocked\n"
            "try:\n    acquire(sys.argv[1])\nexcept RunLocked as e:\n    print(e); sys.exit(3)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", code, str(run)], env=env, capture_output=True, text=True)
    if res.returncode == 3:
        raise runlock.RunLocked(run, {"pid": res.stdout})
    assert res.returncode == 0, res.stderr


def test_ranks_join_only_with_the_live_holders_token(tmp_path: Path, monkeypatch) -> None:
    from seer_pipeline.core import runlock
    holder = _hold(tmp_path)
    try:
        token = runlock.read_holder(tmp_path)["token"]
        monkeypatch.setenv(runlock.TOKEN_ENV, token)
        joined = runlock.acquire_or_join(tmp_path)  # a rank of the holder's job
        assert joined.fd is None and joined.holder["pid"] == holder.pid
        monkeypatch.setenv(runlock.TOKEN_ENV, "0" * 32)  # stale/forged token: no way in
        code = ("import sys; from seer_pipeline.core.runlock import acquire_or_join, RunLocked\n"
                "try:\n    acquire_or_join(sys.argv[1])\nexcept RunLocked:\n    sys.exit(3)")
        res = subprocess.run([sys.executable, "-c", code, str(tmp_path)],
                             env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True)
        assert res.returncode == 3
    finally:
        holder.kill()
        holder.wait()
