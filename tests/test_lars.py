"""LARS: the formula, the 0/0 guard DCP needs, schedules, and sharded == single-process."""
from __future__ import annotations

import math
import types

import numpy as np
import pytest

import torch

from seer_pipeline.train.optim import LARS, build_param_groups, lr_at, lr_schedule, peak_lr
from seer_pipeline.distributed.testing import run_distributed


def _manual_lars(w, g, buf, lr, m, wd, eta):
    wn, gn = w.norm().item(), g.norm().item()
    trust = eta * wn / (gn + wd * wn + 1e-8) if wn > 0 and gn > 0 else 1.0
    d = (g + wd * w) * trust
    buf = m * buf + d
    return w - lr * buf, buf


def test_lars_matches_formula_over_steps() -> None:
    torch.manual_seed(0)
    w = torch.randn(7, 5, dtype=torch.float64)
    p = torch.nn.Parameter(w.clone())
    opt = LARS([p], lr=0.5, momentum=0.9, weight_decay=1e-3, trust=0.01)
    ref_w, buf = w.clone(), torch.zeros_like(w)
    for _ in range(4):
        g = torch.randn_like(w)
        p.grad = g.clone()
        opt.step()
        ref_w, buf = _manual_lars(ref_w, g, buf, 0.5, 0.9, 1e-3, 0.01)
    torch.testing.assert_close(p.detach(), ref_w, rtol=1e-12, atol=1e-12)
    # The trust ratio really scales the step: a tiny eta moves the weights far less.
    assert (p.detach() - w).norm() < 0.5 * 4 * 1.0


def test_lars_survives_zero_norms_like_dcp_init() -> None:
    """set_state_dict steps with zero grads and lr 0: nothing may become NaN or move."""
    p = torch.nn.Parameter(torch.zeros(3, 3))
    q = torch.nn.Parameter(torch.ones(4))
    opt = LARS([p, q], lr=0.0)
    p.grad, q.grad = torch.zeros(3, 3), torch.zeros(4)
    opt.step()
    assert torch.equal(p.detach(), torch.zeros(3, 3)) and torch.equal(q.detach(), torch.ones(4))
    assert all(torch.isfinite(s["momentum_buffer"]).all() for s in opt.state.values())


def test_excluded_group_is_plain_sgd() -> None:
    lin = torch.nn.Linear(3, 2)
    groups = build_param_groups(lin, exclude_bn_bias=True)
    assert [len(g["params"]) for g in groups] == [1, 1] and groups[1]["lars"] is False
    opt = LARS(groups, lr=0.1, momentum=0.0, weight_decay=0.5)
    b0 = lin.bias.detach().clone()
    lin.weight.grad, lin.bias.grad = torch.ones(2, 3), torch.ones(2)
    opt.step()
    torch.testing.assert_close(lin.bias.detach(), b0 - 0.1 * torch.ones(2))  # no wd, no trust


def test_schedule_warmup_cosine_and_index() -> None:
    s = lr_schedule(peak=1.2, total_steps=100, warmup_steps=10, warmup_start=0.3, final_ratio=1e-3)
    assert s[0] == pytest.approx(0.3) and s[10] == pytest.approx(1.2)
    assert np.all(np.diff(s[:11]) > 0) and np.all(np.diff(s[10:]) <= 0)
    assert s[-1] == pytest.approx(1.2e-3)  # reaches peak/1000 at the last step
    assert lr_at(s, 1000) == s[-1] and lr_at(s, 37) == s[37]
    assert peak_lr(0.3, 8192) == pytest.approx(9.6)  # SEER: 0.3 per 256 at batch 8192
    assert lr_schedule(0.1, 5, 0, 0.0, 1e-3)[0] == pytest.approx(0.1)


# --- sharded equality ---------------------------------------------------------------------------
def _fp64_embed(self, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(self.projection(x), dim=1)


def _model():
    from seer_pipeline.config.train import load_train_config
    from seer_pipeline.models.swav_head import SwAVHead, build_model

    cfg = load_train_config("cpu_tiny", ["model.n_prototypes=20", "model.hidden_dims=[32]",
                                         "model.out_dim=16"])
    torch.manual_seed(0)
    # float64: reduction-order noise (~1e-7 in fp32) would otherwise be amplified by the steps
    # and hide the difference between right and wrong (local-shard) trust ratios.
    model = build_model(cfg).double()
    # The head casts embeddings to float32 (right for bf16 training); this test runs in float64
    # throughout, so the same maths without the cast. Patched on this instance only: patching
    # the class leaked into every later test in the same pytest process.
    assert isinstance(model.head, SwAVHead)
    model.head.embed = types.MethodType(_fp64_embed, model.head)
    return model


def _batch(rank: int, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2)] + \
        [torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)]


def _loss(model, views):
    emb, scores = model(views)
    return (scores ** 2).mean() + emb.sum() * 0.01


STEPS, KW = 3, dict(lr=0.8, momentum=0.9, weight_decay=1e-4, trust=0.02)


