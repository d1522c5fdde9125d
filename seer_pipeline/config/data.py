"""The `data` section of the training config, read by the loader (seer_pipeline.data.loader);
no torch, numba or PIL: `seer-submit` reads it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class DataConfig:
    """The `data` section of the training config."""
    shards: str = ""  # dir with manifest.json (exact) or brace pattern / comma list (resampled); s3:// or https:// too
    s3_endpoint: str = ""  # S3 endpoint override (else AWS_ENDPOINT_URL / AWS config); never credentials
    batch_size: int = 32  # per rank
    workers: int = 2  # DataLoader workers per rank; 0 = in-process
    crops: str = "swav"  # swav | seer | seer2021 | custom
    size_crops: List[int] = field(default_factory=list)  # used when crops == "custom"
    nmb_crops: List[int] = field(default_factory=list)  # crops per size (custom)
    min_scale_crops: List[float] = field(default_factory=list)  # RandomResizedCrop min area fraction per size (custom)
    max_scale_crops: List[float] = field(default_factory=list)  # RandomResizedCrop max area fraction per size (custom)
    # Per-crop distortions; defaults are the SwAV reference's (main_swav.py / VISSL swav configs).
    jitter_p: float = 0.8  # colour jitter probability
    jitter: List[float] = field(default_factory=lambda: [0.8, 0.8, 0.8, 0.2])  # brightness, contrast, saturation, hue
    gray_p: float = 0.2  # random grayscale probability
    blur_p: float = 0.5  # Gaussian blur probability
    # Blur radius range in pixels of the output crop. SwAV's 0.1-2.0 is sized for 224 px crops;
    # on 28 px images scale it down (the demo uses 0.1-0.25 = 2.0 * 28/224).
    blur_radius: List[float] = field(default_factory=lambda: [0.1, 2.0])
    shuffle_buffer: int = 1000  # samples per worker in the streaming shuffle buffer (bounds memory)
    seed: int = 0  # data order and augmentations are a function of (seed, epoch, rank, worker)
    max_fail_fraction: float = 0.01  # above this fraction of undecodable samples the loader stops
    epoch_samples: int = 0  # resampled mode only: samples per epoch (whole world)
    prefetch_factor: int = 2  # batches prefetched per worker
    pin_memory: bool = False  # pin host memory (CUDA)
    timeout_s: float = 0.0  # DataLoader batch timeout (0 = wait forever)
