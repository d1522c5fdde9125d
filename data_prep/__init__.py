"""Offline shard building: raw image dumps -> WebDataset shards (`seer-shards`).

Nothing in this package imports torch (or webdataset, which imports torch): `seer-shards` is
timed as a whole command and must start fast.
"""
from __future__ import annotations

__all__ = ["build_shards", "ShardOptions"]


def __getattr__(name: str):  # lazy, so `import data_prep` stays cheap
    if name in __all__:
        from data_prep import build

        return getattr(build, name)
    raise AttributeError(name)
