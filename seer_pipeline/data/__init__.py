"""Streaming multi-crop data loading: shards -> ranks -> workers -> shuffle -> decode -> crops -> batch.

`loader.build_loader(cfg, rank, world_size)` is the entry point; `augment.multicrop_factory` exposes the
per-image augmentation for benchmarks. See loader.py (state, resume), order.py (split, drop policy),
stream.py (bad-data policy) and config.py (`DataConfig`, importable without torch).
Nothing is imported here, so `seer_pipeline.data.config` stays light.
"""
