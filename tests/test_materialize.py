"""Meta-device build + shard + materialize: initial values independent of the world size, no
rank holding the whole model, warm start through the same slicing (issue 20, "seer_10b must start")."""
from __future__ import annotations

import pytest
import torch

from seer_pipeline.distributed.testing import run_distributed
from seer_pipeline.models.materialize import init_model_, load_full_state_, local_bytes, materialize

OVERRIDES = ["model.trunk=regnety_tiny", "model.n_prototypes=10", "model.hidden_dims=[16]",
             "model.out_dim=8", "model.head_bn=true"]
SEED = 7


def _meta_model():
    from seer_pipeline.config.train import load_train_config
    from seer_pipeline.models.swav_head import build_model

    cfg = load_train_config("cpu_tiny", OVERRIDES)
    with torch.device("meta"):
        return build_model(cfg)


def _full(model) -> dict:
    # numpy: tensors cross the result queue as shared memory that dies with the rank
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().numpy().copy()
            for k, v in model.state_dict().items()}


def _unsharded() -> dict:
    return _full(materialize(_meta_model(), torch.device("cpu"), SEED))


def _sharded_worker(rank: int, world: int, warm: dict | None) -> dict:
    from seer_pipeline.distributed.parallelize import ParallelPlan, build_mesh, parallelize

    plan = ParallelPlan(fsdp="full")
    model = parallelize(_meta_model(), plan, build_mesh(plan, "cpu", world, world), torch.device("cpu"))
    assert all(p.to_local().is_meta for p in model.parameters())  # nothing allocated yet
    materialize(model, torch.device("cpu"), SEED)
    held = local_bytes(model)["param_shards"]
    if warm is not None:
        load_full_state_(model.trunk, {k: torch.from_numpy(v) for k, v in warm.items()})
    return {"state": _full(model), "held": held}


def test_unsharded_init_is_seeded_and_has_the_documented_distributions() -> None:
    a, b = _unsharded(), _unsharded()
    assert all((a[k] == b[k]).all() for k in a)
    other = _full(materialize(_meta_model(), torch.device("cpu"), SEED + 1))
    assert not (a["trunk.stem.conv.weight"] == other["trunk.stem.conv.weight"]).all()
    w = torch.from_numpy(a["trunk.stages.1.blocks.0.a.conv.weight"])  # 1x1 conv, 16 out channels
    assert abs(w.std().item() - (2.0 / 16) ** 0.5) < 0.1  # kaiming normal, fan_out
    assert (a["trunk.stem.bn.weight"] == 1).all() and (a["trunk.stem.bn.running_var"] == 1).all()
    protos = torch.from_numpy(a["head.prototypes.weight"])
    torch.testing.assert_close(protos.norm(dim=1), torch.ones(10))
    lin = torch.from_numpy(a["head.projection.0.weight"])
    assert lin.abs().max() <= 1 / lin.shape[1] ** 0.5
    # Rows of one parameter draw from different streams (no copy of one row everywhere).
    assert not torch.equal(w[0], w[1])


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_sharded_init_is_bitwise_the_unsharded_one(world: int) -> None:
    ref = _unsharded()
    got = run_distributed(_sharded_worker, world, None, timeout=300)
    total = sum(v.nbytes for k, v in ref.items() if "running" not in k and "num_batches" not in k)
    for r, out in enumerate(got):
        assert out["state"].keys() == ref.keys()
        for k, v in ref.items():
            assert (out["state"][k] == v).all(), f"world {world} rank {r}: {k} differs"
        # Each rank materialized about its 1/world share, not the whole model.
        assert out["held"] <= total / world + total * 0.35, (r, out["held"], total)
    assert sum(o["held"] for o in got) == total


@pytest.mark.slow
def test_warm_start_loads_into_shards() -> None:
    src = _full(materialize(_meta_model(), torch.device("cpu"), 123))
    trunk = {k[len("trunk."):]: v for k, v in src.items() if k.startswith("trunk.")}
    got = run_distributed(_sharded_worker, 2, trunk, timeout=300)
    ref = _unsharded()
    for out in got:
        for k, v in src.items():
            want = v if k.startswith("trunk.") else ref[k]  # the head keeps the seeded init
            assert (out["state"][k] == want).all(), k


def test_warm_start_refuses_a_state_that_does_not_fit() -> None:
    model = materialize(_meta_model(), torch.device("cpu"), SEED)
    sd = {k: v.clone() for k, v in model.trunk.state_dict().items()}
    with pytest.raises(KeyError, match="missing"):
        load_full_state_(model.trunk, {k: v for k, v in sd.items() if "stem" not in k})
    sd["stem.conv.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match="does not fit"):
        load_full_state_(model.trunk, sd)


def test_init_refuses_meta_tensors() -> None:
    with pytest.raises(RuntimeError, match="to_empty"):
        init_model_(_meta_model(), SEED)
