"""The training objectives: what a step computes from the crops, and what it keeps between steps.

The trainer owns the loop (lr, the step's one all-reduce, the optimizer, checkpoints); an
objective owns its model-specific pieces and their policies, torchtitan-style:
  - `forward(model, views, step, log_now)` -> (loss, stats, what to print if it is non-finite);
  - `before_optimizer_step(step)`: gradient surgery (frozen prototypes / last layer);
  - `after_optimizer_step(step)`: state that follows the weights (DINO's EMA teacher);
  - `register(ckpt)`: its checkpoint components.
`train.objective` picks one: `swav` (SEER's, unchanged) or `dino` (seer_pipeline.train.dino).
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from seer_pipeline.checkpoint.checkpointer import Checkpointer
from seer_pipeline.config.train import DinoConfig, SwavConfig, TrainConfig
from seer_pipeline.distributed.parallelize import unwrap
from seer_pipeline.models.swav_head import normalize_prototypes
from seer_pipeline.train import dino, swav
from seer_pipeline.train.state import ModelState

Forward = tuple[torch.Tensor, dict[str, torch.Tensor], Callable[[], str]]


def _describe(scores: torch.Tensor, emb: torch.Tensor) -> Callable[[], str]:
    """What a non-finite loss reports about the step's outputs (computed only then)."""
    def text() -> str:
        s = scores.detach().float()
        fin = s[torch.isfinite(s)]
        desc = (f"scores min {fin.min():.4g} max {fin.max():.4g} mean {fin.mean():.4g}, "
                f"{int((~torch.isfinite(s)).sum())} non-finite of {s.numel()}" if fin.numel()
                else "all scores non-finite")
        return f"{desc}; embedding norms {emb.detach().float().norm(dim=1).mean():.4g}"
    return text


class SwAVObjective:
    """SEER's objective: swapped prediction of Sinkhorn codes, optional queue."""

    def __init__(self, cfg: SwavConfig, inner: nn.Module, autocast: AbstractContextManager, *,
                 out_dim: int, rank: int, world: int, device: torch.device) -> None:
        """`cfg`: the `swav` section; `out_dim`: the embedding size (model.out_dim)."""
        self.cfg, self.head, self.autocast = cfg, inner.head, autocast
        self.rank, self.world = rank, world
        self.queue = None
        if cfg.queue_length > 0:
            self.queue = swav.EmbeddingQueue(
                length=cfg.queue_length // world, dim=out_dim,
                n_assign_crops=len(cfg.crops_for_assign), start_iter=cfg.queue_start).to(device)

    def register(self, ckpt: Checkpointer) -> None:
        if self.queue is not None:
            ckpt.register("queue", swav.QueueState(self.queue, self.rank, self.world), per_rank=True)

    def forward(self, model: nn.Module, views: list[torch.Tensor], step: int, log_now: bool) -> Forward:
        c = self.cfg
        normalize_prototypes(self.head)
        with self.autocast:
            emb, scores = model(views)
        queue_scores = None
        if self.queue is not None and self.queue.active(step):
            # After the forward: FSDP2 must run the root first (lazy init), and a queue restored
            # full is read in the very first step after a resume.
            queue_scores = self.queue.scores(self.head.prototypes)
        loss, stats = swav.swav_loss(
            scores.float(), len(views), c.crops_for_assign, temperature=c.temperature, epsilon=c.epsilon,
            n_iters=c.sinkhorn_iters, queue_scores=queue_scores, compute_stats=log_now)
        if self.queue is not None:
            b = views[0].shape[0]
            self.queue.push([emb[i * b:(i + 1) * b] for i in c.crops_for_assign], step)
        return loss, stats, _describe(scores, emb)

    def before_optimizer_step(self, step: int) -> None:
        swav.cancel_prototype_grads(self.head, step, self.cfg.freeze_prototypes_iters)

    def after_optimizer_step(self, step: int) -> None:
        pass


