"""`seer-plan` and `--simulate` for DINO (issue #23): the teacher is a second sharded copy of trunk
and head without gradients or momentum, with a forward on the global crops; SwAV plans do not move."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from seer_pipeline.config.train import load_train_config
from seer_pipeline.models import build_trunk
from seer_pipeline.models.dino_head import build_dino_model
from seer_pipeline.plan import analytic as A
from seer_pipeline.plan.activations import activation_profile, forward_peak
from seer_pipeline.plan.cli import _json
from test_plan_simulate import _simulate

PINNED = Path(__file__).parent / "data" / "plan" / "swav_plans.json"


def _swav_cases() -> dict[str, dict]:
    """The SwAV plans pinned in PINNED (written by this function on the planner of 84ab98e, before
    the teacher was counted): the CLI default, a hybrid bf16 block-AC trunk-only plan, presets."""
    cases = {
        "regnety_256gf_cli": A.plan("regnety_256gf", 512, 16),
        "regnety_32gf_no_head_bf16_block": A.plan("regnety_32gf", 64, 8, "2x224+4x96", "bf16", "block",
                                                  "h100", 0.3, 1e8, False, 8, 2),
    }
    for preset in ("cpu_tiny", "seer_32gf", "seer_10b"):
        cases[f"config_{preset}"] = A.plan_config(load_train_config(preset))
    return {k: json.loads(_json(v)) for k, v in cases.items()}


@pytest.mark.slow
def test_swav_plans_are_unchanged() -> None:
    assert _swav_cases() == json.loads(PINNED.read_text())  # every key and number, exactly


def _padded(model: nn.Module, shard: int) -> int:
    """fp32 bytes of one rank's FSDP2 shards, counted here from the parameter shapes."""
    return sum(4 * math.ceil(p.shape[0] / shard) * (p.numel() // p.shape[0]) for p in model.parameters())


@pytest.mark.parametrize("preset", ["cpu_tiny_dino", "seer_32gf_dino"])
def test_dino_plan_counts_the_teacher(preset: str) -> None:
    cfg = load_train_config(preset)
    p = A.plan_config(cfg)
    m, shard = p["memory_per_gpu_bytes"], p["shard_size"]
    with torch.device("meta"):
        model = build_dino_model(cfg)
    # The teacher: the student's sharded fp32 parameters and BN buffers once more.
    assert m["teacher_params_sharded"] == m["params_sharded"] == _padded(model, shard)
    assert m["teacher_buffers"] == m["buffers"] > 0
    # The head is DINO's: MLP + weight-normalised K-way layer (not an nn.Linear) in params and MACs.
    dims = [model.trunk.out_dim, *cfg.model.hidden_dims, cfg.model.out_dim]
    assert p["head_params"] == sum(a * b + b for a, b in zip(dims, dims[1:])) + dims[-1] * cfg.model.n_prototypes
    assert p["head_macs_per_crop"] == sum(a * b for a, b in zip(dims, dims[1:])) + dims[-1] * cfg.model.n_prototypes
    # Its forward: the global crops only, no backward.
    (n_glob, res), = p["teacher"]["crops"]
    assert (n_glob, p["teacher"]["global_crops"]) == (cfg.dino.global_crops, cfg.dino.global_crops)
    assert p["teacher"]["fwd_flops_per_image"] == n_glob * 2 * p["macs_per_crop"][str(res)]
    assert p["flops_per_image"] == 3 * p["fwd_flops_per_image"] + p["teacher"]["fwd_flops_per_image"]
    assert m["teacher_targets"] == 4 * n_glob * cfg.data.batch_size * cfg.model.n_prototypes
    assert m["teacher_forward"] > 0
    # The plan without the teacher (the same model and shape) is lower by at least its copy of
    # the weights, and by no more than everything the teacher adds.
    trunk, head, _ = A.build_meta(cfg)
    world, node = A.preset_world(cfg)
    shape = A.RunShape.checked(world, int(cfg.data.batch_size), A.preset_crops(cfg), str(cfg.train.precision),
                               str(cfg.parallel.ac), "h100", 0.25, 1e9, A.shard_group(cfg, world, node),
                               int(cfg.parallel.blocks_per_unit))
    _, without, _ = A._memory(trunk, head, shape, None)
    teacher = m["teacher_params_sharded"] + m["teacher_buffers"]
    extra = m["teacher_forward"] + m["teacher_targets"] + 2 * shape.b_act * A.largest_unit(trunk)
    assert without + teacher <= p["peak_memory_per_gpu_bytes"] <= without + teacher + extra
    # A SwAV plan of the same trunk and shape has no teacher lines and less memory.
    swav = A.plan_config(load_train_config(preset.removesuffix("_dino")))
    assert "teacher" not in swav and "teacher_params_sharded" not in swav["memory_per_gpu_bytes"]
    assert p["peak_memory_per_gpu_bytes"] - swav["peak_memory_per_gpu_bytes"] >= teacher
    assert p["comm_bytes_per_gpu_per_step"] > swav["comm_bytes_per_gpu_per_step"] or shard == 1


def test_teacher_forward_peak_meta_equals_real_and_is_bounded() -> None:
    """The no_grad peak counted on the meta device is the one counted on real CPU tensors, and
    lies between the largest single tensor and everything a grad-mode forward would keep."""
    real = build_trunk("cpu_tiny")
    with torch.device("meta"):
        meta = build_trunk("cpu_tiny")
    peak = forward_peak(meta, 28)
    assert peak == forward_peak(real, 28)
    prof = activation_profile(meta, 28)
    assert prof.max_tensor <= peak < prof.kept("none")
    assert forward_peak(meta, 56) == pytest.approx(4 * peak, rel=0.05)  # activations scale with pixels


def _check_dino_against_plan(s: dict) -> None:
    sim, plan = s["simulated_gib"], s["planned_gib"]
    assert abs(s["memory_per_gpu_gib"] / s["simulated_peak_gib"] - 1) < 0.10, s  # as for SwAV
    # The tracker sees two sets of shards and buffers (student and teacher), one LARS momentum.
    assert sim["Sharded Param"] == pytest.approx(plan["params_sharded"] + plan["teacher_params_sharded"], rel=1e-6)
    assert sim["Buffer"] == pytest.approx(plan["buffers"] + plan["teacher_buffers"], rel=1e-6)
    assert sim["OptState"] == pytest.approx(plan["optimizer_sharded"], rel=1e-6)


@pytest.mark.slow
def test_simulated_dino_step_agrees_with_the_plan_cpu_tiny() -> None:
    s = _simulate("--config", "cpu_tiny_dino", "--gpus", "8")
    assert (s["world_size"], s["mesh"]) == (8, "full 8")
    _check_dino_against_plan(s)


@pytest.mark.slow
def test_simulated_dino_step_in_bf16_reshards_the_teacher() -> None:
    """Mixed precision keeps the shared fp32 BN unit gathered after forward until its backward,
    which the teacher never runs: without the reshard after its forward (DINOObjective), the
    EMA met whole BN tensors where the student has shards ("not sharded alike")."""
    s = _simulate("--config", "cpu_tiny_dino", "--gpus", "8", "train.precision=bf16")
    assert s["precision"] == "bf16"
    _check_dino_against_plan(s)


@pytest.mark.slow
@pytest.mark.scale
def test_simulated_dino_step_agrees_with_the_plan_seer_32gf() -> None:
    s = _simulate("--config", "seer_32gf_dino")
    assert (s["world_size"], s["mesh"], s["precision"], s["ac"]) == (512, "hybrid 64x8", "bf16", "stage")
    _check_dino_against_plan(s)
