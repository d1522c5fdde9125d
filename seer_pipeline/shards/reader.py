"""Shard sources: the manifest (exact mode) or a pattern list (resampled mode), and a tar reader.

The tar reading itself (key rules, grouping members into samples, skipping unwanted payloads by
seeking over them) is the format module's: this module adapts it to the loader.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from seer_pipeline.shards import format as fmt
from seer_pipeline.shards.format import IMAGE_EXTS, ShardReadError, split_key

__all__ = ["Shard", "ShardReadError", "expand_pattern", "image_bytes", "iter_samples", "load_manifest",
           "resolve_shards", "split_key"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    path: str
    count: int  # samples in the shard per the manifest; -1 when unknown (resampled mode)


def load_manifest(shard_dir: str) -> List[Shard]:
    """Shards listed in `<dir>/manifest.json` with their sample counts, in manifest order."""
    try:
        manifest = fmt.load_manifest(shard_dir)
        shards = [Shard(str(Path(shard_dir) / e["name"]), int(e["count"])) for e in manifest["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read shard manifest {Path(shard_dir) / fmt.MANIFEST}: {e}") from e
    if not shards or sum(s.count for s in shards) == 0:
        raise ValueError(f"shard manifest {Path(shard_dir) / fmt.MANIFEST} lists no samples")
    return shards


def expand_pattern(spec: str) -> List[Shard]:
    """Brace pattern(s) and/or comma list -> shards of unknown size (resampled mode)."""
    paths: List[str] = []
    for part in _split_commas(spec):
        paths.extend(braceexpand(part))
    if not paths:
        raise ValueError(f"shard spec {spec!r} names no shards")
    return [Shard(p, -1) for p in paths]


_BRACE = re.compile(r"\{([^{}]*)\}")


def braceexpand(pattern: str) -> List[str]:
    """Expand `{000..012}` ranges (zero padding kept) and `{a,b}` alternatives, left to right."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [x for it in items for x in braceexpand(head + it + tail)]


def _split_commas(spec: str) -> List[str]:
    # Commas inside braces belong to the brace pattern ("a-{0,1}.tar"), others separate entries.
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def resolve_shards(spec: str) -> Tuple[List[Shard], bool]:
    """(shards, exact): a directory with manifest.json is exact mode, anything else resampled."""
    if not spec:
        raise ValueError("data.shards is empty: give a shard directory with manifest.json or a pattern")
    if "://" in spec:  # s3:// or http(s):// (seer_pipeline.store)
        from seer_pipeline.shards.remote import resolve_remote  # lazy: boto3 loads only for remote shards

        pairs, exact = resolve_remote(spec)
        return [Shard(p, c) for p, c in pairs], exact
    if os.path.isdir(spec):
        return load_manifest(spec), True
    return expand_pattern(spec), False


def iter_samples(path: str, want: Callable[[int], bool],
                 stop: Optional[int] = None) -> Iterator[Tuple[int, Optional[Dict[str, bytes]]]]:
    """Yield (index, sample) for each sample of a shard in order; sample is None when not wanted.

    Payloads are read only for wanted samples. Raises ShardReadError (after yielding what was
    readable) if the file is missing or the tar is damaged. Stops after index `stop - 1`.
    """
    src: Any = path
    if "://" in path:  # a remote shard: ranged GETs, retried from the exact byte (store.reader)
        from seer_pipeline.shards.remote import open_shard  # lazy: boto3 loads only for remote shards

        try:
            src = open_shard(path)
        except OSError as e:
            raise ShardReadError(f"cannot open shard {path}: {e}") from e
    try:
        for idx, key, sample in fmt.read_samples(src, want, stop):
            if sample is not None:
                sample["__key__"] = key.encode("utf-8", "surrogateescape")
            yield idx, sample
    finally:
        if src is not path:  # the remote file (and its connection) is ours to close
            src.close()


def image_bytes(sample: Dict[str, bytes]) -> bytes:
    """The encoded image of a sample (first of jpg/jpeg/png/webp)."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise KeyError(f"sample {sample.get('__key__', b'?')!r} has no image ({', '.join(IMAGE_EXTS)})")
