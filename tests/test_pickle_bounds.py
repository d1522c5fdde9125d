"""Issue #24: a tiny pickle of shared nested lists (no globals) must not exhaust seer-status.

382 bytes of lists, each holding the previous one twice through the memo, describe 2**60
objects: printing the result took 2.4 GB and 45 s before a MemoryError. The restricted
unpickler now bounds what it returns, and seer-status bounds what it prints."""
from __future__ import annotations

import json
import pickle
import resource
import time
from pathlib import Path

import pytest

from seer_pipeline.core import safe_pickle


def _bomb(levels: int = 60, width: int = 2) -> bytes:
    x: list = []
    for _ in range(levels):
        x = [x] * width
    return pickle.dumps(("success", x), protocol=2)


def _run_with_result(tmp_path: Path, payload: bytes) -> Path:
    run = tmp_path / "run"
    (run / "slurm" / "77").mkdir(parents=True)
    (run / "launch.json").write_text(json.dumps({"jobs": [{"job_id": "77", "executor": "local"}]}))
    (run / "slurm" / "77" / "77_0_result.pkl").write_bytes(payload)
    return run


def test_the_bomb_is_small_and_holds_no_globals() -> None:
    data = _bomb()
    assert len(data) < 500
    assert not any(op.name in ("GLOBAL", "STACK_GLOBAL", "REDUCE") for op, _, _ in
                   __import__("pickletools").genops(data))


@pytest.mark.parametrize("levels,width,match", [(60, 2, "nested deeper than 16"),
                                                (8, 10, "more than 10000 objects")])
def test_status_refuses_a_nested_list_bomb_fast_and_in_one_line(
        tmp_path: Path, capsys, levels: int, width: int, match: str) -> None:
    from launch.status import main as status_main

    run = _run_with_result(tmp_path, _bomb(levels, width))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    assert status_main([str(run)]) == 0
    took = time.monotonic() - t0
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    out = capsys.readouterr().out
    err_line = next(ln for ln in out.splitlines() if ln.startswith("error:"))
    assert match in err_line and len(err_line) < 700
    # generous: the old code never finished (45 s, then MemoryError at 2.4 GB)
    assert took < 10 and grew_mb < 200, (took, grew_mb)


@pytest.mark.parametrize("payload,match", [
    (("success", "x" * (5 << 20)), "larger than"),
    (("error", ["y" * 100_000] * 100), "characters of text"),
    (("success", [[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]), "nested deeper"),
])
def test_submitit_result_bounds(payload, match: str) -> None:
    with pytest.raises(safe_pickle.PickleBoundsError, match=match):
        safe_pickle.restricted_loads(pickle.dumps(payload), {}, bounds=safe_pickle.SUBMITIT_RESULT_BOUNDS)


def test_a_self_referencing_list_is_refused() -> None:
    x: list = []
    x.append(x)
    with pytest.raises(safe_pickle.PickleBoundsError):
        safe_pickle.load_submitit_result(__import__("io").BytesIO(pickle.dumps(("success", x))))


def test_status_prints_a_long_genuine_result_cut(tmp_path: Path, capsys) -> None:
    from launch.status import main as status_main

    tb = "Traceback (most recent call last):\n" + "  frame\n" * 2000 + "RuntimeError: " + "z" * 5000
    run = _run_with_result(tmp_path, pickle.dumps(("error", tb)))
    assert status_main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "state:      FAILED" in out
    err_line = next(ln for ln in out.splitlines() if ln.startswith("error:"))
    assert err_line.startswith("error:      RuntimeError: zzz") and len(err_line) < 700
