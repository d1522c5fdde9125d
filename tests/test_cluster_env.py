"""Clusters as they are (#20): GPU binding per task, and what the launcher says it passes on.

CPU-only: the CUDA calls are faked (a device count, a recording set_device), so the rank ->
device rule is checked on every machine.
"""
from __future__ import annotations

import pytest
import torch

from seer_pipeline.dist import setup
from seer_pipeline.dist.setup import DistEnv, init_distributed, local_cuda_device


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, count: int) -> list[object]:
    chosen: list[object] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(d))
    return chosen


@pytest.mark.parametrize("count, local_rank, expected", [
    (1, 0, 0), (1, 3, 0), (1, 7, 0),  # --gpus-per-task=1: each task sees its GPU as cuda:0
    (8, 0, 0), (8, 5, 5), (8, 7, 7),  # the whole node visible: the local rank itself
    (4, 6, 2),                        # 2 GPUs bound per task pair... modulo the visible ones
])
def test_local_cuda_device_is_local_rank_modulo_visible_gpus(
    monkeypatch: pytest.MonkeyPatch, count: int, local_rank: int, expected: int
) -> None:
    _fake_cuda(monkeypatch, count)
    assert local_cuda_device(local_rank) == torch.device("cuda", expected)


def test_no_visible_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, 0)
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        local_cuda_device(2)


def test_init_distributed_binds_local_rank_3_to_the_one_gpu_it_sees(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """SLURM with one GPU per task: task 3 of a node sees one device. Before the fix,
    set_device(3) raised 'invalid device ordinal' on such a cluster."""
    chosen = _fake_cuda(monkeypatch, 1)
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    # world 1, no explicit backend: nccl is picked but no process group is made
    denv = DistEnv(rank=0, world_size=1, local_rank=3, local_world_size=4,
                   master_addr="127.0.0.1", master_port=1, source="slurm", job_id="1")
    device = init_distributed(denv)
    assert device == torch.device("cuda", 0)
    assert [torch.device(d) if not isinstance(d, torch.device) else d for d in chosen] == \
        [torch.device("cuda", 0)]
    assert setup.default_backend() == "nccl"