class CenterState:
    """DINO's mean centre as a global checkpoint component (identical on every rank)."""

    def __init__(self, center: dino.MeanCenter) -> None:
        self.center = center

    def state_dict(self) -> dict[str, Any]:
        return {"center": self.center.center.clone()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.center.center.copy_(sd["center"])


class DINOObjective:
    """Self-distillation from an EMA teacher (seer_pipeline.train.dino).

    The teacher is built and sharded exactly like the student (same builder, seed and FSDP
    units), never enters the optimizer, sees the global crops only and is updated on the local
    shards after every optimizer step. It is a checkpoint component like the model, so exact
    resume, resharding on another world size and export work as for the student.
    """

    def __init__(self, cfg: DinoConfig, student: nn.Module, teacher: nn.Module,
                 autocast: AbstractContextManager, *, n_prototypes: int, total_steps: int,
                 device: torch.device) -> None:
        """`cfg`: the `dino` section; `n_prototypes`: the head's K outputs (model.n_prototypes)."""
        self.cfg, self.autocast, self.total = cfg, autocast, total_steps
        self.student, self.teacher = student, teacher
        self.head = unwrap(student).head
        self.center = dino.MeanCenter(n_prototypes, cfg.center_momentum).to(device)

    def register(self, ckpt: Checkpointer) -> None:
        ckpt.register("teacher", ModelState(self.teacher))
        ckpt.register("dino", CenterState(self.center))

    def forward(self, model: nn.Module, views: list[torch.Tensor], step: int, log_now: bool) -> Forward:
        c = self.cfg
        n_global = c.global_crops
        with self.autocast:
            feats, emb, s_logits = model(views)
        with torch.no_grad(), self.autocast:
            _, _, t_logits = self.teacher(views[:n_global])
        # Units FSDP2 keeps gathered after forward until their backward (the root, the shared
        # fp32 BN unit under mixed precision) get none in the teacher: reshard them, or the EMA
        # would meet whole tensors where the student has shards (and they would stay gathered).
        for m in self.teacher.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
        temp = dino.teacher_temperature(step, c.teacher_temperature_warmup_steps,
                                        c.warmup_teacher_temperature, c.teacher_temperature)
        targets = dino.teacher_targets(t_logits.float(), n_global, temp, c.centering,
                                       self.center.center, c.sinkhorn_iters)
        loss = dino.dino_loss(s_logits.float(), targets, len(views), c.student_temperature)
        stats: dict[str, torch.Tensor] = {"teacher_temperature": torch.tensor(temp)}
        if c.koleo_weight > 0:
            koleo = dino.koleo_loss(feats[: n_global * views[0].shape[0]], n_global)
            loss = loss + c.koleo_weight * koleo
            stats["koleo"] = koleo.detach()
        if c.centering == "mean":
            self.center.update(t_logits)
        if log_now:
            stats.update(dino.collapse_monitors(targets, s_logits.detach(), len(views),
                                                c.student_temperature))
        return loss, stats, _describe(s_logits, emb)

    def before_optimizer_step(self, step: int) -> None:
        dino.cancel_last_layer_grads(self.head, step, self.cfg.freeze_last_layer_iters)

    def after_optimizer_step(self, step: int) -> None:
        m = dino.teacher_momentum(step, self.total, self.cfg.teacher_momentum)
        dino.ema_update(self.teacher, self.student, m)


def build_objective(c: TrainConfig, model: nn.Module, teacher: nn.Module | None,
                    autocast: AbstractContextManager, *, total_steps: int, rank: int, world: int,
                    device: torch.device) -> SwAVObjective | DINOObjective:
    """The objective `train.objective` names, as the trainer and `seer-plan --simulate` both run
    it. `model`: the parallelized student; `teacher`: DINO's (built like it), None for SwAV;
    `total_steps`: the lr schedule's length (config.train.schedule_len), which DINO's momentum
    schedule follows."""
    if c.train.objective == "dino":
        if teacher is None:
            raise ValueError("train.objective=dino needs its teacher")
        return DINOObjective(c.dino, model, teacher, autocast, n_prototypes=c.model.n_prototypes,
                             total_steps=total_steps, device=device)
    return SwAVObjective(c.swav, unwrap(model), autocast, out_dim=c.model.out_dim, rank=rank,
                         world=world, device=device)
