"""benchmarks/gpu_check.py --smoke: the GPU check's own code, run on CPU (cpu_tiny, gloo) so it
cannot rot before a GPU is lent (issue #12 part 3), in a Python that holds only what a lent
machine plus gpu-bundle/ hold (issue 20)."""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.gpu_env import NEEDED  # noqa: E402  (the repository root is no installed package)


def _closure(names: set[str]) -> set[str]:
    """The installed distributions `names` need, themselves included (extras left out)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:  # an optional requirement this venv lacks
            continue
        if dist.metadata["Name"].lower() in seen:
            continue
        seen.add(dist.metadata["Name"].lower())
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def lent_machine_python(tmp: Path) -> Path:
    """A venv that sees torch and its requirements plus gpu_env.NEEDED's distributions (numpy,
    numba, llvmlite from a lent machine's image; Pillow, simplejpeg, omegaconf, PyYAML from
    gpu-bundle/), linked from this venv, and nothing else: the environment gpu_run.sh makes."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp)], check=True)
    (site,) = (tmp / "lib").glob("python3*/site-packages")
    owners = md.packages_distributions()
    for name in _closure({"torch", *(d for m in NEEDED for d in owners[m])}):
        dist = md.distribution(name)
        for top in sorted({f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}):
            if not (site / top).exists():
                (site / top).symlink_to(Path(dist.locate_file(top)))
    return tmp / "bin" / "python"


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~2.2 CPU-minutes over 7 processes; hours of wall on a loaded machine
def test_gpu_check_smoke(tmp_path: Path) -> None:
    python = lent_machine_python(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env["PYTHONPATH"] = str(REPO)
    # The venv is what it claims: webdataset (installed here, imported by no core section) is absent.
    gone = subprocess.run([str(python), "-c", "import webdataset"], env=env, capture_output=True)
    assert gone.returncode != 0
    out_dir = tmp_path / "out"
    res = subprocess.run([str(python), str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out",
                          str(out_dir)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads((out_dir / "gpu_check.json").read_text())
    assert out["smoke"] and out["device"] == "cpu" and out["errors"] == {}
    mods = out["environment"]["modules"]
    assert set(mods) == set(NEEDED) and all(m["folder"].startswith(str(tmp_path / "venv")) for m in mods.values())
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
    assert sorted(p.name for p in out_dir.iterdir()) == ["gpu_check.json", "gpu_check.md", "train.log"]
    assert out["sections_done"] == ["environment", "resume", "throughput", "ckpt_stall"] and out["skipped"] == []
    assert "===== speed_cpu_tiny" in (out_dir / "train.log").read_text()
    table = (out_dir / "gpu_check.md").read_text()
    assert "resume check" in table and "cpu_tiny" in table and "simplejpeg 1." in table


def test_partial_results_are_written_and_rendered(tmp_path: Path) -> None:
    """Issue 20: the JSON and table are rewritten after every section, so a command cut short
    (a lent machine's 10-minute limit) keeps what it measured; later sections may be missing."""
    import runpy

    ns = runpy.run_path(str(REPO / "benchmarks" / "gpu_check.py"), run_name="gpu_check_partial")
    res = {"device": "NVIDIA H100", "smoke": False, "wall_s": 200.0, "sections_done": ["resume"],
           "skipped": ["throughput regnety_128gf: 100 s left of --budget-s, needs ~150 s"],
           "resume": [{"compile": False, "exit_codes": [0, 75, 0], "interrupted_at": 10,
                       "losses_equal": True, "max_abs_loss_diff": 0.0}]}
    ns["save"](tmp_path, res)
    assert json.loads((tmp_path / "gpu_check.json").read_text())["sections_done"] == ["resume"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| compile off | [0, 75, 0] | 10 | True | 0.0 |" in table and "Skipped: throughput" in table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md"]


def test_a_process_is_stopped_at_the_deadline(tmp_path: Path) -> None:
    """Issue 20: one lent-machine command may run 600 s, so no process outlives --limit-s; the
    section then fails with a clear error instead of the whole command being killed."""
    import runpy
    import time

    ns = runpy.run_path(str(REPO / "benchmarks" / "gpu_check.py"), run_name="gpu_check_deadline")
    c = ns["Check"](tmp_path, True, tmp_path / "shards", tmp_path, deadline=time.monotonic() - 1)
    with pytest.raises(RuntimeError, match="did not finish in 0 s"):
        c.train("late", c.base(tmp_path / "late", 6))
    assert "===== late" in (tmp_path / "train.log").read_text()
