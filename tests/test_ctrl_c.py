"""Ctrl-C as a terminal sends it: SIGINT to the whole process group of a real command.

Training: the first Ctrl-C saves at the next step and exits 75 (like SIGTERM) with a line saying
how to resume; a second one aborts at once (130). A shard build: one line, exit 130. Never a
KeyboardInterrupt traceback.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seer_pipeline.core.exit_codes import INTERRUPTED, PREEMPTED

from tests.test_trainer import _env as clean_env

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    return clean_env(PYTHONPATH=str(REPO))


def _as_from_a_terminal() -> None:
    """A terminal's Ctrl-C and hang-up reach a program whose SIGINT and SIGHUP are at their
    defaults. A test runner started in the background by a script (or under nohup) passes them
    on ignored, and a program must keep ignoring what it inherits ignored (that is how the shell
    shields background jobs from Ctrl-C), so these tests restore the defaults in the child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _start_train(run: Path, shards: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "seer_pipeline.train.cli", "--config", "cpu_tiny", "dist.nproc=2",
           "train.steps=500", "ckpt.every=1000", f"run.dir={run}", f"data.shards={shards}",
           "data.batch_size=2", "data.workers=1", "dist.timeout_s=30", "train.tensorboard=false"]
    # Its own session = its own process group, as a shell job has: killpg reaches all of it.
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_as_from_a_terminal)


def _steps(run: Path) -> int:
    m = run / "metrics.jsonl"
    return len([ln for ln in m.read_text().splitlines() if ln]) if m.exists() else 0


def _wait_for_steps(proc: subprocess.Popen, run: Path, n: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while _steps(run) < n:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)


def _signal_run(run: Path, shards: Path, steps: int, send) -> tuple[int, str]:  # noqa: ANN001
    """Start a 2-rank run, call `send(proc)` once `steps` are logged, wait: (exit code, output)."""
    proc = _start_train(run, shards)
    try:
        _wait_for_steps(proc, run, steps)
        send(proc)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out


def _no_traceback(out: str) -> None:
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-4000:]


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_75(tiny_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    rc, out = _signal_run(run, tiny_shards, 3, lambda p: os.killpg(p.pid, signal.SIGINT))
    assert rc == PREEMPTED, out[-4000:]
    _no_traceback(out)
    k = _steps(run)
    assert k >= 3
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{k:09d}"
    assert "SIGINT received: saving at step" in out
    assert "re-run the same command to resume" in out
    # One SIGINT per rank (the launcher's forward), not two: the ranks did not abort.
    assert "second Ctrl-C" not in out


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once(tiny_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _start_train(run, tiny_shards)
    try:
        _wait_for_steps(proc, run, 2)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.2)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == INTERRUPTED, out[-4000:]
    _no_traceback(out)
    assert "second Ctrl-C: aborting without saving" in out
    assert took < 30, took  # generous: the box is shared; the point is "not a save and not a hang"
    time.sleep(1)
    ps = subprocess.run(["pgrep", "-f", f"run.dir={run}"], capture_output=True, text=True)
    assert ps.stdout.strip() == "", "ranks left running: " + ps.stdout


@pytest.mark.slow
def test_ctrl_c_during_shard_build_is_one_line(photo_dir: Path, tmp_path: Path) -> None:
    photos = sorted(p for p in photo_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    # The same photos listed many times: every line is read, hashed and decoded (the duplicates
    # are found after that), so the build runs long enough to be interrupted: 4,800 lines took
    # 3.3 s on a quiet box, and a fixed 4 s wait let the build finish first; 48,000 take ~30 s,
    # and the signal goes once the build has opened its index.
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{p}\n" for _ in range(4000) for p in photos))
    out_dir = tmp_path / "shards"
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_prep.cli", "build", str(lst), "--out", str(out_dir),
         "--workers", "2", "--resize-short-side", "64"], cwd=REPO, env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=_as_from_a_terminal)
    try:
        deadline = time.monotonic() + 60
        while not (out_dir / ".seer-shards").is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # into the scan, with the workers running
        assert proc.poll() is None, "the build finished before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    _no_traceback(out + err)
    msg = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert msg == ["seer-shards build: interrupted (Ctrl-C); rerun the same command to finish"], err
    assert not (out_dir / "manifest.json").exists()


@pytest.mark.slow
def test_hangup_of_the_launcher_saves(tiny_shards: Path, tmp_path: Path) -> None:
    """The ranks sit in their own process group, so a closed terminal (SIGHUP to the launcher)
    must reach them as a SIGTERM: save and exit 75, not orphans that train on."""
    run = tmp_path / "run"
    rc, out = _signal_run(run, tiny_shards, 2, lambda p: os.kill(p.pid, signal.SIGHUP))
    assert rc == PREEMPTED, out[-4000:]
    assert "SIGTERM received: saving at step" in out
    k = _steps(run)
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{k:09d}"
