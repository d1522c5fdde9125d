"""Shard sources: the manifest (exact mode) or a pattern list (resampled mode), and a tar reader.

The reader walks a shard's tar members once, groups consecutive members by key (the WebDataset
convention: `dir/key.ext`), and can skip samples without reading their data: `tarfile` seeks over
member payloads, so skipping costs one 512-byte header read per member.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class Shard:
    path: str
    count: int  # samples in the shard per the manifest; -1 when unknown (resampled mode)


def load_manifest(shard_dir: str) -> List[Shard]:
    """Shards listed in `<dir>/manifest.json` with their sample counts, in manifest order."""
    mpath = Path(shard_dir) / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text())
        entries = manifest["shards"]
        shards = [Shard(str(Path(shard_dir) / e["name"]), int(e["count"])) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read shard manifest {mpath}: {e}") from e
    if not shards or sum(s.count for s in shards) == 0:
        raise ValueError(f"shard manifest {mpath} lists no samples")
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
        from seer_pipeline.store.shardset import resolve_remote

        pairs, exact = resolve_remote(spec)
        return [Shard(p, c) for p, c in pairs], exact
    if os.path.isdir(spec):
        return load_manifest(spec), True
    return expand_pattern(spec), False


def split_key(name: str) -> Tuple[str, str]:
    """'dir/abc.def.jpg' -> ('dir/abc', 'def.jpg') as WebDataset does (key ends at the first dot)."""
    base = os.path.basename(name)
    dot = base.find(".")
    if dot < 0:
        return name, ""
    prefix = name[: len(name) - len(base)]
    return prefix + base[:dot], base[dot + 1:].lower()


class ShardReadError(RuntimeError):
    """The shard could not be opened or ended early (truncated / corrupt tar)."""


def iter_samples(path: str, want: Callable[[int], bool],
                 stop: Optional[int] = None) -> Iterator[Tuple[int, Optional[Dict[str, bytes]]]]:
    """Yield (index, sample) for each sample of a shard in order; sample is None when not wanted.

    Payloads are read only for wanted samples. Raises ShardReadError (after yielding what was
    readable) if the file is missing or the tar is damaged. Stops after index `stop - 1`.
    """
    try:
        if "://" in path:  # a remote shard: ranged GETs, retried from the exact byte (store.reader)
            from seer_pipeline.store.shardset import open_shard

            tf = tarfile.open(fileobj=open_shard(path), mode="r:")
            tf._extfileobj = False  # close the reader (its connection) with the TarFile
        else:
            tf = tarfile.open(path, mode="r:")
    except (OSError, tarfile.TarError) as e:
        raise ShardReadError(f"cannot open shard {path}: {e}") from e
    with tf:
        key, idx, cur = None, -1, None
        try:
            while True:
                member = tf.next()
                if member is None:
                    break
                if not member.isfile():
                    continue
                k, ext = split_key(member.name)
                if k != key:
                    if key is not None:
                        yield idx, cur
                        if stop is not None and idx + 1 >= stop:
                            return
                    key, idx = k, idx + 1
                    cur = {"__key__": k.encode()} if want(idx) else None
                if cur is not None:
                    f = tf.extractfile(member)
                    data = f.read() if f is not None else b""
                    if len(data) != member.size:
                        raise ShardReadError(f"shard {path}: member {member.name} is truncated")
                    cur[ext] = data
        except (OSError, tarfile.TarError, EOFError) as e:
            raise ShardReadError(f"shard {path} is damaged after sample {idx}: {e}") from e
        if key is not None:
            yield idx, cur


def image_bytes(sample: Dict[str, bytes]) -> bytes:
    """The encoded image of a sample (first of jpg/jpeg/png/webp)."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise KeyError(f"sample {sample.get('__key__', b'?')!r} has no image ({', '.join(IMAGE_EXTS)})")
