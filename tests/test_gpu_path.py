"""The GPU code path, proven on CPU: the collective device rule, world-1 process groups, fp16's
absence and the rank-0 progress line. The bf16/FSDP layout, resharding and AC/compile through the
real trainer are in test_gpu_trainer.py.

The rule (seer_pipeline.distributed.setup): a collective's tensors live on the device its group serves.
On a CPU machine every tensor is a CPU tensor, so a plain device check cannot fail. `HostBorn`
makes it able to: it marks every tensor created during the loop on the *default* device (a
factory call without `device=`, e.g. `torch.tensor([loss, flag])`) and everything computed from
one. On a GPU run exactly those tensors are CPU tensors, and an NCCL-only group rejects them
("No backend type associated with device type cpu"). `CollectiveChecker` wraps the
torch.distributed collectives and fails on any such tensor, or on one off the served device.
"""
from __future__ import annotations

import os

import datetime as _dt
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from seer_pipeline.config.base import ConfigError
from seer_pipeline.config.train import load_train_config
from seer_pipeline.distributed.setup import DistEnv, free_port, init_distributed

_FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
              torch.as_tensor, torch.scalar_tensor, torch.from_numpy, torch.linspace, torch.eye,
              torch.randn, torch.rand, torch.randint}
_TAG = "_seer_host_born"


def host_born(t: torch.Tensor) -> bool:
    return bool(getattr(t, _TAG, False))


def _names_device(args: tuple, kwargs: dict) -> bool:
    return kwargs.get("device") is not None or any(
        isinstance(a, (torch.device, str)) for a in args[1:])


