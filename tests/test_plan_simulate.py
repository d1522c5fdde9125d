"""`seer-plan --simulate`: one real training step on fake tensors at the preset's world size, and
the analytic plan within 10% of it (issue #12 part 2)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seer_pipeline.plan import cli as P

REPO = Path(__file__).resolve().parent.parent


def _simulate(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "seer_pipeline.plan.cli", *args, "--simulate", "--json"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _units(preset: str, mixed: bool) -> int:
    """FSDP units `apply_fsdp` makes: [BN layers when mixed], blocks, prototypes, head, root."""
    import torch
    from torch import nn

    from seer_pipeline.config.train import load_train_config
    from seer_pipeline.models.swav_head import build_model

    with torch.device("meta"):
        m = build_model(load_train_config(preset))
    bn = sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules()) if mixed else 0
    return bn + sum(len(s.blocks) for s in m.trunk.stages) + 3


def _check_against_plan(s: dict) -> None:
    sim, plan = s["simulated_gib"], s["planned_gib"]
    assert abs(s["memory_per_gpu_gib"] / s["simulated_peak_gib"] - 1) < 0.10, s
    # The tracker's sharded parameters and LARS momentum are exactly the planner's padded shards.
    assert sim["Sharded Param"] == pytest.approx(plan["params_sharded"], rel=1e-6)
    assert sim["OptState"] == pytest.approx(plan["optimizer_sharded"], rel=1e-6)
    assert sim["Activation"] > 0.5 * s["simulated_peak_gib"]


@pytest.mark.slow
def test_cpu_tiny_at_8_ranks() -> None:
    s = _simulate("--config", "cpu_tiny", "--gpus", "8")
    assert (s["world_size"], s["mesh"], s["precision"], s["ac"]) == (8, "full 8", "fp32", "none")
    assert s["fsdp_units"] == _units("cpu_tiny", mixed=False)
    assert s["crops"] == [[2, 28], [4, 16]] and s["batch_per_gpu"] == 16
    _check_against_plan(s)
    # Init peak (issue 20): this rank's shard (the padded tracker figure bounds it), not the model.
    init = s["init_gib"]
    assert 0.8 * s["simulated_gib"]["Sharded Param"] <= init["param_shards"] <= s["simulated_gib"]["Sharded Param"]
    assert s["init_peak_gib"] == pytest.approx(sum(init.values()))
    assert s["init_peak_gib"] < 0.5 * s["init_whole_model_gib"]


@pytest.mark.slow
@pytest.mark.scale
def test_seer_32gf_at_512_ranks_hybrid_bf16() -> None:
    s = _simulate("--config", "seer_32gf")
    assert (s["world_size"], s["mesh"], s["shard_size"]) == (512, "hybrid 64x8", 8)
    assert (s["precision"], s["ac"]) == ("bf16", "stage")
    assert s["fsdp_units"] == _units("seer_32gf", mixed=True)  # fp32 BN units + blocks + head
    _check_against_plan(s)
    # Parameters split over a node of 8, not over 512: ~161 M fp32 params / 8.
    assert s["simulated_gib"]["Sharded Param"] == pytest.approx(4 * s["params"] / 8 / 2**30, rel=0.02)
    assert s["fits_simulated"] == {"a100_40gb": True, "h100": True, "h200": True}


def test_simulate_needs_a_preset(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        P.main(["--simulate"])
    assert e.value.code == 2 and "--config" in capsys.readouterr().err
    assert P.main(["--config", "no_such_preset"]) == 2
    assert P.main(["--config", "cpu_tiny", "parallel.fsdp=sideways"]) == 2
    assert "parallel.fsdp" in capsys.readouterr().err
