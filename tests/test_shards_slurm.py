"""slurm/shards-array.sbatch on a real SLURM (slurm/local-cluster/start.sh): 3 parts, then merge."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.verify import verify

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slurm


def _slurm_up() -> bool:
    try:
        r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "is UP" in r.stdout


def test_array_job_builds_parts_and_merges(photo_dir: Path, tmp_path: Path) -> None:
    if not _slurm_up():
        pytest.skip("no local SLURM; start one with `bash slurm/local-cluster/start.sh`")
    env = {**os.environ, "N": "3", "OUT": str(tmp_path / "out"), "INPUTS": str(photo_dir),
           "SEER_SHARDS": str(Path(sys.executable).parent / "seer-shards"), "BUILD_ARGS": "--maxcount 2"}
    # The template asks for a big node; a one-node test cluster gets small requests instead.
    r = subprocess.run(["sbatch", "--wait", "--array=0-2", "--cpus-per-task=1", "--mem=300M", "--time=10",
                        f"--output={tmp_path}/%x-%A_%a.out", str(REPO / "slurm" / "shards-array.sbatch")],
                       env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))
    assert r.returncode == 0, r.stderr + logs
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["merged_parts"] == 3 and man["written"] == 12
    assert verify(str(tmp_path / "out")) == []
