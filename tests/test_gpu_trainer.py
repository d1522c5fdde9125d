"""The real trainer on the GPU layout, on CPU/gloo: bf16 parameters with fp32 reduction, BN and
prototypes on 2 ranks (dtypes checked where they are used), the FSDP units, resuming 2->1->2
ranks from an async checkpoint with exact model/momentum/BN state, and AC / compile runs."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from seer_pipeline.config.train import load_train_config
from seer_pipeline.distributed.testing import run_distributed


def _cfg(run: Path, shards: Path, *extra: str):
    return load_train_config("cpu_tiny", [
        f"run.dir={run}", f"data.shards={shards}", "data.batch_size=2", "data.workers=0",
        "train.tensorboard=false", "train.log_every=1", *extra])


def _trainer(rank: int, world: int, cfg):  # noqa: ANN001, ANN202
    from seer_pipeline.distributed.setup import DistEnv
    from seer_pipeline.train.trainer import Trainer

    return Trainer(cfg, DistEnv(rank, world, rank, world, "127.0.0.1", 0, "torchrun"),
                   torch.device("cpu"))


def _full_state(tr: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Whole (unsharded) parameters + buffers and LARS momentum, on rank 0 (collective)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = get_model_state_dict(tr.model, options=opts)
    optim = get_optimizer_state_dict(tr.model, tr.optimizer, options=opts)
    return {"model": {k: v.clone() for k, v in model.items()},
            "momentum": {k: v["momentum_buffer"].clone() for k, v in optim.get("state", {}).items()}}


# -- bf16 layout ------------------------------------------------------------------------------

def _bf16_worker(rank: int, world: int, run: Path, shards: Path) -> dict:
    from torch.distributed.fsdp import FSDPModule

    from seer_pipeline.train import swav

    cfg = _cfg(run, shards, "train.precision=bf16", "train.steps=20", "ckpt.every=0",
               "ckpt.save_final=false", "data.batch_size=4", "optim.base_lr=4.8",
               "optim.warmup_steps=2", "swav.freeze_prototypes_iters=2")
    tr = _trainer(rank, world, cfg)
    units = [n for n, m in tr.model.named_modules() if isinstance(m, FSDPModule)]
    seen: dict[str, set] = {k: set() for k in ("bn", "conv", "conv_in", "proto", "sinkhorn", "grad",
                                               "master", "collective")}

    def hook(kind: str):  # noqa: ANN202 - after fully_shard: sees what the module computes with
        def fn(mod, inp):  # noqa: ANN001, ANN202
            seen[kind].add(str(mod.weight.dtype))
            if kind == "conv":
                seen["conv_in"].add(str(inp[0].dtype))
        return fn

    for name, m in tr.model.named_modules():
        kind = ("bn" if isinstance(m, torch.nn.BatchNorm2d) else "conv" if isinstance(m, torch.nn.Conv2d)
                else "proto" if name == "head.prototypes" else None)
        if kind:
            m.register_forward_pre_hook(hook(kind))
    real_sk, real_step = swav.sinkhorn_knopp, tr.optimizer.step

    def sinkhorn(scores, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen["sinkhorn"].add(str(scores.dtype))
        return real_sk(scores, *a, **k)

    def step(*a, **k):  # noqa: ANN002, ANN003, ANN202
        for g in tr.optimizer.param_groups:
            for p in g["params"]:
                seen["master"].add(str(p.dtype))
                if p.grad is not None:
                    seen["grad"].add(str(p.grad.dtype))
        return real_step(*a, **k)

    swav.sinkhorn_knopp, tr.optimizer.step = sinkhorn, step
    try:
        assert tr.train() == 0
    finally:
        swav.sinkhorn_knopp = real_sk
    bn_bufs = {str(b.dtype) for n, b in tr.model.named_buffers() if "running" in n}
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()] \
        if rank == 0 else []
    return {k: sorted(v) for k, v in seen.items()} | {"units": units, "bn_bufs": sorted(bn_bufs),
                                                       "losses": losses}


@pytest.mark.slow
def test_bf16_policy_through_the_trainer_on_2_ranks(tiny_shards: Path, tmp_path: Path) -> None:
    from seer_pipeline.models.swav_head import build_model

    res = run_distributed(_bf16_worker, 2, tmp_path / "run", tiny_shards, timeout=600)
    for r in res:
        assert r["conv"] == ["torch.bfloat16"] and r["conv_in"] == ["torch.bfloat16"], r
        assert r["bn"] == ["torch.float32"] and r["bn_bufs"] == ["torch.float32"], r
        assert r["proto"] == ["torch.float32"] and r["sinkhorn"] == ["torch.float32"], r
        assert r["master"] == ["torch.float32"] and r["grad"] == ["torch.float32"], r
    # The FSDP units: one per BN (fp32), one per block, the prototypes, the head and the root.
    plain = build_model(load_train_config("cpu_tiny"))
    bns = [n for n, m in plain.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    blocks = [f"trunk.stages.{i}.blocks.{j}" for i, s in enumerate(plain.trunk.stages)
              for j in range(len(s.blocks))]
    assert sorted(res[0]["units"]) == sorted(["", "head", "head.prototypes", *blocks, *bns])
    assert len(blocks) >= 2 and len(bns) > len(blocks)
    losses = res[0]["losses"]
    assert len(losses) == 20 and all(isinstance(x, float) for x in losses), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, losses


# -- resharding -------------------------------------------------------------------------------

def _reshard_worker(rank: int, world: int, run: Path, shards: Path, steps: int, mode: str) -> dict:
    """mode 'save': train to `steps` (async periodic save at steps-1); 'resume': resume, capture,
    train to `steps` and save."""
    records: list[str] = []

    class _Grab(logging.Handler):
        def emit(self, rec: logging.LogRecord) -> None:
            records.append(rec.getMessage())

    logging.getLogger("seer_pipeline").addHandler(_Grab())
    logging.getLogger("seer_pipeline").setLevel(logging.INFO)
    extra = ["ckpt.async=true", "swav.queue_length=8", "optim.total_steps=12", f"train.steps={steps}",
             "swav.freeze_prototypes_iters=1"]
    extra += ["ckpt.every=4", "ckpt.save_final=false"] if mode == "save" else ["ckpt.every=0"]
    tr = _trainer(rank, world, _cfg(run, shards, *extra))
    out: dict[str, Any] = {}
    real_resume = tr.resume

    def saved() -> None:  # inside the save, before the trainer's own values come back
        out["saved_step"], out["saved"] = tr.step, _full_state(tr)

    tr.ckpt.before_save(lambda: None, after=saved)

    def resume() -> int | None:
        step = real_resume()
        out["resumed_step"], out["resumed"] = step, _full_state(tr)
        out["queue_filled"] = int(tr.objective.queue.filled)
        return step

    tr.resume = resume
    assert tr.train() == 0
    out["log"] = records
    return out if rank == 0 else {}


def _assert_equal_state(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys() and a["momentum"].keys() == b["momentum"].keys()
    for part in ("model", "momentum"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert any("running_var" in k for k in a["model"])  # BN statistics are part of it


@pytest.mark.slow
def test_resume_2_to_1_to_2_ranks_from_an_async_checkpoint(tiny_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    a = run_distributed(_reshard_worker, 2, run, tiny_shards, 5, "save", timeout=600)[0]
    assert a["saved_step"] == 4  # the async periodic save, the only checkpoint
    b = run_distributed(_reshard_worker, 1, run, tiny_shards, 7, "resume", timeout=600)[0]
    assert b["resumed_step"] == 4
    _assert_equal_state(a["saved"], b["resumed"])  # 2 -> 1, from the async-written checkpoint
    assert b["queue_filled"] == 0 and any("SwAV queue: checkpoint saved by 2 rank(s), resuming on 1"
                                          in m for m in b["log"]), b["log"]
    assert any(m.startswith("RNG: checkpoint saved by 2 rank(s)") for m in b["log"])
    assert b["saved_step"] == 7
    c = run_distributed(_reshard_worker, 2, run, tiny_shards, 8, "resume", timeout=600)[0]
    assert c["resumed_step"] == 7
    _assert_equal_state(b["saved"], c["resumed"])  # 1 -> 2
    assert any("resuming on 2" in m for m in c["log"])
    assert any(not torch.equal(a["saved"]["model"][k], b["saved"]["model"][k])
               for k in a["saved"]["model"])  # the 1-rank steps really trained


# -- activation checkpointing and compile -------------------------------------------------------

# compile: one crop resolution (2x28) and 2 steps, since every (block, resolution, fwd/bwd) is a
# C++ build for inductor on CPU; cold, on 2 busy cores, the default 2-resolution run passed 900 s.
_ONE_RES = ("data.size_crops=[28]", "data.nmb_crops=[2]", "data.min_scale_crops=[0.3]",
            "data.max_scale_crops=[1.0]", "train.steps=2")


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("extra", [("parallel.ac=block",), ("parallel.ac=stage", "train.precision=bf16"),
                                   ("parallel.compile=true", *_ONE_RES)],
                         ids=["ac_block", "ac_stage_bf16", "compile"])
def test_ac_and_compile_through_the_trainer(extra: tuple, tiny_shards: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # A private inductor cache: the shared /tmp/torchinductor_$USER one, written by concurrent
    # processes, gave an empty-output "C++ compile error" here once (its precompiled header).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    res = run_distributed(_short_run, 1, tmp_path / "run", tiny_shards, extra, timeout=2300)[0]
    steps = 2 if "train.steps=2" in extra else 3
    assert res["rc"] == 0 and len(res["losses"]) == steps, res
    assert all(x == x and 0 < x < 100 for x in res["losses"]), res
    if "parallel.compile=true" in extra:
        assert res["compiled_frames"] > 0, res


def _short_run(rank: int, world: int, run: Path, shards: Path, extra: tuple) -> dict:
    import torch._dynamo.utils as dyn

    tr = _trainer(rank, world, _cfg(run, shards, "train.steps=3", "ckpt.every=0",
                                    "ckpt.save_final=false", *extra))  # later keys win
    rc = tr.train()
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {"rc": rc, "losses": losses, "compiled_frames": int(dyn.counters["frames"]["ok"])}