class HostBorn(TorchFunctionMode):
    """Tags tensors that a GPU run would hold on the host (see the module docstring).

    A CPU 0-dim tensor mixed with device tensors gives a device tensor in PyTorch, so the tag
    spreads from 0-dim inputs only when every tensor input carries it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if func in _FACTORIES:
            tag = kwargs.get("device") is None
        elif name in ("to", "cuda") and _names_device(args, kwargs):
            tag = False  # an explicit move to the compute device
        elif name.endswith("_") and args and isinstance(args[0], torch.Tensor):
            tag = host_born(args[0])  # in place: the destination keeps its device
        else:
            ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            born = [a for a in ins if host_born(a)]
            tag = bool(born) and (any(a.dim() > 0 for a in born) or len(born) == len(ins))
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor):
                try:
                    setattr(o, _TAG, tag)
                except (AttributeError, RuntimeError):
                    pass
        return out


_TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
                       "reduce_scatter", "reduce_scatter_tensor", "all_to_all_single", "reduce")
_OBJECT_COLLECTIVES = ("broadcast_object_list", "all_gather_object", "gather_object",
                       "scatter_object_list")


class CollectiveChecker:
    """Wraps torch.distributed collectives; records every call and its rule violations.

    `serves` is the device the default group's backend serves (as NCCL serves cuda:N); groups
    made with an explicit gloo backend (the async checkpoint's) serve the CPU.
    """

    def __init__(self, serves: torch.device) -> None:
        self.serves = serves
        self.calls: list[dict[str, Any]] = []
        self.violations: list[str] = []

    def _served(self, group: Any) -> torch.device:
        if group is not None and group is not dist.group.WORLD and dist.get_backend(group) == "gloo" \
                and dist.get_backend() != "gloo":
            return torch.device("cpu")
        return self.serves

    def _wrap(self, name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            group = kwargs.get("group")
            served = self._served(group)
            tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            if name in _OBJECT_COLLECTIVES:
                dev = kwargs.get("device")
                self.calls.append({"op": name, "devices": [str(dev)], "dtypes": [], "host": []})
            else:
                rec = {"op": name, "devices": [str(t.device) for t in tensors],
                       "dtypes": [str(t.dtype) for t in tensors], "host": [host_born(t) for t in tensors]}
                self.calls.append(rec)
                for t in tensors:
                    if host_born(t) or t.device != served:
                        self.violations.append(
                            f"{name}: {tuple(t.shape)} {t.dtype} tensor "
                            f"{'born on the host' if host_born(t) else 'on ' + str(t.device)}, but "
                            f"the group serves {served}")
            return fn(*args, **kwargs)
        return wrapped

    @contextmanager
    def active(self) -> Iterator["CollectiveChecker"]:
        saved = {n: getattr(dist, n) for n in _TENSOR_COLLECTIVES + _OBJECT_COLLECTIVES}
        for n, fn in saved.items():
            setattr(dist, n, self._wrap(n, fn))
        try:
            with HostBorn():
                yield self
        finally:
            for n, fn in saved.items():
                setattr(dist, n, fn)


# -- the checker itself ---------------------------------------------------------------------

@pytest.fixture
def world1_gloo() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=_dt.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_checker_catches_a_host_tensor_and_passes_a_device_one(world1_gloo: None) -> None:
    chk = CollectiveChecker(torch.device("cpu"))
    loss = torch.ones((), device="cpu") * 3  # explicit device: what the rule asks for
    with chk.active():
        good = torch.stack((loss.double(), torch.full((), 1.0, dtype=torch.float64, device="cpu")))
        dist.all_reduce(good)
        bad = torch.tensor([float(loss), 0.0], dtype=torch.float64)  # today's trainer did this
        dist.all_reduce(bad * 2)  # derived from a host tensor: still on the host on a GPU run
        scalar_mix = loss * torch.tensor(2.0)  # a 0-dim host tensor is a scalar to PyTorch
        dist.all_reduce(scalar_mix)
    assert [c["op"] for c in chk.calls] == ["all_reduce"] * 3
    assert len(chk.violations) == 1 and "born on the host" in chk.violations[0], chk.violations


# -- the real trainer under the checker (world 1, every collective runs) --------------------

def _cfg(run: Path, shards: Path, *extra: str):
    return load_train_config("cpu_tiny", [
        f"run.dir={run}", f"data.shards={shards}", "data.batch_size=2", "data.workers=0",
        "train.tensorboard=false", "train.log_every=1", *extra])


def test_trainer_collectives_follow_the_device_rule(world1_gloo: None, tiny_shards: Path,
                                                    tmp_path: Path) -> None:
    """Fails on the code before the rule: its packed loss/flag tensor and the checkpoint
    load-agreement flag were `torch.tensor(...)` on the host."""
    from seer_pipeline.train.trainer import Trainer

    denv = DistEnv(0, 1, 0, 1, "127.0.0.1", 0, "single")
    chk = CollectiveChecker(torch.device("cpu"))
    run = tmp_path / "run"
    # The queue is on (length 8 = 4 steps of batch 2), so its scores reach Sinkhorn too.
    common = ("ckpt.every=2", "swav.queue_length=8", "swav.freeze_prototypes_iters=1", "optim.total_steps=7")
    from seer_pipeline.train import swav

    rows: list[int] = []
    real_sk = swav.sinkhorn_knopp

    def sinkhorn(scores, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        rows.append(scores.shape[0])
        return real_sk(scores, *a, **k)

    swav.sinkhorn_knopp = sinkhorn
    try:
        tr = Trainer(_cfg(run, tiny_shards, "train.steps=6", *common), denv, torch.device("cpu"))
        with chk.active():
            assert tr.train() == 0
        saved = {k: v.clone() for k, v in tr.objective.queue.state_dict().items()}  # the final save's
        tr2 = Trainer(_cfg(run, tiny_shards, "train.steps=7", *common), denv, torch.device("cpu"))
        restored: dict = {}
        real_resume = tr2.resume

        def resume() -> int | None:
            step = real_resume()
            restored.update({k: v.clone() for k, v in tr2.objective.queue.state_dict().items()})
            return step

        tr2.resume = resume
        with chk.active():
            assert tr2.train() == 0  # resumes at 6: the load-agreement collectives run too
    finally:
        swav.sinkhorn_knopp = real_sk
    # The queue filled in 4 steps (8 rows, batch 2), then fed Sinkhorn 8 + 2 rows per crop,
    # and came back bitwise from the checkpoint (used at once in step 7).
    assert int(saved["filled"]) == 8 and saved["embeddings"].abs().sum() > 0
    assert rows[:8] == [2] * 8 and rows[8:] == [10] * 6, rows
    assert restored.keys() == saved.keys()
    assert all(torch.equal(restored[k], saved[k]) for k in saved)
    assert chk.violations == [], "\n".join(chk.violations[:10])
    ops = {(c["op"], tuple(c["dtypes"])) for c in chk.calls}
    assert ("all_reduce", ("torch.float64",)) in ops  # the step's packed loss/flags, LARS norms
    assert ("all_reduce", ("torch.float32",)) in ops  # Sinkhorn and the collapse metrics
    assert ("broadcast_object_list", ()) in ops  # the checkpoint candidates
    assert ("all_reduce", ("torch.int64",)) in ops  # the load-agreement flag
    assert len(chk.calls) > 50


# -- process groups and precision ----------------------------------------------------------

@pytest.fixture(autouse=True)
def _restore_environ():
    """init_distributed exports RANK/WORLD_SIZE/MASTER_* into this pytest process; left there,
    they make every later subprocess (e.g. a SLURM job's task) look like a torchrun rank."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_explicit_backend_makes_a_world1_group() -> None:
    denv = DistEnv(0, 1, 0, 1, "127.0.0.1", free_port(), "single")
    assert init_distributed(denv, 30, None) == torch.device("cpu") and not dist.is_initialized()
    try:
        assert init_distributed(denv, 30, "gloo") == torch.device("cpu")
        assert dist.is_initialized() and dist.get_world_size() == 1
    finally:
        dist.destroy_process_group()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            init_distributed(denv, 30, "nccl")
    with pytest.raises(ValueError, match="nccl or gloo"):
        init_distributed(denv, 30, "mpi")


def test_fp16_is_refused_and_bf16_is_the_gpu_default() -> None:
    with pytest.raises(ConfigError, match="fp16 is not supported: use bf16"):
        load_train_config("cpu_tiny", ["train.precision=fp16"])
    for preset in ("seer_32gf", "seer_128gf", "seer_256gf", "seer_10b", "swav_rn50like"):
        assert load_train_config(preset).train.precision == "bf16", preset


def test_progress_line_shows_step_of_total_speed_and_eta(tmp_path: Path, caplog) -> None:
    from seer_pipeline.train.metrics import MetricsLogger, Throughput

    tp = Throughput()
    for _ in range(3):
        tp.update(64, 2.0)
    assert tp.images == 192 and tp.eta_s(100) == pytest.approx(200.0)
    m = MetricsLogger(tmp_path, rank=0, log_every=5, tensorboard=False, total_steps=1000)
    with caplog.at_level(logging.INFO, logger="seer_pipeline.train.metrics"):
        m.log_step(5, {"loss": 4.5, "img_s": 32.0, "eta_s": 3725.0})
    m.close()
    assert "step 5/1000 32.0 img/s ETA 1:02:05 loss=4.5" in caplog.text
    tp2 = Throughput()
    tp2.load_state_dict([tp.state_dict(), {"images": 1, "seconds": 1.0}])  # saved rank 0's
    assert (tp2.images, tp2.seconds) == (192, 6.0)
