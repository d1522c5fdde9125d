"""parallelize(): AC wrappers keep the maths, meshes are checked, bf16/AC runs end to end on CPU.

The 2-rank FSDP (full, hybrid 1x2 and 2x1) equality with one process is in test_lars.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seer_pipeline.distributed.parallelize import ParallelPlan, clean_fqn, parallelize
from seer_pipeline.config.train import load_train_config
from seer_pipeline.models.swav_head import build_model

REPO = Path(__file__).resolve().parent.parent


def _grads(plan: ParallelPlan) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    cfg = load_train_config("cpu_tiny", ["model.n_prototypes=10", "model.hidden_dims=[16]", "model.out_dim=8"])
    torch.manual_seed(0)
    model = parallelize(build_model(cfg), plan, None, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(2, 3, 16, 16, generator=g) for _ in range(2)] + [torch.randn(2, 3, 8, 8, generator=g)]
    emb, scores = model(views)
    loss = scores.pow(2).mean()
    loss.backward()
    return loss.detach(), {clean_fqn(n): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("ac", ["stage", "block"])
def test_activation_checkpointing_keeps_loss_and_grads(ac: str) -> None:
    loss0, g0 = _grads(ParallelPlan(fsdp="none"))
    loss1, g1 = _grads(ParallelPlan(fsdp="none", ac=ac))
    assert torch.equal(loss0, loss1) and g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=0, atol=0)


def test_ac_wrappers_are_applied_and_names_cleaned() -> None:
    cfg = load_train_config("cpu_tiny")
    model = parallelize(build_model(cfg), ParallelPlan(fsdp="none", ac="block"), None, torch.device("cpu"))
    names = [n for n, _ in model.named_parameters()]
    assert any("_checkpoint_wrapped_module" in n for n in names)
    plain = {n for n, _ in build_model(cfg).named_parameters()}
    assert {clean_fqn(n) for n in names} == plain


@pytest.mark.slow
def test_cpu_bf16_autocast_with_stage_ac_trains(tiny_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "seer_pipeline.train.cli", "--config", "cpu_tiny", "train.steps=3",
         "train.precision=bf16", "parallel.ac=stage", f"run.dir={run}", f"data.shards={tiny_shards}",
         "data.batch_size=4", "data.workers=0", "train.tensorboard=false"],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)
    assert (run / "provenance.json").exists() and (run / "config.yaml").exists()


def _bf16_worker(rank: int, world: int) -> dict:
    from seer_pipeline.distributed.parallelize import apply_fsdp, build_mesh

    cfg = load_train_config("cpu_tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    apply_fsdp(model, build_mesh(ParallelPlan(), "cpu", world, world), torch.bfloat16)
    # Hooks registered after fully_shard run after FSDP's own pre-forward (unshard + cast), so
    # they see the parameters and inputs the module really computes with.
    seen: dict[str, set] = {"bn": set(), "conv": set(), "proto": set(), "conv_in": set()}

    def hook(kind: str):
        def fn(mod, inp):
            seen[kind].add(str(mod.weight.dtype))
            if kind == "conv":
                seen["conv_in"].add(str(inp[0].dtype))
        return fn

    for name, m in model.named_modules():
        kind = ("bn" if isinstance(m, torch.nn.BatchNorm2d) else "conv" if isinstance(m, torch.nn.Conv2d)
                else "proto" if name == "head.prototypes" else None)
        if kind:
            m.register_forward_pre_hook(hook(kind))
    g = torch.Generator().manual_seed(rank)
    _, scores = model([torch.randn(4, 3, 28, 28, generator=g) for _ in range(2)])
    scores.float().pow(2).mean().backward()
    grads_ok = all(torch.isfinite(p.grad.to_local()).all().item() for p in model.parameters())
    master = {str(p.dtype) for p in model.parameters()}
    return {k: sorted(v) for k, v in seen.items()} | {"grads_ok": grads_ok, "master": sorted(master),
                                                       "scores": str(scores.dtype)}


@pytest.mark.slow
def test_bf16_fsdp_keeps_bn_and_prototypes_fp32() -> None:
    """The GPU mixed-precision layout, exercised on CPU/gloo: bf16 convs, fp32 BN units and
    prototypes, fp32 master weights and gradients."""
    from seer_pipeline.distributed.testing import run_distributed

    for r in run_distributed(_bf16_worker, 2, timeout=240):
        assert r["bn"] == ["torch.float32"] and r["conv"] == ["torch.bfloat16"], r
        assert r["conv_in"] == ["torch.bfloat16"], r  # BN units hand bf16 back to the convs
        assert r["proto"] == ["torch.float32"] and r["scores"] == "torch.float32", r
        assert r["master"] == ["torch.float32"] and r["grads_ok"], r


_COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
                "reduce_scatter_tensor", "all_reduce", "broadcast")


def _collectives_worker(rank: int, world: int) -> dict:
    """Collectives per step (2 resolutions, stage AC, bf16) and BN gradients, per BN layout."""
    import collections

    import torch.distributed as dist

    from seer_pipeline.distributed.parallelize import apply_fsdp, build_mesh

    out: dict = {}
    for layout in ("each", "shared"):
        cfg = load_train_config("cpu_tiny")
        torch.manual_seed(0)
        model = parallelize(build_model(cfg), ParallelPlan(ac="stage"), None, torch.device("cpu"))
        apply_fsdp(model, build_mesh(ParallelPlan(), "cpu", world, world), torch.bfloat16, bn_units=layout)
        counts: collections.Counter = collections.Counter()
        orig = {n: getattr(dist, n) for n in _COLLECTIVES if hasattr(dist, n)}

        def counted(name: str):
            def call(*a, **k):
                counts[name] += 1
                return orig[name](*a, **k)
            return call

        g = torch.Generator().manual_seed(rank)
        views = [torch.randn(2, 3, s, s, generator=g) for s in (28, 28, 16, 16)]
        per_step = []
        for _ in range(2):
            for n in orig:
                setattr(dist, n, counted(n))
            try:
                _, scores = model(views)
                scores.float().pow(2).mean().backward()
            finally:
                for n, f in orig.items():
                    setattr(dist, n, f)
            per_step.append(sum(counts.values()))
            counts.clear()
        bn = {n: p for n, p in model.named_parameters() if ".bn." in n}
        out[layout] = {"per_step": per_step, "bn_dtypes": sorted({str(p.dtype) for p in bn.values()}),
                       "grads": {n: p.grad.full_tensor().numpy().copy() for n, p in bn.items()}}
    return out


@pytest.mark.slow
def test_shared_bn_unit_cuts_collectives_and_keeps_gradients() -> None:
    """Issue 20: a unit per BN cost 102 all-gathers + 27 reduce-scatters per step on cpu_tiny
    (19 BNs, 2 resolutions, stage AC); one shared fp32 BN unit: 28 + 9, same BN gradients."""
    from seer_pipeline.distributed.testing import run_distributed

    for r in run_distributed(_collectives_worker, 2, timeout=400):
        assert r["each"]["per_step"] == [129, 129], r["each"]["per_step"]
        assert r["shared"]["per_step"] == [37, 37], r["shared"]["per_step"]
        assert r["shared"]["bn_dtypes"] == ["torch.float32"]  # BN master weights and grads in fp32
        for n, g in r["each"]["grads"].items():
            assert (r["shared"]["grads"][n] == g).all(), n


def test_torch_version_check_names_the_tested_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20: `torch>=2.6` admitted releases whose FSDP2 + AC + two resolutions failed."""
    from seer_pipeline.distributed.parallelize import TESTED_TORCH, UNTESTED_TORCH_ENV, check_torch_version

    monkeypatch.delenv(UNTESTED_TORCH_ENV, raising=False)
    check_torch_version()  # the torch running these tests is in the tested range
    for ok in ("2.13.0+cpu", "2.14.1+cu130", "2.14.0a0+gitabc"):
        check_torch_version(ok)
    for bad in ("2.6.0", "2.12.1+cu126", "2.15.0.dev20261201", "3.0.0"):
        with pytest.raises(RuntimeError, match=r"outside the tested range >=2\.13,<2\.15") as e:
            check_torch_version(bad)
        assert "\n" not in str(e.value) and UNTESTED_TORCH_ENV in str(e.value)
    monkeypatch.setenv(UNTESTED_TORCH_ENV, "1")
    check_torch_version("2.6.0")  # the user's explicit opt-in
    # pyproject pins the same range.
    text = (REPO / "pyproject.toml").read_text()
    (lo_maj, lo_min), (hi_maj, hi_min) = TESTED_TORCH
    assert f'"torch>={lo_maj}.{lo_min},<{hi_maj}.{hi_min}"' in text


