"""seer-plan: counts from the real (meta) model, measured activation memory, SEER cross-check."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from seer_pipeline.plan import cli as P
from seer_pipeline.models import build_trunk

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def seer() -> dict:
    return P.plan("regnety_256gf", 512, 16, "seer2021", gpu_type="v100")


def test_params_and_macs_match_independent_counts(seer: dict) -> None:
    # Independent counts: timm's regnety_2560 without its classifier has 1272.2M params, and
    # torch.utils.flop_counter 254.37G multiply-adds at 224 px.
    assert seer["trunk_params"] / 1e6 == pytest.approx(1272.2, abs=0.1)
    assert int(seer["trunk_macs_per_crop"]["224"]) / 1e9 == pytest.approx(254.37, abs=0.01)
    fwd = 2 * (2 * seer["macs_per_crop"]["224"] + 4 * seer["macs_per_crop"]["96"])
    assert seer["fwd_flops_per_image"] == fwd and seer["flops_per_image"] == 3 * fwd


def test_the_swav_head_is_counted(seer: dict) -> None:
    # The named trunk borrows the head of the preset that trains it (seer_256gf), built for real.
    from seer_pipeline.config.train import load_train_config
    from seer_pipeline.models.swav_head import build_model

    assert seer["head_from"] == "seer_256gf"
    with torch.device("meta"):
        head = build_model(load_train_config("seer_256gf")).head
    assert seer["head_params"] == sum(p.numel() for p in head.parameters()) > 0
    assert seer["params"] == seer["trunk_params"] + seer["head_params"]
    lin = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert seer["head_macs_per_crop"] == sum(m.in_features * m.out_features for m in lin)
    for r in ("224", "96"):
        assert seer["macs_per_crop"][r] == seer["trunk_macs_per_crop"][r] + seer["head_macs_per_crop"]
    # The prototypes are their own FSDP unit, so the largest gathered unit is at least that big.
    assert P.largest_unit(*P.build_meta("seer_256gf")[:2]) >= head.prototypes.weight.numel()
    bare = P.plan("regnety_256gf", 512, 16, "seer2021", gpu_type="v100", with_head=False)
    assert bare["params"] == seer["trunk_params"] and bare["head_params"] == 0
    assert P.plan("regnety_400mf", 8, 32)["head_from"].startswith("none")


def test_seer_cross_check_implied_utilisation(seer: dict, capsys: pytest.CaptureFixture) -> None:
    c = seer["seer_check"]
    assert c["paper_step_s"] == 6.125
    # 16 images x 4.18 TFLOPs in 6.125 s on a 125-TFLOPs V100: ~8.7% model-FLOPs utilisation.
    assert 0.08 < c["implied_mfu"] < 0.095
    assert c["planned_step_s"] == pytest.approx(6.125 * c["implied_mfu"] / seer["mfu"], rel=1e-9)
    assert P.main([]) == 0
    assert "implies MFU 8.7%" in capsys.readouterr().out


def test_meta_activation_count_equals_real_cpu_count() -> None:
    """The meta-device profile must equal saved bytes counted on a real forward (by address)."""
    torch.manual_seed(0)
    real = build_trunk("regnety_tiny").train()
    params = {p.untyped_storage().data_ptr() for p in real.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        real(torch.randn(3, 3, 40, 40))
    with torch.device("meta"):
        meta = build_trunk("regnety_tiny")
    prof = P.activation_profile(meta, 40)
    # Per-image slope x 3 images, plus the batch-size-independent part (BN statistics).
    fixed = sum(seen.values()) - 3 * prof.saved("none")
    assert 0 <= fixed < 0.01 * sum(seen.values())


def test_activation_checkpointing_policies() -> None:
    with torch.device("meta"):
        trunk = build_trunk("regnety_400mf")
    prof = P.activation_profile(trunk, 96)
    # Block AC keeps more inputs but recomputes less; which wins depends on the model.
    assert prof.saved("none") > max(prof.saved("stage"), prof.saved("block")) > 0
    # Recomputing stage k holds the inputs of stages 1..k (later ones are freed) plus stage k.
    assert prof.saved("stage") == max(prof.stem + sum(prof.stage_inputs[1:k + 1]) + prof.stages[k]
                                      for k in range(len(prof.stages)))
    assert prof.kept("stage") == prof.stem + sum(prof.stage_inputs[1:]) < prof.saved("stage")
    assert prof.stage_inputs[0] == prof.block_inputs[0]  # the stem's output
    assert len(prof.blocks) == sum(len(s.blocks) for s in trunk.stages)
    assert prof.saved("none") == pytest.approx(prof.stem + sum(prof.blocks) + 0, rel=0.01)
    with pytest.raises(ValueError):
        prof.saved("layer")


def test_scaling_and_precision() -> None:
    a = P.plan("regnety_400mf", 8, 32, "2x96+4x48", precision="fp32", gpu_type="a100")
    b = P.plan("regnety_400mf", 16, 32, "2x96+4x48", precision="fp32", gpu_type="a100")
    h = P.plan("regnety_400mf", 8, 32, "2x96+4x48", precision="bf16", gpu_type="a100")
    ma, mb = a["memory_per_gpu_bytes"], b["memory_per_gpu_bytes"]
    # Halved, up to FSDP2's per-parameter padding to a multiple of the shard count.
    assert mb["params_sharded"] == pytest.approx(ma["params_sharded"] / 2, rel=0.03)
    assert mb["activations_no_ac"] == ma["activations_no_ac"]  # per-GPU batch unchanged
    assert b["step_time_s"] == a["step_time_s"] and b["images_per_s"] == pytest.approx(2 * a["images_per_s"])
    # bf16 halves the convolutions' saved tensors, but fp32 BN units save an fp32 copy of their input.
    ratio = h["memory_per_gpu_bytes"]["activations_no_ac"] / ma["activations_no_ac"]
    assert 0.5 < ratio < 0.9
    assert h["step_time_s"] == pytest.approx(a["step_time_s"] * 19.5 / 312)


def test_bf16_profile_counts_fp32_bn_inputs() -> None:
    """Under the FSDP2 policy a BN unit casts its input to fp32 and saves it: measured, not halved."""
    with torch.device("meta"):
        trunk = build_trunk("regnety_400mf")
    fp32, bf16 = P.activation_profile(trunk, 64), P.activation_profile(trunk, 64, "bf16")
    assert bf16.max_tensor == fp32.max_tensor  # the largest saved tensor is a BN input, fp32 in both
    assert fp32.saved("none") / 2 < bf16.saved("none") < fp32.saved("none")
    assert next(trunk.parameters()).dtype == torch.float32  # the caller's trunk is left alone


def test_hybrid_sharding_divides_by_the_node_not_the_world() -> None:
    """seer_10b shards over 8 GPUs and replicates over 62 nodes: per-GPU state is /8, not /496."""
    from seer_pipeline.config.train import load_train_config
    from seer_pipeline.plan.analytic import plan_config, sharded_numel

    cfg = load_train_config("seer_10b")
    p = plan_config(cfg)
    assert (p["gpus"], p["shard_size"], p["replicas"], p["mesh"]) == (496, 8, 62, "hybrid 62x8")
    assert (p["batch_per_gpu"], p["precision"], p["ac"]) == (16, "bf16", "stage")
    assert p["crops"] == [(2, 160), (4, 96)]  # the preset's data.crops=seer
    trunk, head, _ = P.build_meta(cfg)
    m = p["memory_per_gpu_bytes"]
    assert m["params_sharded"] == 4 * sharded_numel([trunk, head], 8)
    full = plan_config(load_train_config("seer_10b", ["parallel.fsdp=full"]))
    assert full["mesh"] == "full 496"
    assert m["params_sharded"] / full["memory_per_gpu_bytes"]["params_sharded"] == pytest.approx(62, rel=0.05)
    # Padding: a 32-row BN weight over 496 ranks still takes one row on each.
    assert sharded_numel([nn.BatchNorm2d(32)], 496) == 2


def test_cli_json_and_errors(capsys: pytest.CaptureFixture) -> None:
    assert P.main(["--model", "cpu_tiny", "--gpus", "2", "--batch-per-gpu", "64", "--crops", "2x28+4x16",
                   "--gpu-type", "h100", "--ac", "none", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("params", "flops_per_image", "memory_per_gpu_gib", "step_time_s"):
        assert out[key] > 0
    assert out["precision"] == "bf16" and "seer_check" not in out
    assert P.main(["--crops", "2x224+4"]) == 2
    assert "2x224+4x96" in capsys.readouterr().err
    assert P.main(["--gpu-type", "v100", "--precision", "bf16"]) == 2
    assert P.main(["--model", "no_such_model"]) == 2


@pytest.mark.slow
def test_memory_model_matches_measured_peak_rss() -> None:
    """benchmarks/bench_plan_memory.py: prediction within 15% of a real CPU step's peak."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_plan_memory as bench
    finally:
        sys.path.pop(0)
    rows = bench.run_all()
    assert {r["trunk"] for r in rows} == {"cpu_tiny", "regnety_400mf"}
    for r in rows:
        assert r["within_tolerance"], r
