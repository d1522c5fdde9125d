"""CUDA-only speed switches (issue 20): chosen on CUDA, the config's values on CPU."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from seer_pipeline.train.speed import apply_cudnn, speed_switches


@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_gets_pinned_batches_nhwc_and_cudnn_autotune_when_allowed(deterministic: bool) -> None:
    sw = speed_switches("cuda", deterministic, channels_last=False, pin_memory=False)
    assert sw.pin_memory and sw.channels_last  # before issue 20: off, so non_blocking copies were synchronous
    # Autotuning picks kernels by timing: a resume could pick others, so not with deterministic.
    assert sw.cudnn_benchmark is (not deterministic)


@pytest.mark.parametrize("cl,pin", [(False, False), (True, False), (True, True)])
def test_cpu_keeps_the_config_values_and_leaves_cudnn_alone(cl: bool, pin: bool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    sw = speed_switches("cpu", True, channels_last=cl, pin_memory=pin)
    assert (sw.channels_last, sw.pin_memory, sw.cudnn_benchmark) == (cl, pin, None)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    apply_cudnn(sw)
    assert torch.backends.cudnn.benchmark is False
    apply_cudnn(speed_switches("cuda", False, False, False))
    assert torch.backends.cudnn.benchmark is True


def test_cpu_trainer_uses_the_config_values(tiny_shards: Path, tmp_path: Path) -> None:
    """The CPU training path is the one before the switches: no pinning, NCHW unless configured."""
    from seer_pipeline.config.train import load_train_config
    from seer_pipeline.distributed.setup import DistEnv
    from seer_pipeline.train.trainer import Trainer

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=_dt.timedelta(seconds=60))
    try:
        cfg = load_train_config("cpu_tiny", [f"run.dir={tmp_path / 'run'}", f"data.shards={tiny_shards}",
                                             "data.workers=0", "data.batch_size=2",
                                             "train.tensorboard=false"])
        tr = Trainer(cfg, DistEnv(0, 1, 0, 1, "127.0.0.1", 0, "single"), torch.device("cpu"))
        assert tr.speed.pin_memory is False and tr.loader.cfg.pin_memory is False
        assert tr.inner.channels_last is bool(cfg.model.channels_last) is False
        assert tr.speed.cudnn_benchmark is None
    finally:
        dist.destroy_process_group()
