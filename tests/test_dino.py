"""DINO's pieces: N ranks compute what one process computes on the global batch; the teacher
follows the student by EMA; the monitors flag a collapsed run."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seer_pipeline.distributed.testing import run_distributed
from seer_pipeline.models.dino_head import DINOHead, WeightNormLinear
from seer_pipeline.train import dino

N, K, D, CROPS, GLOBAL = 8, 12, 6, 4, 2  # global batch, outputs, embedding dim, crops


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(CROPS * N, K, generator=g, dtype=torch.float64)
    teacher = torch.randn(GLOBAL * N, K, generator=g, dtype=torch.float64)
    emb = torch.randn(GLOBAL * N, D, generator=g, dtype=torch.float64)
    return student, teacher, emb


def _rows(x: torch.Tensor, n_crops: int, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of a crop-major [n_crops*N, ...] tensor."""
    b = N // world
    return torch.cat([c[rank * b:(rank + 1) * b] for c in x.chunk(n_crops)])


def _step(student: torch.Tensor, teacher: torch.Tensor, emb: torch.Tensor, centering: str,
          rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    s = _rows(student, CROPS, rank, world).clone().requires_grad_(True)
    t = _rows(teacher, GLOBAL, rank, world)
    e = _rows(emb, GLOBAL, rank, world).clone().requires_grad_(True)
    center = dino.MeanCenter(K).double()
    center.center.copy_(torch.linspace(-0.5, 0.5, K, dtype=torch.float64).view(1, K))
    targets = dino.teacher_targets(t, GLOBAL, 0.05, centering, center.center)
    loss = dino.dino_loss(s, targets, CROPS, 0.1)
    kol = dino.koleo_loss(e, GLOBAL)
    (loss + 0.1 * kol).backward()
    center.update(t)
    mon = dino.collapse_monitors(targets, s.detach(), CROPS, 0.1)
    return {"loss": loss.detach(), "koleo": kol.detach(), "gs": s.grad, "ge": e.grad,
            "center": center.center.clone(), **mon}


def _dist_step(rank: int, world: int, centering: str) -> dict[str, torch.Tensor]:
    return _step(*_inputs(), centering, rank, world)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("centering", ["mean", "sinkhorn"])
def test_ranks_equal_one_process_on_the_global_batch(world: int, centering: str) -> None:
    ref = _step(*_inputs(), centering)
    outs = run_distributed(_dist_step, world, centering, timeout=180)
    # Per-rank losses are local means over equal batches: their mean is the global loss, and
    # FSDP's gradient average (1/W) of each rank's gradient is the global gradient.
    for key in ("loss", "koleo"):
        got = sum(o[key] for o in outs) / world
        assert abs(float(got - ref[key])) <= 1e-6, (key, float(got), float(ref[key]))
    for key, crops in (("gs", CROPS), ("ge", GLOBAL)):
        for r, o in enumerate(outs):
            want = _rows(ref[key], crops, r, world)
            assert torch.allclose(o[key] / world, want, atol=1e-6, rtol=0), (key, r)
    for o in outs:
        assert torch.allclose(o["center"], ref["center"], atol=1e-9, rtol=0)
        for key in ("teacher_entropy", "teacher_mean_entropy", "kl_teacher_student"):
            assert abs(float(o[key] - ref[key])) <= 1e-6, key


def test_koleo_never_picks_a_sample_as_its_own_neighbour() -> None:
    # Two identical points and one far away: each twin's neighbour is the other (distance 0,
    # loss huge), never itself; without the twins the loss is finite and moderate.
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert float(dino.koleo_loss(x, 1)) > 10
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    assert float(dino.koleo_loss(y, 1)) == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)


def test_schedules_follow_the_paper() -> None:
    assert dino.teacher_momentum(0, 100) == pytest.approx(0.996)
    assert dino.teacher_momentum(50, 100) == pytest.approx(0.998)
    assert dino.teacher_momentum(100, 100) == 1.0
    assert dino.teacher_temperature(0, 10) == pytest.approx(0.04)
    assert dino.teacher_temperature(5, 10) == pytest.approx(0.055)
    assert dino.teacher_temperature(10, 10) == pytest.approx(0.07)


def test_ema_moves_the_teacher_towards_the_student_only() -> None:
    torch.manual_seed(0)
    student, teacher = DINOHead([8, 16, 4], 10), DINOHead([8, 16, 4], 10)
    before = [p.clone() for p in teacher.parameters()]
    dino.ema_update(teacher, student, 0.9)
    for b, t, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s)
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="sharded alike"):
        dino.ema_update(teacher, DINOHead([8, 16, 5], 10), 0.9)


def test_last_layer_is_weight_normalised_and_freezes() -> None:
    layer = WeightNormLinear(4, 3)
    with torch.no_grad():
        layer.weight.mul_(7.0)  # the scale of V never matters: rows are normalised
    x = torch.randn(5, 4)
    assert torch.allclose(layer(x), x @ F.normalize(layer.weight, dim=1).t(), atol=1e-6)
    head = DINOHead([8, 16, 4], 10)
    emb, logits = head(torch.randn(3, 8))
    assert emb.shape == (3, 4) and logits.shape == (3, 10) and logits.abs().max() <= 1 + 1e-5
    logits.sum().backward()
    assert dino.cancel_last_layer_grads(head, 0, 5) and head.prototypes.weight.grad is None
    assert head.projection[0].weight.grad is not None
    assert not dino.cancel_last_layer_grads(head, 5, 5)


def _train(centering: str, steps: int = 150) -> dict[str, torch.Tensor]:
    """A tiny DINO run on fixed random 'images' (two noisy views of 64 points): student head,
    EMA teacher, the real loss and centering."""
    torch.manual_seed(0)
    points = torch.randn(64, 16)
    student, teacher = DINOHead([16, 32, 8], 32), DINOHead([16, 32, 8], 32)
    teacher.load_state_dict(student.state_dict())
    center = dino.MeanCenter(32)
    opt = torch.optim.SGD(student.parameters(), lr=0.5, momentum=0.9)
    mon: dict[str, torch.Tensor] = {}
    for step in range(steps):
        views = [points + 0.1 * torch.randn_like(points) for _ in range(2)]
        _, s_logits = student(torch.cat(views))
        with torch.no_grad():
            _, t_logits = teacher(torch.cat(views))
        targets = dino.teacher_targets(t_logits, 2, 0.04, centering, center.center)
        loss = dino.dino_loss(s_logits, targets, 2, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        center.update(t_logits)
        dino.ema_update(teacher, student, dino.teacher_momentum(step, steps, 0.9))
        mon = dino.collapse_monitors(targets, s_logits.detach(), 2, 0.1)
    return mon


@pytest.mark.parametrize("centering", ["mean", "sinkhorn"])
def test_monitors_flag_a_collapsed_run_and_not_a_centred_one(centering: str) -> None:
    collapsed = _train("none")
    assert dino.is_collapsed(collapsed, 32), {k: float(v) for k, v in collapsed.items()}
    healthy = _train(centering)
    assert not dino.is_collapsed(healthy, 32), {k: float(v) for k, v in healthy.items()}
