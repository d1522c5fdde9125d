"""What a planned run is: its layout (`RunShape`, checked) and, for DINO, its teacher.

Crop specs are a preset name of seer_pipeline.config.crops or 'NxR+NxR'. Bytes per element of
each precision are those of the trainer's dtype policy (seer_pipeline.distributed.parallelize).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from seer_pipeline.config.crops import CROP_PRESETS, crop_counts
from seer_pipeline.plan.gpus import GPUS

GIB = 2**30
CROPS = {name: crop_counts(name) for name in CROP_PRESETS}  # name -> [(count, resolution)]
CROPS["seer160"] = CROPS["seer"]  # the name earlier plans used for SEER's 2x160+4x96
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def parse_crops(spec: str) -> list[tuple[int, int]]:
    """A preset name or 'NxR+NxR' (e.g. 2x224+4x96)."""
    if spec in CROPS:
        return CROPS[spec]
    if not re.fullmatch(r"\d+x\d+(\+\d+x\d+)*", spec):
        raise ValueError(f"--crops {spec!r}: a preset ({', '.join(CROPS)}) or like 2x224+4x96")
    return [(int(n), int(r)) for n, r in (p.split("x") for p in spec.split("+"))]


@dataclass(frozen=True)
class RunShape:
    """How a run is laid out, checked: world, batch, crops, numerics, sharding, assumed MFU."""
    gpus: int
    batch_per_gpu: int
    crops: list[tuple[int, int]]  # [(count, resolution)]
    precision: str
    ac: str
    gpu_type: str
    mfu: float
    images: float
    shard: int  # ranks a parameter is split over
    blocks_per_unit: int

    @classmethod
    def checked(cls, gpus: int, batch_per_gpu: int, crops: str | list[tuple[int, int]], precision: str | None,
                ac: str, gpu_type: str, mfu: float, images: float, shard_size: int | None,
                blocks_per_unit: int) -> "RunShape":
        if gpu_type not in GPUS:
            raise ValueError(f"--gpu-type must be one of {', '.join(GPUS)}")
        precision = precision or ("fp16" if gpu_type == "v100" else "bf16")
        if not GPUS[gpu_type].get(precision):
            raise ValueError(f"{gpu_type} has no {precision} tensor cores")
        if gpus < 1 or batch_per_gpu < 1 or not 0 < mfu <= 1:
            raise ValueError("need gpus >= 1, batch_per_gpu >= 1 and 0 < mfu <= 1")
        shard = shard_size or gpus
        if shard < 1 or gpus % shard:
            raise ValueError(f"the shard group ({shard}) must divide the number of GPUs ({gpus})")
        crop_list = parse_crops(crops) if isinstance(crops, str) else [tuple(c) for c in crops]
        return cls(gpus, batch_per_gpu, crop_list, precision, ac, gpu_type, mfu, images, shard, blocks_per_unit)

    @property
    def b_act(self) -> int:
        return DTYPE_BYTES[self.precision]

    def images_per_crop(self) -> list[int]:
        return [n * self.batch_per_gpu for n, _ in self.crops]


@dataclass(frozen=True)
class Teacher:
    """DINO's EMA teacher: a second copy of trunk and head, sharded like the student, without
    gradients or optimizer state; it runs forward only, on the first `global_crops` crops."""
    global_crops: int
    n_outputs: int  # the head's K: the teacher's targets [global crops x batch, K] in fp32

    def crops(self, crops: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The (count, resolution) groups of the first `global_crops` crops."""
        out, left = [], self.global_crops
        for n, r in crops:
            if left > 0:
                out.append((min(n, left), r))
                left -= min(n, left)
        return out


def teacher_of(cfg: Any) -> Teacher | None:
    """The teacher a training config trains with (None: SwAV has none)."""
    if cfg is None or OmegaConf.select(cfg, "train.objective", default="swav") != "dino":
        return None
    return Teacher(int(cfg.dino.global_crops), int(cfg.model.n_prototypes))
