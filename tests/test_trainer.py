"""End-to-end `seer-train` on cpu_tiny with 2 local gloo ranks: bitwise resume after SIGUSR2,
kill -9 during a save, resume on another world size, a dead rank, consolidate and plot."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seer_pipeline.core.exit_codes import PREEMPTED
from tests import faultinject

REPO = Path(__file__).resolve().parent.parent
STEPS = 12


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SUBMITIT_", "TORCHELASTIC")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(extra)
    return env


def _cmd(run: Path, shards: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "seer_pipeline.train.cli", "--config", "cpu_tiny", "dist.nproc=2",
            f"train.steps={STEPS}", "ckpt.every=5", f"run.dir={run}", f"data.shards={shards}",
            "data.batch_size=2", "data.workers=1", "dist.timeout_s=20", "train.tensorboard=false", *extra]


def _run(cmd: list[str], timeout: float = 240, fault: str = "", **env: str) -> subprocess.CompletedProcess:
    """`fault`: "name:value" armed in every process of the run (tests/faultinject)."""
    full = faultinject.env(fault, _env(**env)) if fault else _env(**env)
    return subprocess.run(cmd, cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def usr2_after(cmd: list[str], run: Path, rows: int, wait_s: float = 200,
               exit_s: float = 120) -> tuple[int, str]:
    """Run `cmd`, send SIGUSR2 once `rows` steps are logged (or after `wait_s`), wait for it to
    exit: (exit code, output)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and len(_rows(run)) >= rows:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=exit_s)
    return proc.returncode, out


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, tiny_shards: Path) -> Path:
    """An uninterrupted run (with async periodic saves, which must not change anything)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    res = _run(_cmd(run, tiny_shards, "ckpt.async=true"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run


@pytest.mark.slow
def test_sigusr2_resume_is_bitwise_exact(reference_run: Path, tiny_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = _cmd(run, tiny_shards, "train.record_samples=true")
    rc, out = usr2_after(cmd, run, 7)  # once step 7 is logged: k = 7 or a little later
    assert rc == PREEMPTED, out[-3000:]
    k = len(_rows(run))
    assert 7 <= k < STEPS, out[-2000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{k:09d}"
    assert "preemption save took" in out

    res = _run(cmd)  # the same command again
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows, ref = _rows(run), _rows(reference_run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # each step exactly once
    assert [r.get("resumed_from") for r in rows if "resumed_from" in r] == [k]
    assert rows[k]["step"] == k + 1 and rows[k]["resumed_from"] == k
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]  # ==, not approx
    assert len({r["loss"] for r in ref}) > 1
    # train.record_samples: every step once per rank, and each epoch (3 steps of 2 x 2 images)
    # consumed the 12 samples of tiny_shards once across the resume.
    epochs: dict[int, list[int]] = {}
    for rank in (0, 1):
        recs = [json.loads(x) for x in (run / "samples" / f"rank{rank}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
        for r in recs:
            epochs.setdefault(r["epoch"], []).extend(r["uids"])
    assert sorted(epochs) == [0, 1, 2, 3]
    assert all(sorted(uids) == list(range(12)) for uids in epochs.values()), epochs


@pytest.mark.slow
def test_save_on_a_full_disk_fails_the_run_then_a_rerun_resumes_exactly(
        reference_run: Path, tiny_shards: Path, tmp_path: Path) -> None:
    """Found by the chaos soak (seed 2): every rank's write of a save failing (ENOSPC) raised
    DCP's CheckpointException, and each rank then hung at exit on its own loader worker."""
    run = tmp_path / "run"
    res = _run(_cmd(run, tiny_shards), fault="save_enospc:10")  # hung before: TimeoutExpired
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_000000005"
    # DCP's CheckpointException is a BaseException: it must still reach each rank's log.
    for r in (0, 1):
        text = (run / "logs" / f"rank{r}.log").read_text()
        assert f"rank {r} failed" in text and "No space left on device" in text, text[-2000:]
    res = _run(_cmd(run, tiny_shards))  # space freed: the same command again
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert [r["loss"] for r in _rows(run)] == [r["loss"] for r in _rows(reference_run)]
    assert not list(ck.glob("*.partial"))


