"""DINO self-distillation: teacher targets with mean or Sinkhorn-Knopp centering, the loss,
KoLeo, the EMA teacher and its schedules, collapse monitors.

Method: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (ICCV 2021):
cross-entropy between the teacher's sharpened, centred distribution on each global crop and the
student's on every other crop; teacher = EMA of the student with momentum 0.996 -> 1 (cosine);
centre = EMA (0.9) of the teacher's batch-mean logits; teacher temperature warmed up linearly
from 0.04 (§3.1, appendix). Sinkhorn centering and KoLeo from DINOv2 (Oquab et al. 2023, §4 and
appendix): the teacher's targets are the Sinkhorn-Knopp codes of exp(logits / T_teacher) (3
iterations), the same operation as SwAV's, so this module reuses `swav.sinkhorn_knopp`, which
runs in fp32 over the global batch of all ranks.

Every batch statistic here is global: the centre's mean, Sinkhorn's sums and KoLeo's nearest
neighbours are taken over all ranks' samples, so N ranks of B samples compute exactly what one
process computes on N*B (tests/test_dino.py holds it to 1e-6 in float64 on 2 and 4 ranks).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from seer_pipeline.train.swav import sinkhorn_knopp

ProcessGroup = dist.ProcessGroup
CENTERINGS = ("mean", "sinkhorn", "none")  # "none": only for the collapse test and ablations


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(t: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    if _initialized():
        dist.all_reduce(t, group=group)
    return t


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows.

    Written here because torch's differentiable all_gather emulates reduce-scatter with
    all-to-all off NCCL, which gloo may lack; an all-reduce of the full gradient is supported
    by every backend and, for KoLeo's [N, D] embeddings, small."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:  # noqa: ANN001
        ctx.group = group
        world = dist.get_world_size(group)
        ctx.rank, ctx.rows = dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def gather_rows(x: torch.Tensor, group: Optional[ProcessGroup] = None) -> tuple[torch.Tensor, int]:
    """(every rank's rows concatenated, differentiable; the offset of this rank's rows)."""
    if not _initialized():
        return x, 0
    return _GatherWithGrad.apply(x, group), dist.get_rank(group) * x.shape[0]


@torch.no_grad()
def teacher_targets(teacher_logits: torch.Tensor, n_global: int, temperature: float,
                    centering: str, center: Optional[torch.Tensor] = None,
                    sinkhorn_iters: int = 3, group: Optional[ProcessGroup] = None) -> list[torch.Tensor]:
    """The teacher's target distributions, one [B, K] per global crop (fp32, no grad).

    mean: softmax((t - centre) / T); sinkhorn: Sinkhorn-Knopp codes of exp(t / T) over the
    global batch of each crop (DINOv2 normalises each crop's batch alone, as here); none:
    softmax(t / T), which collapses (kept to show that the monitors see it).
    """
    if centering not in CENTERINGS:
        raise ValueError(f"dino.centering must be one of {CENTERINGS}, got {centering!r}")
    crops = teacher_logits.float().chunk(n_global)
    if centering == "sinkhorn":
        return [sinkhorn_knopp(t, temperature, sinkhorn_iters, group) for t in crops]
    if centering == "mean":
        if center is None:
            raise ValueError("mean centering needs the centre")
        return [F.softmax((t - center) / temperature, dim=1) for t in crops]
    return [F.softmax(t / temperature, dim=1) for t in crops]


def dino_loss(student_logits: torch.Tensor, targets: Sequence[torch.Tensor], n_crops: int,
              student_temperature: float) -> torch.Tensor:
    """Mean over (teacher global crop i, student crop v != i) of CE(target_i, student_v),
    each averaged over this rank's batch (ranks hold equal batches, so the mean over ranks is
    the global mean). student_logits: [n_crops*B, K], crop-major, global crops first."""
    if student_logits.shape[0] % n_crops:
        raise ValueError(f"student logits {tuple(student_logits.shape)} are not [n_crops*B, K]")
    log_p = F.log_softmax(student_logits.float() / student_temperature, dim=1).chunk(n_crops)
    total, terms = student_logits.new_zeros((), dtype=torch.float32), 0
    for i, q in enumerate(targets):
        for v in range(n_crops):
            if v != i:
                total = total + (-(q * log_p[v]).sum(dim=1)).mean()
                terms += 1
    if terms == 0:
        raise ValueError("DINO needs at least 2 crops")
    return total / terms


def koleo_loss(x: torch.Tensor, n_global: int, group: Optional[ProcessGroup] = None,
               eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko regulariser (DINOv2): -mean log(distance to the nearest neighbour)
    of the L2-normalised embeddings, per global crop over the global batch of that crop."""
    total = x.new_zeros((), dtype=torch.float32)
    for crop in x.float().chunk(n_global):
        z = F.normalize(crop, dim=1, eps=eps)
        everyone, offset = gather_rows(z, group)
        with torch.no_grad():
            dots = z @ everyone.t()
            idx = torch.arange(z.shape[0], device=z.device)
            dots[idx, offset + idx] = -2.0  # never one's own neighbour (cosines are >= -1)
            nearest = dots.argmax(dim=1)
        dist_nn = (z - everyone[nearest]).norm(dim=1)
        total = total - torch.log(dist_nn + eps).mean()
    return total / n_global


