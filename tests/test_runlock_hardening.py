"""Issue #24: RUN/.lock is opened without following links and must be a regular file.

A `.lock` symlink made seer-train truncate its target (a dangling one created it); a FIFO or a
directory gave `Invalid argument` or a traceback. Each is now refused with one line, and
nothing outside the run folder is touched."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from seer_pipeline.core import runlock


def _train(run: Path, shards: Path, capsys) -> tuple[int, str]:
    from seer_pipeline.train.cli import main

    # dist.nproc=2: the launcher takes the lock before any rank starts (nothing else runs)
    rc = main(["--config", "cpu_tiny", f"run.dir={run}", f"data.shards={shards}",
               "dist.nproc=2", "train.steps=1"])
    return rc, capsys.readouterr().err


def _in_thread(fn, timeout: float = 30.0):  # noqa: ANN001, ANN202
    """Run fn, failing (rather than hanging the suite) if it blocks, e.g. opening a FIFO."""
    out: dict = {}

    def body() -> None:
        try:
            out["v"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            out["e"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "blocked"
    if "e" in out:
        raise out["e"]
    return out.get("v")


def test_symlink_lock_does_not_truncate_its_target(tmp_path: Path, capsys, tiny_shards: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    (run / ".lock").symlink_to(victim)
    rc, err = _train(run, tiny_shards, capsys)
    assert rc == runlock.LOCKED_EXIT
    assert victim.read_text() == "keep me\n"
    line = err.strip().splitlines()
    assert len(line) == 1 and "symbolic link" in line[0] and ".lock" in line[0], err
    assert "Traceback" not in err


def test_dangling_symlink_lock_does_not_create_its_target(tmp_path: Path, capsys, tiny_shards: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    target = tmp_path / "created_by_us"
    (run / ".lock").symlink_to(target)
    rc, err = _train(run, tiny_shards, capsys)
    assert rc == runlock.LOCKED_EXIT and "symbolic link" in err
    assert not target.exists() and not os.path.lexists(target)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_fifo_or_directory_lock_is_refused_in_one_line(tmp_path: Path, capsys, kind: str, tiny_shards: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    if kind == "fifo":
        os.mkfifo(run / ".lock")
    else:
        (run / ".lock").mkdir()
    rc, err = _in_thread(lambda: _train(run, tiny_shards, capsys))
    assert rc == runlock.LOCKED_EXIT
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert ("a FIFO" if kind == "fifo" else "a directory") in err
    # readers (seer-status, seer-submit) neither hang nor crash on it
    from launch.status import run_status

    assert _in_thread(lambda: runlock.read_holder(run)) == {}
    with pytest.raises(runlock.RunLockError):
        _in_thread(lambda: runlock.is_locked(run))
    assert _in_thread(lambda: run_status(run))["lock_holder"] == ""


def test_hard_linked_lock_does_not_truncate_the_other_name(tmp_path: Path, capsys, tiny_shards: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    os.link(victim, run / ".lock")
    rc, err = _train(run, tiny_shards, capsys)
    assert rc == runlock.LOCKED_EXIT and "hard link" in err
    assert victim.read_text() == "keep me\n"


def test_regular_lock_still_works_and_is_written(tmp_path: Path) -> None:
    lock = runlock.acquire(tmp_path, job_id="7")
    try:
        assert (tmp_path / ".lock").is_file() and not (tmp_path / ".lock").is_symlink()
        assert runlock.read_holder(tmp_path)["job_id"] == "7"
    finally:
        lock.release()