@pytest.mark.slow
def test_kill9_during_save_then_resume_on_one_rank(tiny_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = _run(_cmd(run, tiny_shards), fault="kill_in_save:10")
    assert res.returncode != 0
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_000000005"
    assert (ck / "step_000000010.partial").is_dir() and not (ck / "step_000000010").exists()
    # Resume with one rank: DCP reshards model and optimizer, the loader redistributes the epoch.
    cmd = [c if c != "dist.nproc=2" else "dist.nproc=1" for c in _cmd(run, tiny_shards)]
    res = _run(cmd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[5]["resumed_from"] == 5
    assert "no longer bitwise" in res.stdout + res.stderr
    assert rows[-1]["data_samples_repeated"] == 0  # the loader redistributed the epoch
    assert not (ck / "step_000000010.partial").exists()  # stale partial save cleaned up
    # Config keys that would change the trajectory are refused on resume.
    res = _run(_cmd(run, tiny_shards, "optim.base_lr=0.1", f"train.steps={STEPS + 2}"))
    assert res.returncode != 0 and "optim.base_lr" in res.stdout + res.stderr


@pytest.mark.slow
def test_dead_rank_fails_the_job_within_timeout(tiny_shards: Path, tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed as step 3 starts. The bound is the configured one, kept by the
    launcher, not a clock read here: after a death it gives the other ranks dist.timeout_s + 10 s
    (20 + 10 here) to notice by themselves, then kills them, which shows as exit code -9. So rank
    0 exiting 1 means its collective failed (or timed out) and it stopped within that bound; the
    test's own timeout is far beyond it and would fail the test, never pass it."""
    res = _run(_cmd(tmp_path / "run", tiny_shards), timeout=900, fault="kill_rank:1")
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-3000:]
    assert "launcher: rank 1 failed (exit code -9); stopping the other ranks" in res.stderr, out[-3000:]
    assert "rank 0: a collective failed" in res.stdout, out[-3000:]  # the dead-rank line, no traceback
    assert "launcher: job failed: rank 1 exited with -9 (all exit codes: [1, -9])" in res.stderr, out[-3000:]


@pytest.mark.slow
def test_consolidate_and_plot(reference_run: Path, tmp_path: Path) -> None:
    from seer_pipeline.weights.cli import main as ckpt_main
    from seer_pipeline.models import build_trunk
    from seer_pipeline.train.plot import main as plot_main

    out = tmp_path / "trunk.pt"
    assert ckpt_main(["consolidate", str(reference_run), "--out", str(out)]) == 0
    sd = torch.load(out, weights_only=True)
    trunk = build_trunk("cpu_tiny")
    init = {k: v.clone() for k, v in trunk.state_dict().items()}
    trunk.load_state_dict(sd, strict=True)
    assert any(not torch.equal(init[k], v) for k, v in sd.items() if v.is_floating_point())
    assert json.loads(Path(str(out) + ".json").read_text())["step"] == STEPS
    png = tmp_path / "p.png"
    assert plot_main([str(reference_run), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # init.weights warm-starts a new run from those trunk weights (weights only, step 0).
    run2 = tmp_path / "warm"
    res = _run(_cmd(run2, _shards_of(reference_run), f"init.weights={out}", "train.steps=2"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "warm start" in res.stdout and [r["step"] for r in _rows(run2)] == [1, 2]


def _shards_of(run: Path) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.load(run / "config.yaml").data.shards


class _NaNLoader:
    """Stands in for the data loader to feed non-finite pixels (the trainer must stop)."""
    epoch, batches_per_epoch = 0, 10

    def __iter__(self):
        while True:
            yield [torch.full((2, 3, s, s), float("nan")) for s in (28, 28, 16, 16, 16, 16)]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, states: list) -> None:
        pass

    def metrics(self) -> dict:
        return {}


@pytest.mark.slow
def test_nonfinite_loss_stops_with_step_and_score_stats(tiny_shards: Path, tmp_path: Path) -> None:
    from seer_pipeline.distributed.setup import DistEnv
    from seer_pipeline.config.train import load_train_config
    from seer_pipeline.train.trainer import NonFiniteLossError, Trainer

    cfg = load_train_config("cpu_tiny", [f"run.dir={tmp_path}", f"data.shards={tiny_shards}",
                                         "data.batch_size=2", "data.workers=0", "train.tensorboard=false"])
    tr = Trainer(cfg, DistEnv(0, 1, 0, 1, "127.0.0.1", 0, "single"), torch.device("cpu"))
    tr.loader = _NaNLoader()
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 1 .*scores"):
        tr.train()
    assert not (tmp_path / "checkpoints" / "latest").exists()  # nothing saved from a NaN state
