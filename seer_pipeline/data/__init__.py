"""Streaming multi-crop data loading: shards -> ranks -> workers -> shuffle -> decode -> crops -> batch.

`loader.build_loader(cfg, rank, world_size)` is the entry point; `augment.multicrop_factory` exposes the
per-image augmentation for benchmarks. See loader.py (state, resume), order.py (split, drop policy),
stream.py (bad-data policy); the loader's config section (`DataConfig`) and the crop presets live in `seer_pipeline.config`.
"""
