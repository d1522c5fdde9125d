"""Build options (`ShardOptions`), part assignment and the --exclude list."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional

from data_prep.images import ProcessOptions, read_source
from data_prep.sources import walk_dir
from seer_pipeline.shards.format import MAX_MEMBER_BYTES

MAX_BYTES = MAX_MEMBER_BYTES  # per input; also every shard reader's member cap, so one constant


@dataclass
class ShardOptions:
    """Every option of a build; recorded in the manifest and checked on resume."""

    maxcount: int = 10000
    maxsize: Optional[int] = None
    seed: int = 0
    workers: int = 1
    resize_short_side: Optional[int] = None
    quality: int = 95
    reencode: str = "auto"
    check: str = "full"
    min_side: int = 16
    max_pixels: int = 100_000_000
    max_bytes: int = MAX_BYTES
    dedup: bool | str = True  # True: exact (sha256), False: none, "near": data_prep.near too
    exclude: list[str] = field(default_factory=list)
    exclude_near: list[str] = field(default_factory=list)  # data_prep.near_build
    part: tuple[int, int] = (0, 1)
    prefix: str = "shard"

    def __post_init__(self) -> None:
        if self.maxcount < 1:
            raise ValueError("maxcount must be >= 1")
        if self.maxsize is not None and self.maxsize < 20480:
            raise ValueError("maxsize must be >= 20480 bytes")
        if self.reencode not in ("auto", "always"):
            raise ValueError("reencode must be 'auto' or 'always'")
        if self.check not in ("full", "header"):
            raise ValueError("check must be 'full' or 'header'")
        if not 1 <= self.quality <= 100:
            raise ValueError("quality must be in 1..100")
        if self.dedup not in (True, False, "near"):
            raise ValueError(f"dedup must be exact, near or none, got {self.dedup!r}")
        if not 1 <= self.max_bytes <= MAX_BYTES:  # a bigger member would be refused by every reader
            raise ValueError(f"max_bytes must be in 1..{MAX_BYTES} (the shard readers' member cap)")
        if self.resize_short_side is not None and self.resize_short_side < 1:
            raise ValueError("resize_short_side must be >= 1")
        i, n = self.part = tuple(self.part)  # type: ignore[assignment]
        if not (n >= 1 and 0 <= i < n):
            raise ValueError(f"part must be I/N with 0 <= I < N, got {i}/{n}")
        if not self.prefix or "/" in self.prefix:
            raise ValueError("prefix must be a non-empty file name prefix")

    def process(self) -> ProcessOptions:
        return ProcessOptions(self.resize_short_side, self.quality, self.reencode, self.check,
                              self.min_side, self.max_pixels, self.max_bytes,
                              signature=self.dedup == "near" or bool(self.exclude_near))


def in_part(source: str, part: tuple[int, int]) -> bool:
    """Inputs go to parts by a hash of their source, so every part is a uniform sample."""
    i, n = part
    if n == 1:
        return True
    h = int.from_bytes(hashlib.blake2b(source.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")
    return h % n == i


def load_exclude(paths: Iterable[str]) -> frozenset[str]:
    """sha256 hex digests from list files (`sha256sum` output works) or folders of images."""
    out: set[str] = set()
    for p in paths:
        files = list(walk_dir(p)) if os.path.isdir(p) else None
        if files is None:
            if not os.path.isfile(p):  # a FIFO here would block the build before it starts
                raise ValueError(f"--exclude {p}: not a list file or a folder")
            with open(p, "r", encoding="utf-8", errors="replace") as f:
                for line in f:
                    tok = line.strip().split()
                    if tok and len(tok[0]) == 64 and all(c in "0123456789abcdefABCDEF" for c in tok[0]):
                        out.add(tok[0].lower())
            continue
        for fp in files:
            data, _ = read_source(fp, MAX_BYTES)
            if data:
                out.add(hashlib.sha256(data).hexdigest())
    return frozenset(out)
