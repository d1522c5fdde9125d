"""Streaming multi-crop data loading: shards -> ranks -> workers -> shuffle -> decode -> crops -> batch.

`build_loader(cfg, rank, world_size)` is the entry point; `multicrop_factory` exposes the per-image
augmentation for benchmarks. See loader.py (state, resume), plan.py (split, drop policy) and
stream.py (bad-data policy).
"""
from .augment import CROP_PRESETS, MultiCrop, multicrop_factory, pil_flavour
from .loader import DataConfig, MultiCropLoader, build_loader

__all__ = ["CROP_PRESETS", "DataConfig", "MultiCrop", "MultiCropLoader", "build_loader",
           "multicrop_factory", "pil_flavour"]
