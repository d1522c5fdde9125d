"""SwAV: projection head with prototypes, distributed Sinkhorn-Knopp, swapped-prediction loss.

Method: Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments" (NeurIPS 2020); SEER settings (no BN in the head, prototypes L2-normalised after
every step and frozen for the first 313 iterations, global-max subtraction before exp) from
VISSL's SEER configs (facebookresearch/vissl @09270ed2: configs/config/pretrain/seer/*.yaml,
the swav_head_fsdp head, NormalizePrototypesHook, TEMP_FROZEN_PARAMS_ITER_MAP) and Goyal et al.
2021, "Self-supervised Pretraining of Visual Features in the Wild", §3.

Trainer contract, per iteration:
    emb, scores = head(trunk(crops))               # crops concatenated crop-major
    loss, stats = swav_loss(scores, n_crops, group=dp_group,
                            queue=queue, prototypes=head.prototypes)   # queue optional
    loss.backward(); cancel_prototype_grads(head, it, freeze_iters); opt.step()
    normalize_prototypes(head)                     # models.swav_head; works on an FSDP2 row-sharded weight
    queue.push([emb.detach().chunk(n_crops)[c] for c in crops_for_assign], it)
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from seer_pipeline.models.swav_head import _prototype_linear

ProcessGroup = dist.ProcessGroup
log = logging.getLogger(__name__)

# SwAV paper / VISSL defaults; SEER 10B used epsilon 0.03 and 10 Sinkhorn iterations.
DEFAULT_EPSILON = 0.05
DEFAULT_TEMPERATURE = 0.1
SEER_FREEZE_PROTOTYPES_ITERS = 313


def _all_reduce(t: torch.Tensor, group: Optional[ProcessGroup], op=None) -> torch.Tensor:
    """In-place all-reduce over `group` whenever a process group exists, world 1 included (so a
    one-GPU NCCL run exercises every collective). `t` is on the scores' device, the one the
    group serves (seer_pipeline.distributed.setup); the group's timeout bounds the call."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
    return t


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = DEFAULT_EPSILON, n_iters: int = 3,
                   group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """Soft assignments Q [B, K] from scores [B, K]: rows sum to 1, columns equipartitioned.

    Over the global batch of all ranks of `group` (default: WORLD when initialised): every sum
    is all-reduced, so each rank gets exactly its rows of the single-process answer for the
    concatenated batch. Always float32 (autocast off); the global max is subtracted before exp.
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn_knopp wants scores [B, K], got shape {tuple(scores.shape)}")
    if epsilon <= 0 or n_iters < 0:
        raise ValueError(f"need epsilon > 0 and n_iters >= 0, got {epsilon}, {n_iters}")
    with torch.autocast(scores.device.type, enabled=False):
        s = scores.detach().float()
        b_local, k = s.shape
        # The max shift cancels in the first normalisation but keeps exp from overflowing.
        # Scores must be bounded (cosines of unit vectors): an entry more than ~87*epsilon
        # below the global max underflows, and a prototype whose whole row does gives NaN.
        peak = s.max() if s.numel() else torch.tensor(-math.inf, device=s.device)
        peak = _all_reduce(peak.reshape(1).clone(), group, dist.ReduceOp.MAX)
        q = torch.exp((s - peak) / epsilon).t()  # [K, B_local]
        # One collective for the total mass and the global batch size.
        sums = _all_reduce(torch.stack((q.sum(), q.new_tensor(float(b_local)))), group)
        q /= sums[0]
        batch = sums[1]
        for _ in range(n_iters):
            rows = _all_reduce(q.sum(dim=1, keepdim=True), group)
            q /= rows
            q /= k
            q /= q.sum(dim=0, keepdim=True)  # columns are whole on their rank: no collective
            q /= batch
        q *= batch
        return q.t()


def _split_crops(scores: Union[torch.Tensor, Sequence[torch.Tensor]],
                 n_crops: int) -> list[torch.Tensor]:
    if isinstance(scores, torch.Tensor):
        if scores.dim() != 2 or scores.shape[0] % n_crops:
            raise ValueError(
                f"scores {tuple(scores.shape)} is not [n_crops*B, K] for n_crops={n_crops}")
        return list(scores.chunk(n_crops))
    parts = list(scores)
    if len(parts) != n_crops:
        raise ValueError(f"got {len(parts)} per-crop score tensors for n_crops={n_crops}")
    if len({tuple(p.shape) for p in parts}) != 1:
        raise ValueError(f"per-crop scores differ in shape: {[tuple(p.shape) for p in parts]}")
    return parts


def swav_loss(
    scores: Union[torch.Tensor, Sequence[torch.Tensor]], n_crops: int,
    crops_for_assign: Sequence[int] = (0, 1), *, temperature: float = DEFAULT_TEMPERATURE,
    epsilon: float = DEFAULT_EPSILON, n_iters: int = 3, group: Optional[ProcessGroup] = None,
    queue_scores: Optional[Sequence[Optional[torch.Tensor]]] = None, compute_stats: bool = True,
    queue: Optional["EmbeddingQueue"] = None, prototypes: Optional[nn.Module] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Swapped prediction: each assignment crop's codes Q supervise every other crop.

    scores: [n_crops*B, K] (crop-major) or a list of n_crops [B, K]. queue_scores: per
    assignment crop, queued embeddings scored against the current prototypes ([L, K], no grad),
    put before the batch for Sinkhorn; or pass `queue` and `prototypes` and they are computed
    here (`queue.scores(prototypes)`, None until the queue is full). Returns (loss, stats);
    stats hold detached tensors (call `.item()` only when logging, it synchronises).
    """
    if queue is not None:
        if prototypes is None or queue_scores is not None:
            raise ValueError("pass `queue` together with `prototypes`, and not with `queue_scores`")
        queue_scores = queue.scores(prototypes)
    crops = _split_crops(scores, n_crops)
    if n_crops < 2 or not crops_for_assign or any(not 0 <= c < n_crops for c in crops_for_assign):
        raise ValueError(f"crops_for_assign {tuple(crops_for_assign)} invalid for n_crops={n_crops}")
    if queue_scores is not None and len(queue_scores) != len(crops_for_assign):
        raise ValueError("queue_scores needs one entry per assignment crop")
    batch = crops[0].shape[0]
    log_p = [F.log_softmax(c.float() / temperature, dim=1) for c in crops]
    loss = crops[0].new_zeros((), dtype=torch.float32)
    codes = []
    for i, crop_id in enumerate(crops_for_assign):
        s = crops[crop_id].detach()
        extra = queue_scores[i] if queue_scores is not None else None
        if extra is not None:
            s = torch.cat((extra.detach().float(), s.float()))
        q = sinkhorn_knopp(s, epsilon, n_iters, group)[-batch:]
        codes.append(q)
        sub = sum(-(q * log_p[v]).sum(dim=1).mean() for v in range(n_crops) if v != crop_id)
        loss = loss + sub / (n_crops - 1)
    loss = loss / len(crops_for_assign)
    stats: dict[str, torch.Tensor] = {"loss": loss.detach()}
    if compute_stats:
        assign = torch.cat([crops[c].detach() for c in crops_for_assign])
        stats.update(collapse_metrics(assign, temperature, group))
        stats["codes_max_mean"] = torch.cat(codes).max(dim=1).values.mean()
    return loss, stats


