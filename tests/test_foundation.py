"""Foundation: rank resolver, config loading, atomic writes, and the N-rank harness itself."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import torch.distributed as dist

from seer_pipeline.config.base import ConfigError, load_config
from seer_pipeline.distributed.setup import DistEnvError, port_from_job_id, resolve_env
from seer_pipeline.core.io_utils import atomic_write_json
from seer_pipeline.distributed.testing import DistributedTestError, run_distributed
from seer_pipeline.train.provenance import provenance


def test_resolve_single_process():
    e = resolve_env({})
    assert (e.rank, e.world_size, e.source) == (0, 1, "single")


def test_resolve_torchrun():
    e = resolve_env(dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="4",
                         MASTER_ADDR="n1", MASTER_PORT="1234", SLURM_PROCID="0"))
    assert (e.rank, e.world_size, e.local_rank, e.num_nodes, e.source) == (3, 8, 1, 2, "torchrun")


def test_resolve_slurm_port_from_job_id():
    env = dict(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_JOB_ID="777",
               SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu01", MASTER_ADDR="gpu01")
    e = resolve_env(env)
    assert (e.rank, e.world_size, e.local_world_size, e.source) == (5, 8, 4, "slurm")
    assert e.master_port == port_from_job_id("777") != port_from_job_id("778")


def test_resolve_submitit_local():
    env = dict(SUBMITIT_LOCAL_GLOBALID="1", SUBMITIT_LOCAL_NTASKS="2",
               SUBMITIT_LOCAL_LOCALID="1", SUBMITIT_LOCAL_JOB_ID="4242")
    e = resolve_env(env)
    assert (e.rank, e.world_size, e.source) == (1, 2, "submitit-local")


@pytest.mark.parametrize("env", [
    dict(RANK="0"),
    dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="x"),
    dict(SLURM_PROCID="0", SLURM_NTASKS="2"),
    dict(SUBMITIT_LOCAL_GLOBALID="0"),
])
def test_resolve_rejects_partial_env(env):
    with pytest.raises(DistEnvError, match="partial"):
        resolve_env(env)


@dataclasses.dataclass
class _Inner:
    steps: int = 10
    name: str = "x"


@dataclasses.dataclass
class _Schema:
    train: _Inner = dataclasses.field(default_factory=_Inner)
    seed: int = 0


def test_config_overrides_and_unknown_keys(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  steps: 20\n")
    cfg = load_config(_Schema, preset, ["seed=3"])
    assert cfg.train.steps == 20 and cfg.seed == 3
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(_Schema, preset, ["train.stepz=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian:\n  steps: 1\n")
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(_Schema, bad)
    with pytest.raises(ConfigError, match="bad value"):
        load_config(_Schema, None, ["train.steps=abc"])


def test_atomic_write_json(tmp_path):
    p = tmp_path / "a" / "m.json"
    atomic_write_json(p, {"x": 1})
    atomic_write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    assert [q.name for q in p.parent.iterdir()] == ["m.json"]


def _allreduce(rank, world):
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    return t.item()


def _fails_on_rank1(rank, world):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


@pytest.mark.slow
def test_harness_runs_ranks_and_reports_failures():
    assert run_distributed(_allreduce, 2) == [3.0, 3.0]
    with pytest.raises(DistributedTestError, match="boom on rank 1"):
        run_distributed(_fails_on_rank1, 2, timeout=60)


def test_config_reference_is_current():
    """docs/config.md is generated from the config dataclasses; regenerate it when they change:
    `python -m seer_pipeline.config.reference > docs/config.md`."""
    from pathlib import Path

    from seer_pipeline.config.reference import render

    doc = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    assert doc.read_text() == render()
    assert "| `ckpt.async` |" in doc.read_text() and "| `slurm.max_requeues` |" in doc.read_text()


def test_provenance_records_the_machine() -> None:
    # Throughput is comparable only on the same CPU; a run records which one it had.
    p = provenance(world_size=2, threads=1)
    assert p["world_size"] == 2 and p["torch_threads"] == 1
    assert isinstance(p["cpu"], str) and p["cpu"] and p["cpu"] != "unknown"
    assert p["cpu_count"] == os.cpu_count()
    assert p["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    json.dumps(p)  # provenance.json must serialise as is