def test_seer_train_refuses_an_untested_torch_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    from seer_pipeline.config.train import load_train_config
    from seer_pipeline.distributed.setup import resolve_env
    from seer_pipeline.train import cli

    monkeypatch.delenv("SEER_UNTESTED_TORCH", raising=False)
    monkeypatch.setattr(torch, "__version__", "2.7.1+cu126")
    assert cli.run_rank(load_train_config("cpu_tiny"), resolve_env()) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("seer-train: torch 2.7.1+cu126 is outside the tested range") and "\n" not in err


def _units_worker(rank: int, world: int) -> dict:
    import logging

    from torch.distributed.fsdp import FSDPModule

    from seer_pipeline.distributed.parallelize import build_mesh

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("seer_pipeline.distributed.parallelize").addHandler(handler)
    logging.getLogger("seer_pipeline.distributed.parallelize").setLevel(logging.INFO)
    plan = ParallelPlan(blocks_per_unit=2, precision="bf16")
    model = build_model(load_train_config("cpu_tiny"))
    parallelize(model, plan, build_mesh(plan, "cpu", world, world), torch.device("cpu"))
    return {"lines": lines, "blocks": [len(s.blocks) for s in model.trunk.stages],
            "fsdp_modules": sum(isinstance(m, FSDPModule) for m in model.modules())}


def test_the_fsdp_log_line_counts_units_not_modules() -> None:
    """Blocks in pairs and one shared fp32 BN unit (bf16): each pair and the BN group are one
    unit (one all-gather) over several FSDPModules."""
    from seer_pipeline.distributed.testing import run_distributed

    r = run_distributed(_units_worker, 1, timeout=240)[0]
    units = 1 + sum((b + 1) // 2 for b in r["blocks"]) + 3  # BN unit, block pairs, prototypes, head, root
    assert r["fsdp_modules"] > units, r  # the case where the two counts differ
    assert [ln for ln in r["lines"] if ln.startswith("FSDP2 applied")] == [
        f"FSDP2 applied: full sharding, mesh (1,), {units} units, params torch.bfloat16, ac=none, compile=False"], r
