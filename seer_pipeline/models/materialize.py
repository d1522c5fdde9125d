"""Give a model built on the meta device real values, shard by shard, with no rank ever holding
the whole model.

Why: seer_10b has 9.3 B trunk parameters (37 GB fp32). Building it on the host in every rank and
then sharding needs 37 GB per rank (~300 GB per 8-GPU node) and a 37 GB transient on the GPU.
Instead the trainer builds under `torch.device("meta")`, shards (FSDP2 turns each parameter into
a DTensor whose local tensor is still meta), calls `to_empty` and then `init_model_`, which
writes only the rows this rank owns.

Values do not depend on the world size: every row (index along dim 0, the dimension FSDP2
shards) draws from its own CPU generator seeded from (run seed, parameter name, row). So the
unsharded model (world 1) and the union of the shards at any world size are bitwise equal, and
a rank's peak is its shard plus one parameter's local rows (the CPU staging before a copy to the
GPU). The distributions are pycls/torch's (see `RegNetTrunk.init_weights`, `SwAVHead`).
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from seer_pipeline.models.dino_head import WeightNormLinear

_JUNK = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def _clean(name: str) -> str:
    for junk in _JUNK:  # activation-checkpoint / compile wrappers (dist.parallelize adds them)
        name = name.replace(junk, "")
    return name[len("module."):] if name.startswith("module.") else name


def _local_and_offset(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's part of `p` and the global index of its first row (dim-0 sharding only)."""
    if not hasattr(p, "to_local"):  # a plain tensor: the rank holds all of it
        return p.data, 0
    # Lazy: only DTensor (sharded) parameters need it, and models must import fast.
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if any(offset[1:]):
        raise ValueError(f"only dim-0 sharding can be materialized row by row, got {p.placements}")
    local = p.to_local()
    if tuple(local.shape) != tuple(shape):
        raise ValueError(f"local shard shape {tuple(local.shape)} != expected {tuple(shape)}")
    return local, int(offset[0]) if len(offset) else 0


def _param_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2  # < 2**62, so seed + row never overflows int64


Fill = Callable[[torch.Tensor, torch.Generator], None]  # fills one row in place


def _normal(std: float) -> Fill:
    return lambda row, gen: row.normal_(0.0, std, generator=gen)


def _uniform(bound: float) -> Fill:
    return lambda row, gen: row.uniform_(-bound, bound, generator=gen)


def _rules(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, Fill | float]]:
    """(clean name, module, attribute, fill or constant) for every parameter and buffer."""
    zero_last = bool(getattr(getattr(getattr(model, "trunk", model), "config", None),
                             "zero_init_last_bn", False))
    for mname, m in model.named_modules():
        clean = _clean(mname)
        pre = f"{clean}." if clean else ""
        if isinstance(m, nn.Conv2d):  # pycls: kaiming normal, fan_out
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            yield pre + "weight", m, "weight", _normal(math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                yield pre + "bias", m, "bias", 0.0
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            last = zero_last and clean.endswith(".c.bn")  # last BN of a bottleneck block
            if m.weight is not None:
                yield pre + "weight", m, "weight", 0.0 if last else 1.0
                yield pre + "bias", m, "bias", 0.0
            if m.running_mean is not None:
                yield pre + "running_mean", m, "running_mean", 0.0
                yield pre + "running_var", m, "running_var", 1.0
                yield pre + "num_batches_tracked", m, "num_batches_tracked", 0.0
        elif isinstance(m, nn.Linear):  # torch's reset_parameters: U(+-1/sqrt(fan_in)) for both
            bound = 1.0 / math.sqrt(m.in_features) if m.in_features else 0.0
            yield pre + "weight", m, "weight", _uniform(bound)
            if m.bias is not None:
                yield pre + "bias", m, "bias", _uniform(bound)
        elif isinstance(m, WeightNormLinear):  # DINO's last layer (models.dino_head): its rows are
            # normalised in every forward, so only their direction matters; DINO draws N(0, 0.02).
            yield pre + "weight", m, "weight", _normal(0.02)
        elif any(True for _ in m.parameters(recurse=False)):
            raise TypeError(f"no init rule for {type(m).__name__} at '{clean}'")


@torch.no_grad()
def init_model_(model: nn.Module, seed: int) -> None:
    """Initialise every parameter and buffer of a materialized (e.g. `to_empty`) model in place,
    writing only the local rows of sharded parameters; prototypes are L2-normalised rows."""
    gen = torch.Generator(device="cpu")
    for name, m, attr, rule in _rules(model):
        t = getattr(m, attr)
        local, off = _local_and_offset(t)
        if not callable(rule):
            local.fill_(rule)
            continue
        if local.device.type == "meta":
            raise RuntimeError(f"{name} is still on the meta device: call to_empty first")
        # Rows are generated on the CPU (the CPU generator's stream is the same everywhere);
        # staging is one parameter's local rows, copied to the device once.
        stage = local if local.device.type == "cpu" and local.is_contiguous() else \
            torch.empty(local.shape, dtype=local.dtype)
        base = _param_seed(seed, name)
        for i in range(local.shape[0]):
            gen.manual_seed(base + off + i)
            rule(stage[i], gen)
        if name.endswith("prototypes.weight") and stage.ndim == 2:
            stage.copy_(F.normalize(stage, dim=1))  # rows are whole on every rank: exact
        if stage is not local:
            local.copy_(stage)


def materialize(model: nn.Module, device: torch.device, seed: int) -> nn.Module:
    """`to_empty(device)` then `init_model_`: real values for a meta-built (maybe sharded) model."""
    model.to_empty(device=device)
    init_model_(model, seed)
    return model


@torch.no_grad()
def load_full_state_(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy whole tensors (an unsharded state dict, e.g. a warm start) into a possibly sharded
    module: each rank keeps its rows. Keys must match exactly (strict, as load_state_dict)."""
    own = {_clean(k): v for k, v in module.state_dict(keep_vars=True).items()}
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise KeyError(f"state does not match the module: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, t in own.items():
        src = state[k]
        if tuple(src.shape) != tuple(t.shape):
            raise ValueError(f"{k}: shape {tuple(src.shape)} does not fit {tuple(t.shape)}")
        local, off = _local_and_offset(t)
        local.copy_(src[off:off + local.shape[0]] if src.ndim else src)


def local_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes this rank holds after materializing: its parameter shards, the (unsharded) buffers,
    and the largest single local parameter (the CPU staging of `init_model_` on a GPU)."""
    shards = biggest = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p  # no offsets: fake tensors work too
        n = local.numel() * p.element_size()
        shards, biggest = shards + n, max(biggest, n)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {"param_shards": shards, "buffers": buffers, "largest_local_param": biggest}