class MeanCenter(nn.Module):
    """DINO's centre: an EMA of the teacher's batch-mean logits over the global batch.

    Identical on every rank (it is built from all-reduced sums), so it is saved once like the
    model and reloads on any world size."""

    def __init__(self, k: int, momentum: float = 0.9) -> None:  # 0.9: DINO's center_momentum
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, k), persistent=True)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor, group: Optional[ProcessGroup] = None) -> None:
        t = teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32))
        packed = torch.cat((t.sum(dim=0), t.new_tensor([float(t.shape[0])])))
        _all_reduce(packed, group)
        batch_center = (packed[:-1] / packed[-1]).view(1, -1)
        self.center.mul_(self.momentum).add_(batch_center.to(self.center.dtype), alpha=1 - self.momentum)


def teacher_momentum(step: int, total: int, base: float = 0.996, final: float = 1.0) -> float:
    """Cosine from `base` to `final` over `total` steps (DINO §3.1: 0.996 -> 1)."""
    if total <= 0:
        return final
    return final - (final - base) * (math.cos(math.pi * min(step, total) / total) + 1) / 2


def teacher_temperature(step: int, warmup_steps: int, start: float = 0.04, final: float = 0.07) -> float:
    """Linear warm-up of the teacher temperature (DINO appendix: 0.04 -> 0.07), then constant."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return final
    return start + (final - start) * step / warmup_steps


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, parameter by parameter on the local shards.

    Student and teacher are sharded alike (same FSDP units and mesh), so each rank's local
    shards correspond and the update needs no communication."""
    t = [_local(p) for p in teacher.parameters()]
    s = [_local(p.detach()) for p in student.parameters()]
    if len(t) != len(s) or any(a.shape != b.shape for a, b in zip(t, s)):
        raise ValueError("teacher and student are not sharded alike")
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1 - momentum)


def cancel_last_layer_grads(head: nn.Module, iteration: int, freeze_iters: int) -> bool:
    """Drop the last layer's gradients for the first iterations (DINO's freeze_last_layer)."""
    if iteration >= freeze_iters:
        return False
    for p in head.prototypes.parameters():
        p.grad = None
    return True


@torch.no_grad()
def collapse_monitors(targets: Sequence[torch.Tensor], student_logits: torch.Tensor, n_crops: int,
                      student_temperature: float,
                      group: Optional[ProcessGroup] = None) -> dict[str, torch.Tensor]:
    """Global-batch signals of collapse (DINO §5.3, Fig. 7): the teacher's per-sample entropy,
    the entropy of its batch-mean distribution and KL(teacher || student). Collapse to one
    dimension drives the batch-mean entropy to 0; collapse to uniform drives the per-sample
    entropy to ln K; both drive the KL to 0."""
    q = torch.cat(list(targets)).float()
    k = q.shape[1]
    log_p = F.log_softmax(student_logits.float() / student_temperature, dim=1).chunk(n_crops)
    kl_sum = sum((q_i * (q_i.clamp_min(1e-30).log() - log_p[v])).sum()
                 for i, q_i in enumerate(targets) for v in range(n_crops) if v != i)
    pairs = len(targets) * (n_crops - 1)
    ent_sum = -(q * q.clamp_min(1e-30).log()).sum()
    packed = torch.cat((q.sum(dim=0), torch.stack((ent_sum, torch.as_tensor(kl_sum, dtype=q.dtype, device=q.device),
                                                   q.new_tensor(float(q.shape[0]))))))
    _all_reduce(packed, group)
    n = packed[-1]
    mean_q = packed[:k] / n
    return {
        "teacher_entropy": packed[k] / n,
        "teacher_mean_entropy": -(mean_q * mean_q.clamp_min(1e-30).log()).sum(),
        "kl_teacher_student": packed[k + 1] / (n / len(targets) * pairs),
    }


def is_collapsed(monitors: dict[str, torch.Tensor], k: int) -> bool:
    """The teacher says nothing about the image: every sample on the same few dimensions (the
    batch-mean distribution under 25% of the entropy of uniform use), or every sample's
    distribution uniform (over 98% of ln K). Measured on tests/test_dino.py's tiny run after
    150 steps: centering off 14% of ln K, mean centering 64%."""
    one_dim = float(monitors["teacher_mean_entropy"]) < 0.25 * math.log(k)
    uniform = float(monitors["teacher_entropy"]) > 0.98 * math.log(k)
    return one_dim or uniform