PLANS = [("full", 0, "none"), ("hybrid", 2, "stage"), ("hybrid", 1, "block")]  # 1x2 and 2x1 meshes


def _sharded_worker(rank: int, world: int) -> list[dict]:
    """All plans in one spawn (process start-up dominates the cost)."""
    from seer_pipeline.distributed.parallelize import ParallelPlan, build_mesh, parallelize

    out = []
    for fsdp, shard, ac in PLANS:
        model = _model()
        plan = ParallelPlan(fsdp=fsdp, hybrid_shard_size=shard, ac=ac)
        mesh = build_mesh(plan, "cpu", world, world)
        model = parallelize(model, plan, mesh, torch.device("cpu"), world)
        opt = LARS(model.parameters(), **KW)
        for step in range(STEPS):
            _loss(model, _batch(rank, step)).backward()
            opt.step()
            opt.zero_grad()
        # numpy, not tensors: tensors cross the result queue as shared memory that dies with the rank
        out.append({k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().numpy().copy()
                    for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k})
    return out


def _reference(world: int) -> dict:
    model = _model()
    opt = LARS(model.parameters(), **KW)
    for step in range(STEPS):
        grads = None
        for r in range(world):  # each rank's BN sees its own batch; FSDP averages the gradients
            model.zero_grad()
            _loss(model, _batch(r, step)).backward()
            gs = [p.grad.clone() / world for p in model.parameters()]
            grads = gs if grads is None else [a + b for a, b in zip(grads, gs)]
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}


@pytest.mark.slow
def test_two_rank_fsdp_lars_equals_single_process() -> None:
    """Full sharding, hybrid 1x2 and 2x1 meshes, with stage/block AC: == one process (fp64)."""
    got = run_distributed(_sharded_worker, 2, timeout=300)
    ref = _reference(2)
    init = {k: v for k, v in _model().state_dict().items()}
    moved = sum(int(not torch.equal(v, init[k])) for k, v in ref.items())
    assert moved > len(ref) // 2  # the steps changed most parameters
    for i, plan in enumerate(PLANS):
        assert got[0][i].keys() == ref.keys()
        for k, v in ref.items():
            for r in (0, 1):
                torch.testing.assert_close(torch.from_numpy(got[r][i][k]), v, rtol=1e-9, atol=1e-11,
                                           msg=lambda m: f"{plan} rank {r} {k}: {m}")


def test_local_shard_norm_differs_from_full_norm() -> None:
    """Why LARS all-reduces: the norm of half a tensor is not the norm of the tensor."""
    w = torch.arange(12.0).reshape(4, 3)
    assert not math.isclose(w[:2].norm().item(), w.norm().item())
    assert math.isclose(math.sqrt(w[:2].pow(2).sum() + w[2:].pow(2).sum()), w.norm().item(), rel_tol=1e-6)


class _CountScalarReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts reads of a tensor value by the host (`.item()`, `float(t)`, `.tolist()`): each is a
    device sync on CUDA."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _old_lars_step(params, grads, bufs, lr, m, wd, eta):
    """The LARS of before issue 20: fp64 sum of squares per tensor, trust read as a Python float."""
    for p, g, buf in zip(params, grads, bufs):
        wn = float(p.double().pow(2).sum().sqrt())
        gn = float(g.double().pow(2).sum().sqrt())
        trust = eta * wn / (gn + wd * wn + 1e-8) if wn > 0 and gn > 0 else 1.0
        d = g.add(p, alpha=wd).mul_(trust)
        buf.mul_(m).add_(d)
        p.add_(buf, alpha=-lr)


def test_lars_step_reads_nothing_back_and_matches_the_old_step_bitwise() -> None:
    """Issue 20: one host sync per parameter norm before; none now. fp32 results are bitwise the
    old ones (norms now accumulate in fp64 in another order: ~1e-14 relative, below fp32's
    rounding of the trust ratio)."""
    torch.manual_seed(0)
    shapes = [(64, 32, 3, 3), (64,), (128, 64), (128,), (10, 128), (5, 7)]
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [p.detach().clone() for p in ps]
    bufs = [torch.zeros_like(r) for r in ref]
    opt = LARS(ps, lr=0.7, momentum=0.9, weight_decay=1e-4, trust=0.02)
    reads = []
    for step in range(5):
        grads = [torch.randn(s) * (0.0 if (step == 0 and i == 5) else 1.0) for i, s in enumerate(shapes)]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        with _CountScalarReads() as c:
            opt.step()
        reads.append(c.reads)
        _old_lars_step(ref, grads, bufs, 0.7, 0.9, 1e-4, 0.02)
        for i, (p, r) in enumerate(zip(ps, ref)):
            assert torch.equal(p.detach(), r), f"step {step} param {i}: max diff {(p - r).abs().max()}"
    assert reads == [0] * 5
    # The counter does count host reads: the old step reads two per parameter.
    with _CountScalarReads() as c:
        _old_lars_step(ref, grads, bufs, 0.7, 0.9, 1e-4, 0.02)
    assert c.reads == 2 * len(shapes)