@torch.no_grad()
def collapse_metrics(scores: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE,
                     group: Optional[ProcessGroup] = None) -> dict[str, torch.Tensor]:
    """Collapse signals over the global batch (one all-reduce of 2K+1 values).

    prototypes_used: distinct prototypes that are some sample's nearest (argmax of scores);
    1 means full collapse. mean_assignment_entropy: entropy of the batch-mean softmax
    prediction, ln K when usage is uniform and 0 when every sample predicts one prototype.
    """
    s = scores.float()
    k = s.shape[1]
    counts = torch.bincount(s.argmax(dim=1), minlength=k).float()
    prob_sum = F.softmax(s / temperature, dim=1).sum(dim=0)
    packed = torch.cat((counts, prob_sum, torch.tensor([float(s.shape[0])], device=s.device)))
    _all_reduce(packed, group)
    counts, prob_sum, n = packed[:k], packed[k:2 * k], packed[-1]
    mean_p = prob_sum / n.clamp_min(1)
    entropy = -(mean_p * mean_p.clamp_min(1e-30).log()).sum()
    return {"prototypes_used": (counts > 0).sum().float(), "mean_assignment_entropy": entropy}


def cancel_prototype_grads(module: nn.Module, iteration: int,
                           freeze_iters: int = SEER_FREEZE_PROTOTYPES_ITERS) -> bool:
    """Drop the prototype gradients while `iteration < freeze_iters` (call before `step()`).

    A None gradient makes SGD/LARS skip the parameter (no momentum, no weight decay), as in
    SwAV's `freeze_prototypes_niters`. Returns True when the prototypes were frozen.
    """
    if iteration >= freeze_iters:
        return False
    for p in _prototype_linear(module).parameters():
        p.grad = None
    return True


