"""Device-dependent speed switches: which are on is decided here, in one function, so the CPU
path provably keeps the config's values (and its bitwise results) while CUDA gets the settings
that are right there.

- `pin_memory`: without pinned host batches, `tensor.to("cuda", non_blocking=True)` is a
  synchronous copy; pinned, the copy overlaps the previous step's tail. Pinning means nothing on
  CPU, where the loader keeps the config's value (off).
- `cudnn.benchmark`: each crop resolution has a fixed shape, so autotuning pays once per
  resolution. It picks kernels by timing, so two runs (or a run and its resume) may pick
  different ones: on only when `train.deterministic` is off (the GPU presets' setting).
- `channels_last`: NHWC inputs let cuDNN run bf16 convolutions on tensor cores without layout
  transposes (the weights follow the input's format in cuDNN's choice). On CPU the config decides
  (the demo turns it on; tests compare CPU results with it off).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SpeedSwitches:
    pin_memory: bool
    cudnn_benchmark: bool | None  # None: leave torch's setting alone
    channels_last: bool


def speed_switches(device_type: str, deterministic: bool, channels_last: bool,
                   pin_memory: bool) -> SpeedSwitches:
    """The switches for `device_type`; the last two arguments are the config's values."""
    if device_type == "cuda":
        return SpeedSwitches(pin_memory=True, cudnn_benchmark=not deterministic, channels_last=True)
    return SpeedSwitches(pin_memory=pin_memory, cudnn_benchmark=None, channels_last=channels_last)


def apply_cudnn(sw: SpeedSwitches) -> None:
    if sw.cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = sw.cudnn_benchmark
