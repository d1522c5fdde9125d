"""Clusters as they are (#20): GPU binding per task, and what the launcher says it passes on.

CPU-only: the CUDA calls are faked (a device count, a recording set_device), so the rank ->
device rule is checked on every machine.
"""
from __future__ import annotations

import pytest
import torch

from seer_pipeline.distributed import setup
from seer_pipeline.distributed.setup import DistEnv, init_distributed, local_cuda_device


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


# ---- host memory: what each preset needs, asked for (#20) ----------------------------------
GPU_PRESETS = ["seer_32gf", "seer_128gf", "seer_256gf", "seer_10b"]


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_gpu_presets_ask_for_the_host_memory_the_planner_states(preset: str) -> None:
    """slurm.mem_gb=0 left host RAM to the site default; each SEER preset now asks for at least
    what seer_pipeline.plan.host derives from its plan, and that reaches sbatch (--mem)."""
    from launch.executor import executor_parameters
    from seer_pipeline.config.train import load_train_config
    from seer_pipeline.plan.host import describe, host_memory

    cfg = load_train_config(preset, [])
    need = host_memory(cfg)
    assert cfg.slurm.mem_gb >= need["node_gb"] > 0, describe(cfg, need)
    # Not wildly more than needed either: a request above the nodes' RAM never schedules.
    assert cfg.slurm.mem_gb <= 1.25 * need["node_gb"], describe(cfg, need)
    assert executor_parameters(cfg.slurm)["mem_gb"] == cfg.slurm.mem_gb
    # The stated need adds up: runtime + the larger of the two phases, per rank.
    per_rank = need["runtime"] + max(need["init_model"], need["async_staging"] + need["loader"])
    assert need["per_rank"] == pytest.approx(per_rank)
    if preset == "seer_10b":  # #20: 9.6 B fp32 parameters built on the host in every rank
        assert need["init_model"] / 1e9 == pytest.approx(38.5, rel=0.01)
        assert need["init_model"] > need["async_staging"] + need["loader"]


def test_templates_ask_for_seer_32gf_host_memory() -> None:
    """The sbatch templates are sized for seer_32gf (their examples); they ask for its RAM."""
    import re
    from pathlib import Path

    from seer_pipeline.config.train import load_train_config

    gb = load_train_config("seer_32gf", []).slurm.mem_gb
    repo = Path(__file__).resolve().parent.parent
    for name in ("single-node", "multi-node"):
        text = (repo / "slurm" / f"{name}.sbatch").read_text()
        assert re.findall(r"^#SBATCH --mem=(\d+)G$", text, re.M) == [str(gb)], name


# ---- the wait before a preempted rank exits (dist.setup.wait_for_peers) ---------------------
def _slow_rank0_then_wait(rank: int, world: int, delay_s: float) -> float:
    import time

    from seer_pipeline.distributed.setup import wait_for_peers

    if rank == 0:
        time.sleep(delay_s)  # rank 0's commit + requeue
    t0 = time.monotonic()
    wait_for_peers()
    return time.monotonic() - t0


def test_no_rank_leaves_before_rank_0_arrives() -> None:
    from seer_pipeline.distributed.testing import run_distributed

    waited = run_distributed(_slow_rank0_then_wait, 2, 3.0, timeout=180)
    assert waited[1] >= 2.5, waited  # rank 1 waited out rank 0's 3 s commit


def _rank0_dies_then_wait(rank: int, world: int, out: str) -> None:
    import json
    import os
    import time

    import torch.distributed as dist

    from seer_pipeline.distributed.setup import wait_for_peers

    dist.barrier()
    if rank == 0:
        os._exit(1)  # killed mid-commit
    t0 = time.monotonic()
    try:
        wait_for_peers()
        err = ""
    except Exception as e:  # noqa: BLE001 - the test reads what it was
        err = type(e).__name__
    with open(out, "w") as f:
        json.dump({"elapsed": time.monotonic() - t0, "error": err}, f)


def test_a_dead_rank_does_not_hold_its_peers_for_the_timeout(tmp_path) -> None:
    """The wait ends in an error as soon as a peer is gone, not after dist.timeout_s (120 s
    here); under srun, --kill-on-bad-exit ends the step even sooner."""
    import json

    from seer_pipeline.distributed.testing import DistributedTestError, run_distributed

    out = tmp_path / "rank1.json"
    with pytest.raises(DistributedTestError, match="rank 0: no result"):
        run_distributed(_rank0_dies_then_wait, 2, str(out), timeout=180, pg_timeout_s=120)
    got = json.loads(out.read_text())
    assert got["error"] and got["elapsed"] < 60, got


# ---- what a survivor reads from a lost peer (dist.setup.peer_lost: seer-train's dead-rank line) --
def _peer_stops_answering(rank: int, world: int, marker: str) -> str:
    import os
    import time

    import torch
    import torch.distributed as dist

    from seer_pipeline.distributed.setup import peer_lost

    if rank == 1:  # alive with its sockets open, never joining: a hung rank or a lost node
        deadline = time.monotonic() + 120
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        return ""
    try:
        dist.all_reduce(torch.ones(1))
        got = "no error"
    except Exception as e:  # noqa: BLE001 - the test reads what it was
        got = f"{peer_lost(e)} {type(e).__name__}: {e}"
    open(marker, "w").close()
    return got


def test_a_peer_that_stops_answering_reads_as_a_lost_peer(tmp_path) -> None:
    """gloo reports a collective timeout as a plain RuntimeError ("Timed out waiting 2000ms for
    recv operation"): seer-train must log it as the dead-rank line ("a collective failed ...
    another rank probably died"), as it does a reset connection, not as this rank's own error."""
    from seer_pipeline.distributed.testing import run_distributed

    got = run_distributed(_peer_stops_answering, 2, str(tmp_path / "done"), timeout=180, pg_timeout_s=2)
    assert got[0].startswith("True RuntimeError: ") and "Timed out" in got[0], got


def test_this_ranks_own_io_error_is_not_a_lost_peer() -> None:
    """An S3 or filesystem error says "connection" or "timed out" too; it is this rank's failure
    (logged with its traceback), not a dead peer's."""
    import socket

    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

    from seer_pipeline.distributed.setup import peer_lost

    assert peer_lost(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:4711"))
    assert peer_lost(RuntimeError("Connection reset by peer"))
    assert peer_lost(RuntimeError("Timed out waiting 2000ms for recv operation to complete"))
    for own in (ConnectionResetError(104, "Connection reset by peer"), socket.timeout("timed out"),
                TimeoutError("read timed out"), OSError(110, "Connection timed out"),
                EndpointConnectionError(endpoint_url="http://s3.local:8333"),
                ConnectTimeoutError(endpoint_url="http://s3.local:8333"),
                RuntimeError("shard s3://b/shard-000001.tar: read timeout after 3 attempts"),
                ValueError("bad connection string")):
        assert not peer_lost(own), own
    from seer_pipeline.shards.format import ShardReadError

    try:  # a shard read wraps the socket's error, message and all
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except OSError as io:
            raise ShardReadError(f"cannot open shard s3://b/shard-000001.tar: {io}") from io
    except ShardReadError as e:
        assert "reset by peer" in str(e) and not peer_lost(e)