class EmbeddingQueue(nn.Module):
    """Per-rank FIFO of past embeddings, one row block per assignment crop (SwAV's queue).

    Filling starts at `start_iter`; scores are served only once the queue is full, recomputed
    against the current prototypes. Newest entries sit first. State is per rank: save it
    under a rank-specific key (DCP keeps one copy of a key that every rank writes).
    """

    def __init__(self, length: int, dim: int, n_assign_crops: int = 2, start_iter: int = 0) -> None:
        super().__init__()
        if length < 1 or dim < 1 or n_assign_crops < 1 or start_iter < 0:
            raise ValueError(
                f"bad queue length={length} dim={dim} crops={n_assign_crops} start={start_iter}")
        self.start_iter = start_iter
        self.register_buffer("embeddings", torch.zeros(n_assign_crops, length, dim), persistent=True)
        self.register_buffer("filled", torch.zeros((), dtype=torch.long), persistent=True)

    @property
    def length(self) -> int:
        return self.embeddings.shape[1]

    @property
    def is_full(self) -> bool:
        return int(self.filled) >= self.length

    def active(self, iteration: int) -> bool:
        return iteration >= self.start_iter

    @torch.no_grad()
    def push(self, embeddings: Sequence[torch.Tensor], iteration: int) -> bool:
        """Enqueue this batch's embeddings (one [B, dim] per assignment crop); False if not started."""
        if not self.active(iteration):
            return False
        if len(embeddings) != self.embeddings.shape[0]:
            raise ValueError(f"queue holds {self.embeddings.shape[0]} crops, got {len(embeddings)}")
        b = embeddings[0].shape[0]
        if b > self.length:
            raise ValueError(f"batch {b} is larger than the queue ({self.length})")
        for i, e in enumerate(embeddings):
            self.embeddings[i, b:] = self.embeddings[i, :-b].clone()
            self.embeddings[i, :b] = e.detach().to(self.embeddings.dtype)
        self.filled.fill_(min(self.length, int(self.filled) + b))
        return True

    @torch.no_grad()
    def scores(self, prototypes: nn.Module) -> Optional[list[torch.Tensor]]:
        """Queue scores [length, K] per crop against the current prototypes; None until full."""
        if not self.is_full:
            return None
        # Under FSDP this call all-gathers the prototypes: every rank must make it, and does,
        # since all ranks push equal batches at the same iterations and so fill up together.
        with torch.autocast(self.embeddings.device.type, enabled=False):
            return [prototypes(self.embeddings[i]).float() for i in range(self.embeddings.shape[0])]


class QueueState:
    """The queue as a per-rank checkpoint component (seer_pipeline.checkpoint.checkpointer).

    Saved bitwise per rank. On a change of world size the per-rank queues (length
    queue_length / world) no longer map onto the new ranks, so the queue restarts empty with a
    log line; it refills within queue_length / global_batch steps and is not read until full.
    """

    def __init__(self, queue: EmbeddingQueue, rank: int, world: int) -> None:
        self.queue, self.rank, self.world = queue, rank, world

    def state_dict(self) -> dict[str, Any]:
        return {k: v.clone() for k, v in self.queue.state_dict().items()}

    def load_state_dict(self, states: list[Optional[dict[str, Any]]]) -> None:
        mine = states[self.rank] if len(states) == self.world else None
        if mine is None:
            log.warning("SwAV queue: checkpoint saved by %d rank(s), resuming on %d: the queue "
                        "starts empty and refills before it is used again", len(states), self.world)
            self.queue.embeddings.zero_()
            self.queue.filled.zero_()
            return
        self.queue.load_state_dict(mine)
