"""SwAV: Sinkhorn marginals and distributed equivalence, loss/gradients vs a re-derivation,
loss at initialisation, queue, prototype normalisation (also FSDP2 row-sharded), freezing."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seer_pipeline.models import build_trunk
from seer_pipeline.models.swav_head import SwAVHead, normalize_prototypes
from seer_pipeline.train.swav import (
    EmbeddingQueue, cancel_prototype_grads, collapse_metrics, sinkhorn_knopp, swav_loss,
)
from seer_pipeline.distributed.testing import run_distributed


def reference_sinkhorn(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """The SwAV algorithm re-derived in [B, K] orientation, float64, no max shift."""
    p = torch.exp(scores.double() / eps)
    p = p / p.sum()
    b, k = p.shape
    for _ in range(iters):
        p = p / (p.sum(dim=0, keepdim=True) * k)  # each prototype gets mass 1/K
        p = p / (p.sum(dim=1, keepdim=True) * b)  # each sample gets mass 1/B
    return p * b


def reference_loss(crops: list[torch.Tensor], assign: tuple[int, ...], temp: float, eps: float,
                   iters: int) -> torch.Tensor:
    total = 0.0
    for a in assign:
        q = reference_sinkhorn(crops[a].detach(), eps, iters)
        per_view = []
        for v, s in enumerate(crops):
            if v != a:
                log_p = torch.log(torch.softmax(s.double() / temp, dim=1))
                per_view.append(-(q * log_p).sum(dim=1).mean())
        total = total + sum(per_view) / len(per_view)
    return total / len(assign)


def test_sinkhorn_marginals_and_float32_under_autocast() -> None:
    torch.manual_seed(0)
    scores = F.normalize(torch.randn(64, 16), dim=1) @ F.normalize(torch.randn(10, 16), dim=1).t()
    q = sinkhorn_knopp(scores, epsilon=0.05, n_iters=200)
    assert q.dtype == torch.float32
    assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-5)
    assert torch.allclose(q.sum(dim=0), torch.full((10,), 64 / 10), rtol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q_bf = sinkhorn_knopp(scores.bfloat16(), n_iters=3)
    assert q_bf.dtype == torch.float32
    assert torch.allclose(q_bf.sum(dim=1), torch.ones(64), atol=1e-5)


def test_sinkhorn_matches_reference_and_survives_large_scores() -> None:
    torch.manual_seed(1)
    scores = torch.randn(20, 7)
    for eps, iters in ((0.05, 3), (0.5, 0), (0.03, 10)):
        ours = sinkhorn_knopp(scores * 0.3, eps, iters)
        assert torch.allclose(ours.double(), reference_sinkhorn(scores * 0.3, eps, iters), atol=1e-5)
    # scores/eps above ~90: exp would overflow float32 without the max shift.
    big = 5.0 + 0.4 * torch.randn(20, 7)
    assert torch.exp(big.max() / 0.05).isinf()
    ours = sinkhorn_knopp(big, 0.05, 3)
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours.double(), reference_sinkhorn(big, 0.05, 3), atol=1e-5)
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.randn(3, 4, 5))
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.randn(3, 4), epsilon=0.0)


@pytest.mark.parametrize("n_crops,assign", [(2, (0, 1)), (6, (0, 1)), (4, (1,))])
def test_loss_and_gradients_equal_rederivation(n_crops: int, assign: tuple[int, ...]) -> None:
    torch.manual_seed(n_crops)
    b, k, temp = 12, 9, 0.1
    scores = (0.3 * torch.randn(n_crops * b, k)).requires_grad_()
    loss, stats = swav_loss(scores, n_crops, assign, temperature=temp, epsilon=0.05, n_iters=3)
    loss.backward()
    ref_scores = scores.detach().double().requires_grad_()
    ref = reference_loss(list(ref_scores.chunk(n_crops)), assign, temp, 0.05, 3)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    assert torch.allclose(scores.grad.double(), ref_scores.grad, atol=1e-6)
    assert stats["loss"].item() == loss.item()
    # Closed form: d/ds_v = sum over sources a != v of (softmax(s_v/T) - q_a) / (T B (V-1) |A|).
    qs = {a: reference_sinkhorn(ref_scores.detach().chunk(n_crops)[a], 0.05, 3) for a in assign}
    for v, s in enumerate(ref_scores.detach().chunk(n_crops)):
        p = torch.softmax(s / temp, dim=1)
        g = sum((p - qs[a] for a in assign if a != v), torch.zeros_like(s))
        g = g / (temp * b * (n_crops - 1) * len(assign))
        assert torch.allclose(scores.grad.chunk(n_crops)[v].double(), g, atol=1e-6)


def test_loss_takes_per_crop_lists_and_rejects_bad_input() -> None:
    scores = torch.randn(4 * 5, 6)
    a, _ = swav_loss(scores, 4)
    b, _ = swav_loss(list(scores.chunk(4)), 4)
    assert a.item() == b.item()
    with pytest.raises(ValueError):
        swav_loss(torch.randn(4 * 5 + 1, 6), 4)
    with pytest.raises(ValueError):
        swav_loss(scores, 4, crops_for_assign=(4,))
    with pytest.raises(ValueError):
        swav_loss([torch.randn(5, 6), torch.randn(4, 6)], 2)


def test_loss_at_initialisation_is_ln_k() -> None:
    # Constant scores: every prediction is uniform, so the loss is exactly ln K.
    k = 300
    loss, _ = swav_loss(torch.zeros(6 * 8, k), 6)
    assert abs(loss.item() - math.log(k)) < 1e-5
    # A freshly initialised trunk + head is close to it (cosine scores ~ N(0, 1/256)).
    torch.manual_seed(0)
    trunk = build_trunk("regnety_tiny")
    head = SwAVHead([trunk.out_dim, 64, 256], k)
    _, scores = head(trunk(torch.randn(6 * 16, 3, 32, 32)))
    loss, stats = swav_loss(scores, 6)
    assert abs(loss.item() - math.log(k)) < 0.1 * math.log(k)
    assert stats["prototypes_used"].item() > 1


def test_head_shapes_norms_and_bn_option() -> None:
    head = SwAVHead([32, 64, 64, 16], 50)
    assert [type(m).__name__ for m in head.projection] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert head.prototypes.bias is None
    emb, scores = head(torch.randn(7, 32))
    assert emb.shape == (7, 16) and scores.shape == (7, 50)
    assert torch.allclose(emb.norm(dim=1), torch.ones(7), atol=1e-5)
    assert torch.allclose(head.prototypes.weight.norm(dim=1), torch.ones(50), atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb, scores = head(torch.randn(7, 32))
        assert head.projection[0](torch.randn(2, 32)).dtype == torch.bfloat16  # MLP follows autocast
    assert emb.dtype == scores.dtype == torch.float32
    bn_head = SwAVHead([32, 64, 16], 50, use_bn=True)
    assert [type(m).__name__ for m in bn_head.projection] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    with torch.device("meta"):
        seer = SwAVHead([10444, 8192, 8192, 256], 16000)  # SEER 256GF head
    assert seer.prototypes.weight.shape == (16000, 256)


def test_collapse_metrics() -> None:
    k = 20
    collapsed = torch.zeros(32, k)
    collapsed[:, 3] = 1.0
    m = collapse_metrics(collapsed, temperature=0.01)
    assert m["prototypes_used"].item() == 1 and m["mean_assignment_entropy"].item() < 1e-3
    spread = torch.eye(k).repeat(2, 1)
    m = collapse_metrics(spread, temperature=0.01)
    assert m["prototypes_used"].item() == k
    assert abs(m["mean_assignment_entropy"].item() - math.log(k)) < 1e-4


def test_normalize_and_freeze_prototypes() -> None:
    torch.manual_seed(0)
    head = SwAVHead([8, 4], 6)
    with torch.no_grad():
        head.prototypes.weight.mul_(3.0)
    normalize_prototypes(head)
    assert torch.allclose(head.prototypes.weight.norm(dim=1), torch.ones(6), atol=1e-6)
    opt = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    before = [p.detach().clone() for p in (head.prototypes.weight, head.projection[0].weight)]
    _, scores = head(torch.randn(4 * 3, 8))
    swav_loss(scores, 3, epsilon=0.5)[0].backward()
    assert cancel_prototype_grads(head, iteration=0, freeze_iters=313)
    opt.step()
    assert torch.equal(head.prototypes.weight, before[0])
    assert not torch.equal(head.projection[0].weight, before[1])
    _, scores = head(torch.randn(4 * 3, 8))
    swav_loss(scores, 3, epsilon=0.5)[0].backward()
    assert not cancel_prototype_grads(head, iteration=313, freeze_iters=313)
    opt.step()
    assert not torch.equal(head.prototypes.weight, before[0])


def test_queue_fills_serves_and_round_trips() -> None:
    torch.manual_seed(0)
    head = SwAVHead([8, 4], 5)
    queue = EmbeddingQueue(length=6, dim=4, n_assign_crops=2, start_iter=2)
    batches = [[F.normalize(torch.randn(3, 4), dim=1) for _ in range(2)] for _ in range(4)]
    assert not queue.push(batches[0], iteration=1)  # before start_iter: ignored
    assert queue.scores(head.prototypes) is None
    assert queue.push(batches[1], iteration=2) and queue.scores(head.prototypes) is None  # 3/6
    assert queue.push(batches[2], iteration=3) and queue.is_full
    for c in range(2):  # newest first
        assert torch.equal(queue.embeddings[c], torch.cat((batches[2][c], batches[1][c])))
    queue.push(batches[3], iteration=4)
    assert torch.equal(queue.embeddings[0], torch.cat((batches[3][0], batches[2][0])))
    qs = queue.scores(head.prototypes)
    assert qs[1].shape == (6, 5)
    assert torch.allclose(qs[1], queue.embeddings[1] @ head.prototypes.weight.t())
    # The loss uses the last B rows of Sinkhorn over [queue; batch].
    scores = 0.2 * torch.randn(2 * 3, 5)
    loss, _ = swav_loss(scores, 2, (0,), epsilon=0.05, n_iters=3, queue_scores=[qs[0]])
    q = sinkhorn_knopp(torch.cat((qs[0], scores[:3])), 0.05, 3)[-3:]
    expect = -(q * F.log_softmax(scores[3:] / 0.1, dim=1)).sum(dim=1).mean()
    assert abs(loss.item() - expect.item()) < 1e-6
    scores4 = 0.2 * torch.randn(2 * 3, 5)
    via_queue, _ = swav_loss(scores4, 2, (0, 1), queue=queue, prototypes=head.prototypes)
    via_scores, _ = swav_loss(scores4, 2, (0, 1), queue_scores=queue.scores(head.prototypes))
    no_queue, _ = swav_loss(scores4, 2, (0, 1))
    assert via_queue.item() == via_scores.item() != no_queue.item()
    with pytest.raises(ValueError, match="prototypes"):
        swav_loss(scores4, 2, queue=queue)
    fresh = EmbeddingQueue(length=6, dim=4, n_assign_crops=2, start_iter=2)
    fresh.load_state_dict(queue.state_dict())
    assert fresh.is_full and torch.equal(fresh.embeddings, queue.embeddings)
    with pytest.raises(ValueError):
        queue.push(batches[0][:1], iteration=5)
    with pytest.raises(ValueError):
        queue.push([torch.randn(7, 4)] * 2, iteration=5)


def _dist_sinkhorn_loss(rank: int, world: int, parts: list, crops: list, k: int) -> dict:
    q = sinkhorn_knopp(parts[rank], epsilon=0.05, n_iters=3)
    loss, stats = swav_loss(crops[rank], 4, (0, 1), epsilon=0.05, n_iters=3)
    return {"q": q, "loss": loss.item(), "used": stats["prototypes_used"].item(),
            "entropy": stats["mean_assignment_entropy"].item()}


@pytest.mark.slow
def test_distributed_sinkhorn_and_loss_equal_single_process() -> None:
    torch.manual_seed(0)
    k, b = 11, 6
    parts = [torch.randn(5, k), torch.randn(8, k)]  # uneven local batches on purpose
    per_rank = [0.5 * torch.randn(4, b, k) for _ in range(2)]  # [crop, B, K] on each rank
    crops = [x.reshape(4 * b, k) for x in per_rank]
    out = run_distributed(_dist_sinkhorn_loss, 2, parts, crops, k, timeout=120)
    single = sinkhorn_knopp(torch.cat(parts), epsilon=0.05, n_iters=3)
    assert (torch.cat([o["q"] for o in out]) - single).abs().max().item() < 1e-6
    whole = torch.cat(per_rank, dim=1).reshape(4 * 2 * b, k)  # crop-major global batch
    loss, stats = swav_loss(whole, 4, (0, 1), epsilon=0.05, n_iters=3)
    assert abs((out[0]["loss"] + out[1]["loss"]) / 2 - loss.item()) < 1e-5
    assert out[0]["used"] == out[1]["used"] == stats["prototypes_used"].item()
    assert abs(out[0]["entropy"] - stats["mean_assignment_entropy"].item()) < 1e-5


def _dist_normalize_sharded(rank: int, world: int, weight: torch.Tensor) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    head = SwAVHead([8, weight.shape[1]], weight.shape[0])
    with torch.no_grad():
        head.prototypes.weight.copy_(weight)
    fully_shard(head.prototypes)
    fully_shard(head)
    w = head.prototypes.weight
    assert isinstance(w, DTensor) and w.to_local().shape[0] < weight.shape[0]
    normalize_prototypes(head)
    # The trainer's path: build on meta, shard per block, materialise, init on DTensors.
    with torch.device("meta"):
        trunk = build_trunk("regnety_tiny")
        meta_head = SwAVHead([trunk.out_dim, 8, 4], 7)
    for stage in trunk.stages:
        for block in stage.blocks:
            fully_shard(block)
    for m in (trunk, meta_head.prototypes, meta_head):
        fully_shard(m)
    trunk.to_empty(device="cpu")
    meta_head.to_empty(device="cpu")
    trunk.init_weights()
    meta_head.init_weights()
    scores = meta_head(trunk(torch.randn(2, 3, 32, 32)))[1]
    proto_norms = meta_head.prototypes.weight.full_tensor().norm(dim=1)
    # full_tensor() may be an AsyncCollectiveTensor, which does not pickle: send plain lists.
    return {"full": w.full_tensor().tolist(), "local_rows": w.to_local().shape[0],
            "finite": bool(torch.isfinite(scores).all()), "proto_norms": proto_norms.tolist()}


@pytest.mark.slow
def test_normalize_prototypes_on_fsdp2_row_sharded_weight_and_meta_init() -> None:
    torch.manual_seed(0)
    weight = 3.0 * torch.randn(11, 4)  # 11 rows: uneven shards (6 + 5)
    out = run_distributed(_dist_normalize_sharded, 2, weight, timeout=120)
    assert sorted(o["local_rows"] for o in out) == [5, 6]
    for o in out:
        assert torch.allclose(torch.tensor(o["full"]), F.normalize(weight, dim=1), atol=1e-6)
        assert o["finite"] and torch.allclose(torch.tensor(o["proto_norms"]), torch.ones(7), atol=1e-5)
