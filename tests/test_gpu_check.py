"""benchmarks/gpu_check.py --smoke: the GPU check's own code, run on CPU (cpu_tiny, gloo) so it
cannot rot before a GPU is lent (issue #12 part 3)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~2.2 CPU-minutes over 7 processes; hours of wall on a loaded machine
def test_gpu_check_smoke(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out",
                          str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert out["smoke"] and out["device"] == "cpu"
    (r,) = out["resume"]
    assert r["exit_codes"] == [0, 75, 0] and r["preempted"] and r["steps_once_each"]
    assert 3 <= r["interrupted_at"] < 6
    # CPU, gloo, deterministic: the resumed run is bitwise the uninterrupted one.
    assert r["losses_equal"] and r["max_abs_loss_diff"] == 0.0
    assert len(r["preemption_save_s"]) == 1 and r["preemption_save_s"][0] > 0
    (t,) = out["throughput"]
    assert t["exit_code"] == 0 and t["steps"] == 6 and t["img_s_per_gpu"] > 0
    assert "mfu" not in t  # no peak FLOPs for a CPU
    # The plan and the simulation of the same setting came back. At 15 MiB (cpu_tiny, batch 4,
    # one rank) fixed terms dominate and the planner, which counts every gradient, was 18% high.
    assert 0.5 < t["planned_gib"] / t["simulated_gib"] < 2
    s = out["ckpt_stall"]
    assert set(s["loop_s"]) == {"none", "sync", "async"} and s["loop_s"]["none"] == t["train_s"]
    assert len(s["save_call_s"]["sync"]) == len(s["save_call_s"]["async"]) == 2  # steps 2 and 4
    assert all(not x for x in s["save_call_s"]["none"])
    # Issue 20: results only in the output folder (run folders and probes elsewhere), the JSON
    # rewritten after every section.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md", "train.log"]
    assert out["sections_done"] == ["resume", "throughput", "ckpt_stall"] and out["skipped"] == []
    assert "===== speed_cpu_tiny" in (tmp_path / "train.log").read_text()
    md = (tmp_path / "gpu_check.md").read_text()
    assert "resume check" in md and "cpu_tiny" in md


def test_partial_results_are_written_and_rendered(tmp_path: Path) -> None:
    """Issue 20: the JSON and table are rewritten after every section, so a command cut short
    (a lent machine's 10-minute limit) keeps what it measured; later sections may be missing."""
    import runpy

    ns = runpy.run_path(str(REPO / "benchmarks" / "gpu_check.py"), run_name="gpu_check_partial")
    res = {"device": "NVIDIA H100", "smoke": False, "wall_s": 200.0, "sections_done": ["resume"],
           "skipped": ["throughput regnety_128gf: 100 s left of --budget-s, needs ~150 s"],
           "resume": [{"compile": False, "exit_codes": [0, 75, 0], "interrupted_at": 10,
                       "losses_equal": True, "max_abs_loss_diff": 0.0}]}
    ns["_save"](tmp_path, res)
    assert json.loads((tmp_path / "gpu_check.json").read_text())["sections_done"] == ["resume"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| compile off | [0, 75, 0] | 10 | True | 0.0 |" in md and "Skipped for time" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md"]
